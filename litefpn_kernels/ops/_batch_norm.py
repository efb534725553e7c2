"""BatchNorm math around the kernels' sums: the pilot value and centred moments, and
F.batch_norm's running-statistics update. Only [C]- and [C, Cin]-sized tensors: the
activations are the kernels' business."""
import torch

from . import _dispatch


def pilot(x, acc):
    """A per-channel centre for x's sums (one of its own values, x[0, :, 0, 0]): keeps the fp32
    moment sums accurate when x's mean is large against its spread. A non-finite value is
    replaced by 0: centred on +-Inf, every term would be NaN (Inf - Inf) where eager's plain
    sums give +-Inf. (as_strided: one view op instead of three selects.)"""
    p = torch.as_strided(x, (x.shape[1],), (x.stride(1),), x.storage_offset())
    return p.to(acc).nan_to_num(0.0, 0.0, 0.0).contiguous()


def count(x):
    """Values per channel of a BatchNorm over [N, C, H, W]: N*H*W."""
    return x.shape[0] * x.shape[2] * x.shape[3]


def centred_moments(s1, s2, center, n):
    """(mean, biased variance) from sums s1 = sum(x - center), s2 = sum((x - center)^2)."""
    d = s1 / n
    return center + d, (s2 / n - d * d).clamp_min(0)


def update_running_stats(running_mean, running_var, mean, var, n, momentum):
    """F.batch_norm's update from a batch's mean and biased variance over `n` values:
    running = (1 - momentum)*running + momentum*batch, with the unbiased variance.

    A mutating custom op (like aten's batch_norm, which updates in place inside the op): it runs
    before the autograd op that normalises, so activation checkpointing's recomputation, which
    stops once that op has saved its tensors, still updates the statistics a second time, as
    eager's nn.BatchNorm2d does."""
    if running_mean is not None and n > 0:
        _update_call(running_mean, running_var, mean, var, int(n), float(momentum))


@torch.library.custom_op("litefpn::batch_norm_update_stats",
                         mutates_args=("running_mean", "running_var"))
def _update_op(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
               var: torch.Tensor, n: int, momentum: float) -> None:
    running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
    # n == 1 (a single value per channel, only reachable through a synchronised batch of
    # one per rank that sums to one) would divide by zero; F.batch_norm rejects it earlier
    running_var.mul_(1 - momentum).add_(var, alpha=momentum * n / max(n - 1, 1))


@_update_op.register_fake
def _(running_mean, running_var, mean, var, n, momentum):
    return None


_update_call = _dispatch.direct(_update_op)  # direct in plain eager, else the op (`_dispatch`)
