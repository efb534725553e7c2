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
from . import _autograd_support, _batch_norm, _checks, _dispatch, _distributed
from ._fusion import fusion_coefs, fusion_param_grads
from ._tensor import acc_dtype, empty_in_format, like_param, sum_shape, to_acc_contiguous


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
        mean_z, cov_z = _moments_call(z.detach(), name)
        stat_mean, stat_var = _batch_norm.y_moments(_weight(conv_weight.detach(), acc), mean_z,
                                                    cov_z)
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
    mean_l, cov_l = _moments_call(z.detach(), args[-1])
    mean_z, cov_z, total, delta = _distributed.global_moments(key, _batch_norm.count(z), mean_l,
                                                              cov_l)
    stat_mean, stat_var = _batch_norm.y_moments(_weight(conv_weight.detach(), acc), mean_z, cov_z)
    _batch_norm.update_running_stats(running_mean, running_var, stat_mean, stat_var, total,
                                     momentum)
    return _lateral_call(
        coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z,
        cov_l + torch.outer(delta, delta), delta, True, float(bn_eps), *args, key)


def _weight(conv_weight, acc):
    return conv_weight.reshape(conv_weight.shape[0], conv_weight.shape[1]).to(acc)


def _out_like_z(coarse, z):
    """The output [N, C, 2H, 2W] of a lateral level: z's dtype and memory format."""
    n, _, h2, w2 = z.shape
    return empty_in_format(z, (n, coarse.shape[1], h2, w2))


def _fine_factor(n, c, w_coarse, w_fine, gate_fine, eps, acc, device):
    """m[n, c] = beta*gate_fine, the factor on BN's output in the fused sum ([N, C],
    contiguous)."""
    if w_coarse is None:
        return (torch.ones((n, c), dtype=acc, device=device) if gate_fine is None
                else gate_fine.to(acc).contiguous())
    beta = fusion_coefs(w_coarse, w_fine, eps, acc)[1]
    return (beta.expand(n, c) if gate_fine is None else gate_fine.to(acc) * beta).contiguous()


# ----------------------------------------------------------------------------- statistics op
@torch.library.custom_op("litefpn::lateral_moments", mutates_args=())
def _lateral_moments_op(z: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """-> (mean_z [Cin], biased cov_z [Cin, Cin]) over (N, H, W) in the accumulation dtype
    (zeros for an empty batch): the statistics pass (one gram pass around a pilot of z)."""
    _checks.four_d("z", z)
    acc = acc_dtype(z.dtype)
    c_in = z.shape[1]
    if z.numel() == 0:
        return z.new_zeros((c_in,), dtype=acc), z.new_zeros((c_in, c_in), dtype=acc)
    return _batch_norm.z_moments(registry.kernels("lateral_up2_fuse", backend).gram, z, acc)


@_lateral_moments_op.register_fake
def _(z, backend):
    _checks.four_d("z", z)
    acc = acc_dtype(z.dtype)
    c_in = z.shape[1]
    return z.new_empty((c_in,), dtype=acc), z.new_empty((c_in, c_in), dtype=acc)


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
    acc = acc_dtype(z.dtype)
    k = registry.kernels("lateral_up2_fuse", backend)
    scale, shift, _ = _batch_norm.affine(bn_weight, bn_bias, stat_mean.to(acc), stat_var.to(acc),
                                         bn_eps, acc)
    return k.fwd(coarse, z, (scale[:, None] * _weight(conv_weight, acc)).contiguous(),
                 shift.contiguous(), to_acc_contiguous(w_coarse, acc),
                 to_acc_contiguous(w_fine, acc), to_acc_contiguous(gate_coarse, acc),
                 to_acc_contiguous(gate_fine, acc), float(eps))


@_lateral_up2_fuse_op.register_fake
def _(coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z, cov_z, delta_z,
      training, bn_eps, w_coarse, w_fine, gate_coarse, gate_fine, eps, backend, group_key):
    _checks.lateral_up2_fuse(coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var,
                             training, None, bn_eps, w_coarse, w_fine, gate_coarse, gate_fine,
                             eps)
    return _out_like_z(coarse, z)


# ----------------------------------------------------------------------------- backward ops
# Both take the [C]- and [C, Cin]-sized operands computed once per backward (`_folded`), in the
# accumulation dtype: W (the 1x1 weight as [C, Cin]), W' = diag(gamma r) W, gamma*r, r, m (the
# fine factor beta*gate_fine, [N, C]) and zc, the centre of z's sums (mean_z in training, a
# pilot of z in eval).
@torch.library.custom_op("litefpn::lateral_up2_fuse_backward_sums", mutates_args=())
def _lateral_backward_sums_op(
        grad_out: Tensor, z: Tensor, weight: Tensor, scaled_w: Tensor, r: Tensor,
        shift: Tensor, mean_y: Tensor, m: Tensor, zc: Tensor, need_sums: bool, backend: str
        ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (A [C, Cin], s [C], d_gamma [C], sum_fine [N, C] or [0]): the g z^T pass over this
    rank's batch. With h = m*g the gradient at BN's output, A = sum_n m_n sum_p g (z - zc)^T and
    s = sum_n m_n sum_p g: d_gamma = r*(rowsum(W o A) + (W zc - mean_y)*s) (= grad_bn_weight),
    s = grad_bn_bias, sum_fine = sum_p g * BN(conv(z)) per (n, c) for the fusion parameters
    (`shift` = beta - mean_y*gamma*r, BN's folded bias)."""
    n, (c, c_in) = z.shape[0], weight.shape
    if z.numel() == 0:
        return (weight.new_zeros((c, c_in)), weight.new_zeros((c,)), weight.new_zeros((c,)),
                weight.new_zeros((n, c) if need_sums else (0,)))
    a_n, s_n = registry.kernels("lateral_up2_fuse", backend).gram(grad_out, z, None, zc)
    a_sum = (m[:, :, None] * a_n).sum(0)  # [N, C, Cin], [N, C] -> [C, Cin]
    s = (m * s_n).sum(0)
    d_gamma = r * ((weight * a_sum).sum(1) + (weight @ zc - mean_y) * s)
    if need_sums:  # sum_p g * BN(conv(z)) = rowsum(W' o A_n) + (W' zc + b') * s_n
        sum_fine = (scaled_w * a_n).sum(2) + (scaled_w @ zc + shift) * s_n
    else:
        sum_fine = weight.new_empty((0,))
    return a_sum, s, d_gamma, sum_fine


@_lateral_backward_sums_op.register_fake
def _(grad_out, z, weight, scaled_w, r, shift, mean_y, m, zc, need_sums, backend):
    torch._check(grad_out.dim() == 4 and grad_out.shape[0] == z.shape[0]
                 and grad_out.shape[1] == weight.shape[0] and grad_out.shape[2] == z.shape[2]
                 and grad_out.shape[3] == z.shape[3], lambda: "grad_out must be [N, C, 2H, 2W]")
    c, c_in = weight.shape
    return (weight.new_empty((c, c_in)), weight.new_empty((c,)), weight.new_empty((c,)),
            weight.new_empty((z.shape[0], c) if need_sums else (0,)))


@torch.library.custom_op("litefpn::lateral_up2_fuse_backward", mutates_args=())
def _lateral_up2_fuse_backward_op(
        grad_out: Tensor, coarse: Tensor, z: Tensor, weight: Tensor, scaled_w: Tensor,
        gamma_r: Tensor, r: Tensor, m: Tensor, zc: Tensor, cov_z: Tensor, delta_z: Tensor,
        a_sum: Tensor, s: Tensor, s_all: Tensor, d_gamma_all: Tensor, count_all: int,
        training: bool, w_coarse: Optional[Tensor], w_fine: Optional[Tensor],
        gate_coarse: Optional[Tensor], eps: float, need_sums: bool, backend: str
        ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (grad_coarse, grad_z, grad_W [C, Cin] in the accumulation dtype, sum_coarse [N, C] or
    [0]): the grad_z and grad_coarse passes. `a_sum`, `s` are this rank's sums
    (`lateral_up2_fuse_backward_sums`); `s_all`, `d_gamma_all`, `count_all` the sums and count
    over the batch the statistics came from (the group's, all-reduced, when synchronised; else
    this rank's). In training zc is mean_z.

    With W' = diag(gamma r) W, M = count_all, f = (this rank's count)/M, S1 = delta_z:
      eval:  grad_W = gamma*r*(A + s zc^T),  grad_z = W'^T (m g);
      train: grad_z = W'^T (m g) - Q z + (Q mean_z - W'^T s_all / M),
             Q = W^T diag(gamma r^2 d_gamma_all / M) W,
             grad_W = gamma*r*(A - f*(d_gamma_all*r) (W cov_z) - f*s_all delta_z^T)
                      + (sum of this rank's grad_y) mean_z^T,
             sum grad_y = gamma*r*(s - f*s_all - f*r*d_gamma_all*(W delta_z))
      (the delta_z terms vanish when the batch is this rank's alone: delta_z = 0, f = 1).
    """
    acc = weight.dtype
    if z.numel() == 0:
        return (torch.zeros_like(coarse), torch.zeros_like(z), torch.zeros_like(weight),
                weight.new_zeros(sum_shape(coarse, need_sums)))
    k = registry.kernels("lateral_up2_fuse", backend)
    if training:
        mean_z = zc
        frac = _batch_norm.count(z) / count_all
        grad_w = a_sum - (d_gamma_all * r * frac)[:, None] * (weight @ cov_z)
        if delta_z.numel() > 0:
            grad_w = grad_w - torch.outer(s_all * frac, delta_z)
            local_dy = s - frac * s_all - frac * r * d_gamma_all * (weight @ delta_z)
            grad_w = grad_w + torch.outer(local_dy, mean_z)
        grad_w = gamma_r[:, None] * grad_w
        quad = weight.t() @ ((gamma_r * r * d_gamma_all / count_all)[:, None] * weight)
        shift = quad @ mean_z - scaled_w.t() @ s_all / count_all
        grad_z = k.grad_z(grad_out, z, scaled_w, m, quad.contiguous(), shift.contiguous())
    else:
        grad_w = gamma_r[:, None] * (a_sum + torch.outer(s, zc))
        grad_z = k.grad_z(grad_out, z, scaled_w, m, None, None)
    grad_coarse, sum_coarse = k.bwd_coarse(
        grad_out, coarse, to_acc_contiguous(w_coarse, acc), to_acc_contiguous(w_fine, acc),
        to_acc_contiguous(gate_coarse, acc), float(eps), need_sums)
    return grad_coarse, grad_z, grad_w, sum_coarse


@_lateral_up2_fuse_backward_op.register_fake
def _(grad_out, coarse, z, weight, scaled_w, gamma_r, r, m, zc, cov_z, delta_z, a_sum, s, s_all,
      d_gamma_all, count_all, training, w_coarse, w_fine, gate_coarse, eps, need_sums, backend):
    _checks.fake_up2_pair(coarse, z, same_channels=False)
    torch._check(grad_out.dim() == 4 and grad_out.shape[1] == coarse.shape[1]
                 and grad_out.shape[2] == z.shape[2] and grad_out.shape[3] == z.shape[3],
                 lambda: "grad_out must be [N, C, 2H, 2W]")
    sums = weight.new_empty(sum_shape(coarse, need_sums))
    return torch.empty_like(coarse), torch.empty_like(z), torch.empty_like(weight), sums


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    (coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z, cov_z, delta_z,
     training, bn_eps, w_coarse, w_fine, gate_coarse, gate_fine, eps, backend,
     group_key) = inputs
    ctx.save_for_backward(coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var,
                          mean_z, cov_z, delta_z, w_coarse, w_fine, gate_coarse, gate_fine)
    ctx.training, ctx.bn_eps, ctx.eps, ctx.backend = training, bn_eps, eps, backend
    ctx.group_key = group_key


def _folded(z, conv_weight, bn_weight, bn_bias, mean_y, stat_var, mean_z, training, bn_eps,
            w_coarse, w_fine, gate_fine, eps):
    """The small operands both backward passes share, once: (W, W', gamma*r, BN's folded
    shift, r, m, zc), BN folded as the forward folds it (`_batch_norm.affine`); mean_y is the
    statistics' mean in the accumulation dtype."""
    acc = acc_dtype(z.dtype)
    n, c = z.shape[0], conv_weight.shape[0]
    weight = _weight(conv_weight, acc)
    gamma_r, shift, r = _batch_norm.affine(bn_weight, bn_bias, mean_y, stat_var.to(acc), bn_eps,
                                           acc)
    scaled_w = gamma_r[:, None] * weight  # W'
    m = _fine_factor(n, c, w_coarse, w_fine, gate_fine, eps, acc, z.device)
    if training:
        zc = mean_z
    else:  # an empty batch has no pilot value (and no sums to centre)
        zc = _batch_norm.pilot(z, acc) if z.numel() else z.new_zeros((z.shape[1],), dtype=acc)
    return weight.contiguous(), scaled_w, gamma_r, shift, r, m, zc.contiguous()


def _backward(ctx, grad_out):
    (coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z, cov_z, delta_z,
     w_coarse, w_fine, gate_coarse, gate_fine) = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_params = (need[12], need[13], need[14], need[15])
    need_sums = any(need_params)
    mean_y = stat_mean.to(acc_dtype(z.dtype))
    weight, scaled_w, gamma_r, shift, r, m, zc = _folded(
        z, conv_weight, bn_weight, bn_bias, mean_y, stat_var, mean_z, ctx.training, ctx.bn_eps,
        w_coarse, w_fine, gate_fine, ctx.eps)
    a_sum, s, d_gamma, sum_fine = _backward_sums_call(
        grad_out, z, weight, scaled_w, r, shift, mean_y, m, zc, need_sums, ctx.backend)
    count, s_all, d_all = _batch_norm.count(z), s, d_gamma
    if ctx.group_key:  # every rank joins, whatever it needs
        count, s_all, d_all = _distributed.all_reduce_sums(ctx.group_key, count, s, d_gamma)
    grad_coarse, grad_z, grad_w, sum_coarse = _backward_call(
        grad_out, coarse, z, weight, scaled_w, gamma_r, r, m, zc, cov_z, delta_z, a_sum, s,
        s_all, d_all, count, ctx.training, w_coarse, w_fine, gate_coarse, ctx.eps, need_sums,
        ctx.backend)
    grad_wc = grad_wf = grad_gc = grad_gf = None
    if need_sums:
        grad_wc, grad_wf, grad_gc, grad_gf = fusion_param_grads(
            sum_coarse, sum_fine, w_coarse, w_fine, gate_coarse, gate_fine, ctx.eps, need_params)
    keep = lambda g, i: g if need[i] else None  # noqa: E731
    return (keep(grad_coarse, 0), keep(grad_z, 1),
            keep(like_param(grad_w.reshape(conv_weight.shape), conv_weight), 2),
            keep(d_gamma.to(bn_weight.dtype), 3), keep(s.to(bn_bias.dtype), 4),
            None, None, None, None, None, None, None,
            grad_wc, grad_wf, grad_gc, grad_gf, None, None, None)


_lateral_up2_fuse_op.register_autograd(_backward, setup_context=_setup_context)

# the callers of the ops above (`_dispatch`): direct in plain eager, else the custom ops
_moments_call = _dispatch.direct(_lateral_moments_op)
_lateral_call = _dispatch.direct(_lateral_up2_fuse_op, _setup_context, _backward)
_backward_sums_call = _dispatch.direct(_lateral_backward_sums_op)
_backward_call = _dispatch.direct(_lateral_up2_fuse_backward_op)
