"""bn_silu: SiLU(BatchNorm2d(x)), the BatchNorm + activation after each 3x3 smooth.

Order: public function -> custom op + checking fake -> backward op + checking fake -> autograd.

Two passes over x forward (statistics, then normalise + SiLU) and two backward (per-channel
sums, then grad_x), instead of eager's BN and SiLU passes and their saved intermediate. Only x
and per-channel vectors are saved: the BN output is recomputed in the backward, never stored.

Each pass is its own op, so a synchronised BatchNorm (`process_group`, `_distributed.py`) puts
its collective between two passes: `bn_silu_stats` (local moments) -> all_gather -> running
statistics (`batch_norm_update_stats`, mutating, before the autograd op: see `_batch_norm`) ->
`bn_silu` (normalise + SiLU; autograd) whose backward is `bn_silu_backward_sums` ->
all_reduce -> `bn_silu_backward`.
Kernel contracts: csrc/ops.cpp (`_bn_silu_*`); the statistics are taken around a per-channel
pilot value of x (as lateral_up2_fuse does for z), so fp32 sums stay accurate for a large mean.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends, eager
from ..backends import registry
from . import _autograd_support, _batch_norm, _checks, _dispatch, _distributed
from ._tensor import acc_dtype, as_dtype, empty_in_format


def bn_silu(x: Tensor, bn_weight: Tensor, bn_bias: Tensor, running_mean: Optional[Tensor],
            running_var: Optional[Tensor], training: bool, momentum: float = 0.1,
            bn_eps: float = 1e-5, *, backend: str = "auto", process_group=None) -> Tensor:
    """``F.silu(F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training,
    momentum, bn_eps))`` with F.batch_norm's exact semantics (running statistics updated in
    place in training, unbiased variance), without storing the BatchNorm output.

    x: [N, C, H, W]; the vectors [C]. The output has x's dtype and memory format. Backends:
    "eager" (the composition above), "cpu", "triton", and "cuda" where the extension was built
    with its CUDA kernels; "auto" is "cpu" for CPU tensors when the extension is built, "cuda"
    or else "triton" for CUDA tensors, else "eager". `process_group` (a torch.distributed
    group): in training with more than one rank, normalise with the statistics of the global
    batch, as nn.SyncBatchNorm does (on any device); None: this process's batch.
    """
    name = backends.resolve("bn_silu", backend, _checks.device_of("x", x))
    if name != "eager":
        _autograd_support.check_supported("bn_silu", x, bn_weight, bn_bias)
    _checks.momentum_value(momentum)  # the op does not take it: checked here, on every path
    key = _distributed.group_key(process_group) if training is True else ""
    _checks.bn_silu(x, bn_weight, bn_bias, running_mean, running_var, training, bn_eps,
                    synced=bool(key))
    if name == "eager":
        if key:
            return F.silu(_distributed.batch_norm(x, bn_weight, bn_bias, running_mean,
                                                  running_var, momentum, bn_eps, key))
        return eager.bn_silu(x, bn_weight, bn_bias, running_mean, running_var, training,
                             momentum, bn_eps)
    if key:
        return _synced(x, bn_weight, bn_bias, running_mean, running_var, momentum, bn_eps, key,
                       name)
    if training:
        mean, var = _stats_call(x.detach(), name)
        _batch_norm.update_running_stats(running_mean, running_var, mean, var,
                                         _batch_norm.count(x), momentum)
    else:
        mean, var = running_mean, running_var
    return _bn_silu_call(x, bn_weight, bn_bias, mean, var, training, float(bn_eps), name, "")


@torch._dynamo.disable  # collectives: the distributed path runs outside compiled graphs
def _synced(x, bn_weight, bn_bias, running_mean, running_var, momentum, bn_eps, key, name):
    """Training with the global batch's statistics: local moments, all_gather, then apply."""
    mean, var = _stats_call(x.detach(), name)
    mean, var, total, _ = _distributed.global_moments(key, _batch_norm.count(x), mean, var)
    _batch_norm.update_running_stats(running_mean, running_var, mean, var, total, momentum)
    return _bn_silu_call(x, bn_weight, bn_bias, mean, var, True, float(bn_eps), name, key)


# ----------------------------------------------------------------------------- statistics op
@torch.library.custom_op("litefpn::bn_silu_stats", mutates_args=())
def _bn_silu_stats_op(x: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """-> (mean, biased var) of x per channel ([C], accumulation dtype; zeros for an empty
    batch): the statistics pass, summed around a per-channel pilot value of x."""
    _checks.four_d("x", x)
    return registry.kernels("bn_silu", backend).moments(x)


@_bn_silu_stats_op.register_fake
def _(x, backend):
    _checks.four_d("x", x)
    acc = acc_dtype(x.dtype)
    return x.new_empty((x.shape[1],), dtype=acc), x.new_empty((x.shape[1],), dtype=acc)


# ----------------------------------------------------------------------------- forward op
@torch.library.custom_op("litefpn::bn_silu", mutates_args=())
def _bn_silu_op(x: Tensor, bn_weight: Tensor, bn_bias: Tensor, mean: Tensor, var: Tensor,
                training: bool, bn_eps: float, backend: str, group_key: str) -> Tensor:
    """SiLU((x - mean)/sqrt(var + eps)*gamma + beta): the apply pass. `mean`, `var` are the
    statistics to normalise with: the batch's (`bn_silu_stats`, or the global batch's when
    `group_key` names a process group) in training, the running ones in eval; `training` says
    whether the backward propagates through them."""
    _checks.bn_silu(x, bn_weight, bn_bias, mean, var, training, bn_eps, synced=bool(group_key))
    if x.numel() == 0:
        return empty_in_format(x, x.shape)
    return registry.kernels("bn_silu", backend).apply(x, bn_weight, bn_bias, mean, var, bn_eps)


@_bn_silu_op.register_fake
def _(x, bn_weight, bn_bias, mean, var, training, bn_eps, backend, group_key):
    _checks.bn_silu(x, bn_weight, bn_bias, mean, var, training, bn_eps, synced=bool(group_key))
    return empty_in_format(x, x.shape)


# ----------------------------------------------------------------------------- backward ops
# Both take BatchNorm's parameters and the statistics the forward normalised with, and fold
# them as the forward did (r = 1/sqrt(var + eps), scale = gamma*r, shift = beta - mean*scale).
@torch.library.custom_op("litefpn::bn_silu_backward_sums", mutates_args=())
def _bn_silu_backward_sums_op(grad_out: Tensor, x: Tensor, bn_weight: Tensor, bn_bias: Tensor,
                              mean: Tensor, var: Tensor, bn_eps: float, backend: str
                              ) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (s1, s2, grad_bn_weight) = (sum dz, sum dz*(x - mean), r*s2) per channel over this
    batch, dz = grad_out*silu'(BN(x)): the sums pass of the backward (zeros for an empty batch).
    [C], contiguous, in the accumulation dtype. (grad_bn_bias = s1.)"""
    return registry.kernels("bn_silu", backend).grad_sums(grad_out, x, bn_weight, bn_bias, mean,
                                                          var, bn_eps)


@_bn_silu_backward_sums_op.register_fake
def _(grad_out, x, bn_weight, bn_bias, mean, var, bn_eps, backend):
    torch._check(grad_out.shape == x.shape, lambda: "grad_out must be shaped like x")
    _checks.fake_vector("bn_weight", bn_weight, x.shape[1])
    vec = x.new_empty((x.shape[1],), dtype=acc_dtype(x.dtype))
    return vec, torch.empty_like(vec), torch.empty_like(vec)


@torch.library.custom_op("litefpn::bn_silu_backward", mutates_args=())
def _bn_silu_backward_op(grad_out: Tensor, x: Tensor, bn_weight: Tensor, bn_bias: Tensor,
                         mean: Tensor, var: Tensor, bn_eps: float, s1: Tensor, s2: Tensor,
                         count: int, training: bool, backend: str) -> Tensor:
    """-> grad_x, the grad_x pass. `s1`, `s2` are `bn_silu_backward_sums` over the batch the
    statistics came from (all-reduced over the group when synchronised), `count` its values
    per channel.

    With a = BN(x), dz = grad_out * silu'(a), M = count, scale = gamma*r:
    train: grad_x = scale*(dz - s1/M - (x - mean)*r^2*s2/M);  eval: grad_x = scale*dz.
    """
    return registry.kernels("bn_silu", backend).grad_x(grad_out, x, bn_weight, bn_bias, mean,
                                                       var, bn_eps, s1, s2, count, training)


@_bn_silu_backward_op.register_fake
def _(grad_out, x, bn_weight, bn_bias, mean, var, bn_eps, s1, s2, count, training, backend):
    torch._check(grad_out.shape == x.shape, lambda: "grad_out must be shaped like x")
    _checks.fake_vector("bn_weight", bn_weight, x.shape[1])
    return empty_in_format(x, x.shape)


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, bn_weight, bn_bias, mean, var, training, bn_eps, backend, group_key = inputs
    ctx.save_for_backward(x, bn_weight, bn_bias, mean, var)
    ctx.training, ctx.bn_eps, ctx.backend, ctx.group_key = training, bn_eps, backend, group_key


def _backward(ctx, grad_out):
    x, bn_weight, bn_bias, mean, var = ctx.saved_tensors
    s1, s2, d_weight = _backward_sums_call(grad_out, x, bn_weight, bn_bias, mean, var,
                                           ctx.bn_eps, ctx.backend)
    count, g1, g2 = _batch_norm.count(x), s1, s2
    if ctx.group_key:  # every rank joins, even one whose grad_x is not needed
        count, g1, g2 = _distributed.all_reduce_sums(ctx.group_key, count, s1, s2)
    need = ctx.needs_input_grad
    grad_x = None
    if need[0]:
        grad_x = _backward_call(grad_out, x, bn_weight, bn_bias, mean, var, ctx.bn_eps, g1, g2,
                                count, ctx.training, ctx.backend)
    return (grad_x, as_dtype(d_weight, bn_weight.dtype) if need[1] else None,
            as_dtype(s1, bn_bias.dtype) if need[2] else None, None, None, None, None, None,
            None)


_bn_silu_op.register_autograd(_backward, setup_context=_setup_context)

# the callers of the ops above (`_dispatch`): direct in plain eager, else the custom ops
_stats_call = _dispatch.direct(_bn_silu_stats_op)
_bn_silu_call = _dispatch.direct(_bn_silu_op, _setup_context, _backward)
_backward_sums_call = _dispatch.direct(_bn_silu_backward_sums_op)
_backward_call = _dispatch.direct(_bn_silu_backward_op)
