"""SyncBatchNorm semantics for the operators: the collectives between their passes.

A synchronised BatchNorm in training normalises with the statistics of the global batch (every
rank of a process group), as `nn.SyncBatchNorm` does: forward, each rank's local moments
(count, mean, biased variance / Cin x Cin covariance of z for the lateral) are all-gathered and
combined between the statistics pass and the apply pass; backward, the per-channel gradient sums
(and the count) are all-reduced between the sums pass and the grad_x pass. The parameter
gradients of gamma and beta stay local (the data-parallel gradient averaging sums them), as in
`nn.SyncBatchNorm`. Any device: the collectives are `torch.distributed`'s (gloo on CPU, NCCL on
GPU).

The operators carry the group as a string key (`group_key`; "" = no synchronisation): a
custom op's schema cannot hold a ProcessGroup, and the backward needs it.
"""
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import Tensor

_GROUPS: Dict[str, object] = {}


def group_key(process_group) -> str:
    """The key of `process_group` when its BatchNorms synchronise (an initialised group of more
    than one rank), else "" (single-process: the plain path)."""
    if process_group is None or not dist.is_available() or not dist.is_initialized():
        return ""
    if dist.get_world_size(process_group) <= 1:
        return ""
    key = f"pg{id(process_group)}"
    _GROUPS[key] = process_group  # held: the id stays unique while the key is in use
    return key


def group_of(key: str):
    return _GROUPS[key]


def module_group_key(bn) -> str:
    """The group key of a BatchNorm module: its process group (WORLD if None) if it is an
    `nn.SyncBatchNorm` that synchronises now (training, batch statistics), else ""."""
    if not isinstance(bn, torch.nn.SyncBatchNorm) or not bn.training:
        return ""
    if not dist.is_available() or not dist.is_initialized():
        return ""
    return group_key(bn.process_group if bn.process_group is not None else dist.group.WORLD)


def _gather(key: str, packed: Tensor) -> Tensor:
    group = group_of(key)
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, packed.contiguous(), group=group)
    return torch.stack(parts)


def global_moments(key: str, n: int, mean: Tensor, second: Tensor):
    """Combine every rank's (count n, mean, biased second central moment) -> (global mean,
    global second moment, global count, local mean - global mean). `second` is the variance
    [C] or the covariance [C, C]. One all_gather; the combination (Chan et al.) runs in float64
    on every rank, so all ranks get the same statistics; ranks with an empty batch weigh 0."""
    acc, c, shape = mean.dtype, mean.shape[0], second.shape
    packed = torch.cat([mean.new_full((1,), float(n)), mean.reshape(-1), second.reshape(-1)])
    rows = _gather(key, packed.double())
    counts = rows[:, 0]
    total = counts.sum()
    weights = (counts / total.clamp_min(1))[:, None]
    means = torch.where(counts[:, None] > 0, rows[:, 1:1 + c], 0.0)
    seconds = torch.where(counts[:, None] > 0, rows[:, 1 + c:], 0.0)
    g_mean = (weights * means).sum(0)
    d = means - g_mean
    if len(shape) == 1:
        outer = d * d
    else:
        outer = (d[:, :, None] * d[:, None, :]).reshape(d.shape[0], -1)
    g_second = (weights * (seconds + outer)).sum(0).reshape(shape)
    delta = (mean.double() - g_mean) if n > 0 else torch.zeros_like(g_mean)
    return g_mean.to(acc), g_second.to(acc), int(total.item()), delta.to(acc)


def all_reduce_sums(key: str, n: int, *sums: Tensor):
    """Sum each per-channel tensor of `sums` and the count over the group (one all_reduce, in
    float64) -> (count, *sums) in their dtypes."""
    flat = [s.reshape(-1).double() for s in sums]
    packed = torch.cat(flat + [flat[0].new_full((1,), float(n))])
    dist.all_reduce(packed, group=group_of(key))
    out, i = [], 0
    for s in sums:
        out.append(packed[i:i + s.numel()].reshape(s.shape).to(s.dtype))
        i += s.numel()
    return (int(packed[-1].item()),) + tuple(out)


# ----------------------------------------------------------------------------- plain BN
class _SyncBatchNorm(torch.autograd.Function):
    """nn.SyncBatchNorm's training function on any device (PyTorch's own is GPU-only): for the
    BatchNorms of the fused path that no fused operator covers (lone laterals, gates, PAN
    downsampling, smooths on backends without bn_silu kernels)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, key):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        xa = x.to(acc)
        n = x.numel() // x.shape[1]
        if n > 0:
            var, mean = torch.var_mean(xa, dim=(0, 2, 3), correction=0)
        else:
            mean = var = xa.new_zeros(x.shape[1])
        mean, var, total, _ = global_moments(key, n, mean, var)
        if running_mean is not None and total > 0:
            from ._batch_norm import update_running_stats
            update_running_stats(running_mean, running_var, mean, var, total, momentum)
        r = torch.rsqrt(var + eps)
        scale = r if weight is None else weight.to(acc) * r
        shift = -mean * scale if bias is None else bias.to(acc) - mean * scale
        y = (xa * scale[:, None, None] + shift[:, None, None]).to(x.dtype)
        ctx.save_for_backward(x, weight, mean, r)
        ctx.key, ctx.has_bias = key, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, mean, r = ctx.saved_tensors
        acc = mean.dtype
        xmu = x.to(acc) - mean[:, None, None]
        g = grad_y.to(acc)
        sum_dy, sum_dy_xmu = g.sum((0, 2, 3)), (g * xmu).sum((0, 2, 3))
        grad_w = (sum_dy_xmu * r).to(weight.dtype) if weight is not None else None
        grad_b = sum_dy.to(weight.dtype if weight is not None else acc) if ctx.has_bias else None
        n = x.numel() // x.shape[1]
        total, g_dy, g_dy_xmu = all_reduce_sums(ctx.key, n, sum_dy, sum_dy_xmu)
        gamma_r = r if weight is None else weight.to(acc) * r
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (gamma_r[:, None, None] * (g - g_dy[:, None, None] / total - xmu
                      * (r * r * g_dy_xmu / total)[:, None, None])).to(x.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


@torch._dynamo.disable  # collectives: the distributed path runs outside compiled graphs
def batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
               eps: float, key: str) -> Tensor:
    """F.batch_norm in training with the global batch's statistics of group `key`."""
    return _SyncBatchNorm.apply(x, weight, bias, running_mean, running_var, momentum, eps, key)
