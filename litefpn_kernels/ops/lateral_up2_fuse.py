"""lateral_up2_fuse: one top-down level, ``alpha*gc*Up2(coarse) + beta*gf*BN(conv1x1(z))``.

Order: public function -> custom op + checking fake -> backward op + checking fake -> autograd.

The kernels (contracts `_lateral_*`, `_up2_fuse_bwd_coarse` in csrc/ops.cpp) never write
y = conv1x1(z): BatchNorm is folded into the 1x1 weight (W' = diag(gamma*r) W,
b' = beta - mean*gamma*r, r = 1/sqrt(var+eps)) and, in training, the batch statistics of y come
from the mean and covariance of z: mean_y = W mean_z, var_y = diag(W cov_z W^T). Only small
[C, Cin]-sized math runs here (`_batch_norm.py`).

Each pass is its own op, so a synchronised BatchNorm (`process_group`, `_distributed.py`) puts
its collective between two passes: `lateral_moments` (z's local mean and covariance, the gram
pass) -> all_gather -> y's statistics and the running-statistics update
(`batch_norm_update_stats`, mutating, before the autograd op: see `_batch_norm`) ->
`lateral_up2_fuse` (the fused GEMM + Up2 epilogue; autograd), whose backward is
`lateral_up2_fuse_backward_sums` (the g z^T pass) -> all_reduce -> `lateral_up2_fuse_backward`
(grad_z and grad_coarse passes).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends, eager
from ..backends import registry
from ..eager import FUSION_EPS
from . import _autograd_support, _batch_norm, _checks, _dispatch, _distributed, _steps
from ._tensor import acc_dtype, as_dtype, empty_in_format, like_param, sum_shape


def lateral_up2_fuse(coarse: Tensor, z: Tensor, conv_weight: Tensor, bn_weight: Tensor,
                     bn_bias: Tensor, running_mean: Optional[Tensor],
                     running_var: Optional[Tensor], training: bool, momentum: float = 0.1,
                     bn_eps: float = 1e-5, w_coarse: Optional[Tensor] = None,
                     w_fine: Optional[Tensor] = None, *, eps: float = FUSION_EPS,
                     gate_coarse: Optional[Tensor] = None, gate_fine: Optional[Tensor] = None,
                     backend: str = "auto", process_group=None) -> Tensor:
    """``alpha*gate_coarse*Up2(coarse) + beta*gate_fine*BN(conv1x1(z))`` without writing the
    convolution's output or the upsampled map.

    BatchNorm follows `F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training,
    momentum, bn_eps)`: eval normalises with the running statistics; training with the batch's
    (biased variance) and updates running_mean / running_var in place (unbiased variance), unless
    they are None. z: [N, Cin, 2H, 2W]; coarse: [N, C, H, W]; conv_weight: [C, Cin, 1, 1];
    the rest as in `up2_fuse`. The output has z's dtype and memory format. `process_group` (a
    torch.distributed group): in training with more than one rank, the batch statistics are the
    global batch's, as nn.SyncBatchNorm's (on any device); None: this process's batch.
    """
    name = backends.resolve("lateral_up2_fuse", backend, _checks.device_of("z", z))
    if name != "eager":
        _autograd_support.check_supported("lateral_up2_fuse", coarse, z, conv_weight, bn_weight,
                                          bn_bias, w_coarse, w_fine, gate_coarse, gate_fine)
    _checks.lateral_up2_fuse(coarse, z, conv_weight, bn_weight, bn_bias, running_mean,
                             running_var, training, momentum, bn_eps, w_coarse, w_fine,
                             gate_coarse, gate_fine, eps)
    key = _distributed.group_key(process_group) if training else ""
    if name == "eager":
        if key:
            y = _distributed.batch_norm(F.conv2d(z, conv_weight), bn_weight, bn_bias,
                                        running_mean, running_var, momentum, bn_eps, key)
            return eager.up2_fuse(coarse, y, w_coarse, w_fine, eps, gate_coarse, gate_fine)
        return eager.lateral_up2_fuse(coarse, z, conv_weight, bn_weight, bn_bias, running_mean,
                                      running_var, training, momentum, bn_eps, w_coarse, w_fine,
                                      eps, gate_coarse, gate_fine)
    args = (w_coarse, w_fine, gate_coarse, gate_fine, float(eps), name)
    if key:
        return _synced(coarse, z, conv_weight, bn_weight, bn_bias, running_mean, running_var,
                       momentum, bn_eps, key, args)
    acc = acc_dtype(z.dtype)
    if training:
        mean_z, cov_z, stat_mean, stat_var = _moments_call(z.detach(), conv_weight.detach(), name)
        _batch_norm.update_running_stats(running_mean, running_var, stat_mean, stat_var,
                                         _batch_norm.count(z), momentum)
    else:
        stat_mean, stat_var = running_mean, running_var
        mean_z, cov_z = z.new_empty((0,), dtype=acc), z.new_empty((0, 0), dtype=acc)
    return _lateral_call(
        coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z, cov_z,
        z.new_empty((0,), dtype=acc), training, float(bn_eps), *args, "")


@torch._dynamo.disable  # collectives: the distributed path runs outside compiled graphs
def _synced(coarse, z, conv_weight, bn_weight, bn_bias, running_mean, running_var, momentum,
            bn_eps, key, args):
    """Training with the global batch's statistics: z's local moments, all_gather, then apply.
    The op gets the global mean of z, this rank's second moment of z about it and its offset
    (local mean - global mean): the conv weight's gradient sums over this rank only."""
    acc = acc_dtype(z.dtype)
    mean_l, cov_l, _, _ = _moments_call(z.detach(), conv_weight.detach(), args[-1])
    mean_z, cov_z, total, delta = _distributed.global_moments(key, _batch_norm.count(z), mean_l,
                                                              cov_l)
    with torch.autocast(z.device.type, enabled=False):  # the products in acc, not bf16/fp16
        stat_mean, stat_var = _steps.y_moments(_steps.weight2d(conv_weight.detach(), acc),
                                               mean_z, cov_z)
    _batch_norm.update_running_stats(running_mean, running_var, stat_mean, stat_var, total,
                                     momentum)
    return _lateral_call(
        coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z,
        cov_l + torch.outer(delta, delta), delta, True, float(bn_eps), *args, key)


def _out_like_z(coarse, z):
    """The output [N, C, 2H, 2W] of a lateral level: z's dtype and memory format."""
    n, _, h2, w2 = z.shape
    return empty_in_format(z, (n, coarse.shape[1], h2, w2))


# ----------------------------------------------------------------------------- statistics op
@torch.library.custom_op("litefpn::lateral_moments", mutates_args=())
def _lateral_moments_op(z: Tensor, conv_weight: Tensor, backend: str
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (mean_z [Cin], biased cov_z [Cin, Cin], mean_y [C], biased var_y [C]) over (N, H, W)
    in the accumulation dtype (zeros for an empty batch), y = conv1x1(z): the statistics pass
    (one gram pass around a pilot of z; mean_y = W mean_z, var_y = diag(W cov_z W^T))."""
    _checks.four_d("z", z)
    return registry.kernels("lateral_up2_fuse", backend).moments(z, conv_weight)


@_lateral_moments_op.register_fake
def _(z, conv_weight, backend):
    _checks.four_d("z", z)
    acc = acc_dtype(z.dtype)
    c, c_in = conv_weight.shape[0], z.shape[1]
    return (z.new_empty((c_in,), dtype=acc), z.new_empty((c_in, c_in), dtype=acc),
            z.new_empty((c,), dtype=acc), z.new_empty((c,), dtype=acc))


# ----------------------------------------------------------------------------- forward op
@torch.library.custom_op("litefpn::lateral_up2_fuse", mutates_args=())
def _lateral_up2_fuse_op(coarse: Tensor, z: Tensor, conv_weight: Tensor, bn_weight: Tensor,
                         bn_bias: Tensor, stat_mean: Tensor, stat_var: Tensor, mean_z: Tensor,
                         cov_z: Tensor, delta_z: Tensor, training: bool, bn_eps: float,
                         w_coarse: Optional[Tensor], w_fine: Optional[Tensor],
                         gate_coarse: Optional[Tensor], gate_fine: Optional[Tensor], eps: float,
                         backend: str, group_key: str) -> Tensor:
    """The apply pass: BN folded into the 1x1 weight with the statistics of y `stat_mean`,
    `stat_var` (training: the batch's, from z's moments; eval: the running ones), the fused
    GEMM + Up2 + weights epilogue. Training also takes, for the backward, mean_z (the batch's
    mean of z), cov_z (this rank's second moment of z about mean_z, / its count) and delta_z
    (this rank's mean of z - mean_z, [Cin]; [0] when the batch is this rank's: zero); eval
    takes them empty ([0], [0, 0], [0]). `group_key`: the process group of a synchronised
    BatchNorm ("" for none), whose backward all-reduces its sums."""
    _checks.lateral_up2_fuse(coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var,
                             training, None, bn_eps, w_coarse, w_fine, gate_coarse, gate_fine,
                             eps)
    if z.numel() == 0:
        return _out_like_z(coarse, z)
    return registry.kernels("lateral_up2_fuse", backend).apply(
        coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, bn_eps, w_coarse, w_fine,
        gate_coarse, gate_fine, eps)


@_lateral_up2_fuse_op.register_fake
def _(coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z, cov_z, delta_z,
      training, bn_eps, w_coarse, w_fine, gate_coarse, gate_fine, eps, backend, group_key):
    _checks.lateral_up2_fuse(coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var,
                             training, None, bn_eps, w_coarse, w_fine, gate_coarse, gate_fine,
                             eps)
    return _out_like_z(coarse, z)


# ----------------------------------------------------------------------------- backward ops
# Both take BatchNorm's parameters and statistics and fold them as the forward did; with
# W the 1x1 weight as [C, Cin], r = 1/sqrt(stat_var + eps), W' = diag(gamma r) W, b' = BN's
# folded bias, m = beta*gate_fine ([N, C], the factor on BN's output in the fused sum) and zc
# the centre of z's sums (mean_z in training, a pilot of z in eval).
@torch.library.custom_op("litefpn::lateral_up2_fuse_backward_sums", mutates_args=())
def _lateral_backward_sums_op(
        grad_out: Tensor, z: Tensor, conv_weight: Tensor, bn_weight: Tensor, bn_bias: Tensor,
        stat_mean: Tensor, stat_var: Tensor, mean_z: Tensor, training: bool, bn_eps: float,
        w_coarse: Optional[Tensor], w_fine: Optional[Tensor], gate_fine: Optional[Tensor],
        eps: float, need_sums: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (A [C, Cin], s [C], d_gamma [C], sum_fine [N, C] or [0]): the g z^T pass over this
    rank's batch. With h = m*g the gradient at BN's output, A = sum_n m_n sum_p g (z - zc)^T and
    s = sum_n m_n sum_p g: d_gamma = r*(rowsum(W o A) + (W zc - mean_y)*s) (= grad_bn_weight),
    s = grad_bn_bias, sum_fine = sum_p g * BN(conv(z)) per (n, c) for the fusion parameters:
    rowsum(W' o A_n) + (W' zc + b')*s_n."""
    return registry.kernels("lateral_up2_fuse", backend).grad_sums(
        grad_out, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z, training,
        bn_eps, w_coarse, w_fine, gate_fine, eps, need_sums)


@_lateral_backward_sums_op.register_fake
def _(grad_out, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z, training, bn_eps,
      w_coarse, w_fine, gate_fine, eps, need_sums, backend):
    c, c_in = conv_weight.shape[0], conv_weight.shape[1]
    torch._check(grad_out.dim() == 4 and grad_out.shape[0] == z.shape[0]
                 and grad_out.shape[1] == c and grad_out.shape[2] == z.shape[2]
                 and grad_out.shape[3] == z.shape[3], lambda: "grad_out must be [N, C, 2H, 2W]")
    new = lambda *shape: z.new_empty(shape, dtype=acc_dtype(z.dtype))  # noqa: E731
    return new(c, c_in), new(c), new(c), new(*((z.shape[0], c) if need_sums else (0,)))


@torch.library.custom_op("litefpn::lateral_up2_fuse_backward", mutates_args=())
def _lateral_up2_fuse_backward_op(
        grad_out: Tensor, coarse: Tensor, z: Tensor, conv_weight: Tensor, bn_weight: Tensor,
        bn_bias: Tensor, stat_mean: Tensor, stat_var: Tensor, mean_z: Tensor, cov_z: Tensor,
        delta_z: Tensor, a_sum: Tensor, s: Tensor, s_all: Tensor, d_gamma_all: Tensor,
        sum_fine: Tensor, count_all: int, training: bool, bn_eps: float,
        w_coarse: Optional[Tensor], w_fine: Optional[Tensor], gate_coarse: Optional[Tensor],
        gate_fine: Optional[Tensor], eps: float, need_w_coarse: bool, need_w_fine: bool,
        need_gate_coarse: bool, need_gate_fine: bool, backend: str
        ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (grad_coarse, grad_z, grad_W [C, Cin] in the accumulation dtype, grad_w_coarse,
    grad_w_fine, grad_gate_coarse, grad_gate_fine; each of the last four [0] when not needed):
    the grad_z and grad_coarse passes, and the fusion parameters' gradients from sum_fine (the
    sums pass's) and sum_coarse (`fusion_param_grads`). `a_sum`, `s` are this rank's sums
    (`lateral_up2_fuse_backward_sums`); `s_all`, `d_gamma_all`, `count_all` the sums and count
    over the batch the statistics came from (the group's, all-reduced, when synchronised; else
    this rank's).

    With M = count_all, f = (this rank's count)/M, S1 = delta_z:
      eval:  grad_W = gamma*r*(A + s zc^T),  grad_z = W'^T (m g);
      train: grad_z = W'^T (m g) - Q z + (Q mean_z - W'^T s_all / M),
             Q = W^T diag(gamma r^2 d_gamma_all / M) W,
             grad_W = gamma*r*(A - f*(d_gamma_all*r) (W cov_z) - f*s_all delta_z^T)
                      + (sum of this rank's grad_y) mean_z^T,
             sum grad_y = gamma*r*(s - f*s_all - f*r*d_gamma_all*(W delta_z))
      (the delta_z terms vanish when the batch is this rank's alone: delta_z = 0, f = 1).
    """
    return registry.kernels("lateral_up2_fuse", backend).grad_inputs(
        grad_out, coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z, cov_z,
        delta_z, a_sum, s, s_all, d_gamma_all, sum_fine, count_all, training, bn_eps, w_coarse,
        w_fine, gate_coarse, gate_fine, eps, need_w_coarse, need_w_fine, need_gate_coarse,
        need_gate_fine)


@_lateral_up2_fuse_backward_op.register_fake
def _(grad_out, coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z, cov_z,
      delta_z, a_sum, s, s_all, d_gamma_all, sum_fine, count_all, training, bn_eps, w_coarse,
      w_fine, gate_coarse, gate_fine, eps, need_w_coarse, need_w_fine, need_gate_coarse,
      need_gate_fine, backend):
    _checks.fake_up2_pair(coarse, z, same_channels=False)
    torch._check(grad_out.dim() == 4 and grad_out.shape[1] == coarse.shape[1]
                 and grad_out.shape[2] == z.shape[2] and grad_out.shape[3] == z.shape[3],
                 lambda: "grad_out must be [N, C, 2H, 2W]")
    acc = acc_dtype(z.dtype)
    grad_w = z.new_empty((conv_weight.shape[0], conv_weight.shape[1]), dtype=acc)

    def param_grad(need, p):
        return torch.empty_like(p) if need else z.new_empty((0,), dtype=acc)
    return (torch.empty_like(coarse), torch.empty_like(z), grad_w,
            param_grad(need_w_coarse, w_coarse), param_grad(need_w_fine, w_fine),
            param_grad(need_gate_coarse, gate_coarse), param_grad(need_gate_fine, gate_fine))


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    (coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z, cov_z, delta_z,
     training, bn_eps, w_coarse, w_fine, gate_coarse, gate_fine, eps, backend,
     group_key) = inputs
    ctx.save_for_backward(coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var,
                          mean_z, cov_z, delta_z, w_coarse, w_fine, gate_coarse, gate_fine)
    ctx.training, ctx.bn_eps, ctx.eps, ctx.backend = training, bn_eps, eps, backend
    ctx.group_key = group_key


def _backward(ctx, grad_out):
    (coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z, cov_z, delta_z,
     w_coarse, w_fine, gate_coarse, gate_fine) = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_params = (need[12], need[13], need[14], need[15])
    need_sums = any(need_params)
    a_sum, s, d_gamma, sum_fine = _backward_sums_call(
        grad_out, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z, ctx.training,
        ctx.bn_eps, w_coarse, w_fine, gate_fine, ctx.eps, need_sums, ctx.backend)
    count, s_all, d_all = _batch_norm.count(z), s, d_gamma
    if ctx.group_key:  # every rank joins, whatever it needs
        count, s_all, d_all = _distributed.all_reduce_sums(ctx.group_key, count, s, d_gamma)
    grads = _backward_call(
        grad_out, coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z, cov_z,
        delta_z, a_sum, s, s_all, d_all, sum_fine, count, ctx.training, ctx.bn_eps, w_coarse,
        w_fine, gate_coarse, gate_fine, ctx.eps, *need_params, ctx.backend)
    grad_coarse, grad_z, grad_w = grads[:3]
    keep = lambda g, i: g if need[i] else None  # noqa: E731
    return (keep(grad_coarse, 0), keep(grad_z, 1),
            keep(like_param(grad_w.reshape(conv_weight.shape), conv_weight), 2),
            keep(as_dtype(d_gamma, bn_weight.dtype), 3), keep(as_dtype(s, bn_bias.dtype), 4),
            None, None, None, None, None, None, None,
            *(keep(g, i) for i, g in zip(range(12, 16), grads[3:])), None, None, None)


_lateral_up2_fuse_op.register_autograd(_backward, setup_context=_setup_context)

# the callers of the ops above (`_dispatch`): direct in plain eager, else the custom ops
_moments_call = _dispatch.direct(_lateral_moments_op)
_lateral_call = _dispatch.direct(_lateral_up2_fuse_op, _setup_context, _backward)
_backward_sums_call = _dispatch.direct(_lateral_backward_sums_op)
_backward_call = _dispatch.direct(_lateral_up2_fuse_backward_op)
