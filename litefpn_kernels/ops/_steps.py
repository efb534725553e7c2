"""The small math of the passes in PyTorch: BatchNorm's [C]- and [C, Cin]-sized formulas and the
fusion weights' chain rule, one function per step of `_passes.py`.

These are the reference steps (the tests' `contract` backend and the bandwidth model's counting
backend run them; so do the GPU backends where Triton is not installed). Each is a few to a few
dozen small PyTorch ops: on a GPU, a launch each. `litefpn_kernels/triton/steps.py` has the same
functions (names, arguments, results) as one or two Triton launches each; the GPU backends use
those. tests/ops/test_passes.py compares the two, and the C++ passes of the `cpu` backend
(csrc/cpu/passes.cpp) with both.

All run in the accumulation dtype `acc` (float64 for float64 activations, else float32), with
autocast off (the passes' business).
"""
import torch

from ._batch_norm import centred_moments
from ._batch_norm import pilot as _pilot
from ._fusion import fusion_coefs, fusion_param_grads
from ._tensor import to_acc_contiguous


# ----------------------------------------------------------------------------- BatchNorm
def pilot(x, acc):
    """x[0, :, 0, 0] (non-finite -> 0) in `acc`: the centre of x's moment sums."""
    return _pilot(x, acc)


def moments(s1, s2, center, n):
    """(mean, biased var) from s1 = sum(x - center), s2 = sum((x - center)^2) over n values."""
    return centred_moments(s1, s2, center, n)


def bn_affine(bn_weight, bn_bias, mean, var, bn_eps, acc):
    """(scale, shift, r) with BN(x) = x*scale + shift, r = 1/sqrt(var + eps)."""
    r = torch.rsqrt(to_acc_contiguous(var, acc) + bn_eps)
    scale = (to_acc_contiguous(bn_weight, acc) * r).contiguous()
    return scale, (to_acc_contiguous(bn_bias, acc)
                   - to_acc_contiguous(mean, acc) * scale).contiguous(), r


def bn_grad_coefs(bn_weight, bn_bias, mean, var, bn_eps, s1, s2, n, training, acc):
    """(scale, shift, k_x, k_0) of bn_silu's grad_x kernel: grad_x = dz*scale + x*k_x + k_0,
    i.e. scale*(dz - s1/n - (x - mean)*r^2*s2/n) in training, dz*scale in eval."""
    scale, shift, r = bn_affine(bn_weight, bn_bias, mean, var, bn_eps, acc)
    if training:
        k_x = scale * r * r * s2 / -n
        k_0 = -to_acc_contiguous(mean, acc) * k_x - scale * s1 / n
    else:
        k_x = k_0 = torch.zeros_like(scale)
    return scale, shift, k_x, k_0


# ----------------------------------------------------------------------------- lateral
def weight2d(conv_weight, acc):
    return to_acc_contiguous(conv_weight.reshape(conv_weight.shape[0], conv_weight.shape[1]), acc)


def gram_moments(g, colsum, center, n):
    """(mean_z, cov_z) from the per-image grams g[n] = sum_p (z - center)(z - center)^T and
    column sums colsum[n] = sum_p (z - center) over n values."""
    d = colsum.sum(0) / n
    return center + d, g.sum(0) / n - torch.outer(d, d)


def y_moments(weight, mean_z, cov_z):
    """(mean, biased var) of y = W z: W mean_z, diag(W cov_z W^T) (clamped at 0)."""
    return torch.mv(weight, mean_z), (torch.mm(weight, cov_z) * weight).sum(1).clamp_min(0)


def fold_weight(weight, bn_weight, bn_bias, mean, var, bn_eps):
    """(W' = diag(gamma r) W, BN's shift): BatchNorm folded into the 1x1 convolution."""
    scale, shift, _ = bn_affine(bn_weight, bn_bias, mean, var, bn_eps, weight.dtype)
    return (scale[:, None] * weight).contiguous(), shift


def fine_factor(n, c, w_coarse, w_fine, gate_fine, eps, acc, device):
    """m[n, c] = beta*gate_fine, the factor on BN's output in the fused sum ([N, C],
    contiguous)."""
    if w_coarse is None:
        return (to_acc_contiguous(gate_fine, acc) if gate_fine is not None
                else torch.ones((n, c), dtype=acc, device=device))
    beta = fusion_coefs(w_coarse, w_fine, eps, acc)[1]
    return (beta.expand(n, c) if gate_fine is None else gate_fine.to(acc) * beta).contiguous()


def lateral_grad_sums(a_n, s_n, weight, bn_weight, bn_bias, mean, var, bn_eps, zc, w_coarse,
                      w_fine, gate_fine, eps, need_sums):
    """From the gram of (grad_out, z - zc) per image, a_n [N, C, Cin], and grad_out's sums
    s_n [N, C]: (a_sum = sum_n m a_n, s = sum_n m s_n, d_gamma = dL/dgamma, sum_fine [N, C] =
    sum_p grad_out * BN(conv(z)), or [0] without need_sums)."""
    acc = weight.dtype
    scale, shift, r = bn_affine(bn_weight, bn_bias, mean, var, bn_eps, acc)
    m = fine_factor(a_n.shape[0], a_n.shape[1], w_coarse, w_fine, gate_fine, eps, acc,
                    a_n.device)
    a_sum = (m[:, :, None] * a_n).sum(0)
    s = (m * s_n).sum(0)
    d_gamma = r * ((weight * a_sum).sum(1) + (torch.mv(weight, zc)
                                              - to_acc_contiguous(mean, acc)) * s)
    if need_sums:  # sum_p g * BN(conv(z)) = rowsum(W' o A_n) + (W' zc + b') * s_n
        scaled_w = scale[:, None] * weight
        sum_fine = (scaled_w * a_n).sum(2) + (torch.mv(scaled_w, zc) + shift) * s_n
    else:
        sum_fine = a_n.new_empty((0,))
    return a_sum, s, d_gamma, sum_fine


def lateral_grad_weights(weight, bn_weight, bn_bias, mean, var, bn_eps, zc, cov_z, delta_z,
                         a_sum, s, s_all, d_gamma_all, frac, count_all, training):
    """(grad_W [C, Cin], W' = diag(gamma r) W, quad, shift) of the lateral backward:
    grad_z = W'^T (m g) + quad z + shift per pixel (quad, shift None in eval). In training
    quad = W^T diag(gamma r^2 d_gamma / count) W and shift = quad zc - W'^T s_all / count
    (the batch statistics' share); `frac` = this rank's count / the group's, `delta_z` its
    mean of z minus the group's ([0] without synchronisation)."""
    gamma_r, _, r = bn_affine(bn_weight, bn_bias, mean, var, bn_eps, weight.dtype)
    scaled_w = gamma_r[:, None] * weight
    if not training:
        return gamma_r[:, None] * (a_sum + torch.outer(s, zc)), scaled_w, None, None
    grad_w = a_sum - (d_gamma_all * r * frac)[:, None] * torch.mm(weight, cov_z)
    if delta_z.numel() > 0:
        grad_w = grad_w - torch.outer(s_all * frac, delta_z)
        local_dy = s - frac * s_all - frac * r * d_gamma_all * torch.mv(weight, delta_z)
        grad_w = grad_w + torch.outer(local_dy, zc)
    grad_w = gamma_r[:, None] * grad_w
    quad = torch.mm(weight.t(), (gamma_r * r * d_gamma_all / count_all)[:, None] * weight)
    shift = torch.mv(quad, zc) - torch.mv(scaled_w.t(), s_all) / count_all
    return grad_w, scaled_w, quad.contiguous(), shift.contiguous()


# ----------------------------------------------------------------------------- fusion
def fusion_grads(need, sum_coarse, sum_fine, w_coarse, w_fine, gate_coarse, gate_fine, eps):
    """Gradients of (w_coarse, w_fine, gate_coarse, gate_fine) from the per-(n, c) sums, in
    the parameters' dtypes; an empty [0] where not needed."""
    grads = (None,) * 4
    if any(need):
        grads = fusion_param_grads(sum_coarse, sum_fine, w_coarse, w_fine, gate_coarse,
                                   gate_fine, eps, need)
    return tuple(sum_coarse.new_empty((0,)) if g is None else g for g in grads)
