"""BatchNorm math around the kernels' sums: centred moments, the statistics of y = W z from
z's moments, the folded affine, and F.batch_norm's running-statistics update. Only [C]- and
[C, Cin]-sized tensors: the activations are the kernels' business."""
import torch


def pilot(x, acc):
    """A per-channel centre for x's sums (one of its own values): keeps the fp32 moment sums
    accurate when x's mean is large against its spread."""
    return x[0, :, 0, 0].to(acc).contiguous()


def count(x):
    """Values per channel of a BatchNorm over [N, C, H, W]: N*H*W."""
    return x.shape[0] * x.shape[2] * x.shape[3]


def centred_moments(s1, s2, center, n):
    """(mean, biased variance) from sums s1 = sum(x - center), s2 = sum((x - center)^2)."""
    d = s1 / n
    return center + d, (s2 / n - d * d).clamp_min(0)


def z_moments(gram_kernel, z, acc):
    """(mean_z [Cin], cov_z [Cin, Cin]) over (N, H, W), biased, in the accumulation dtype."""
    center = pilot(z, acc)
    gram, colsum = gram_kernel(z, z, center, center)
    n = count(z)
    d = colsum.sum(0) / n
    cov = gram.sum(0) / n - torch.outer(d, d)
    return center + d, cov


def y_moments(weight, mean_z, cov_z):
    """Batch mean and biased variance of y = W z from z's moments."""
    return weight @ mean_z, ((weight @ cov_z) * weight).sum(1).clamp_min(0)


def affine(bn_weight, bn_bias, mean, var, bn_eps, acc):
    """(scale, shift, r) with BN(x) = x*scale + shift, r = 1/sqrt(var + eps)."""
    r = torch.rsqrt(var + bn_eps)
    scale = bn_weight.to(acc) * r
    return scale.contiguous(), (bn_bias.to(acc) - mean * scale).contiguous(), r


def update_running_stats(running_mean, running_var, mean, var, n, momentum):
    """F.batch_norm's update from a batch's mean and biased variance over `n` values:
    running = (1 - momentum)*running + momentum*batch, with the unbiased variance."""
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_((momentum * mean).to(running_mean.dtype))
        running_var.mul_(1 - momentum).add_(
            (momentum * n / (n - 1) * var).to(running_var.dtype))
