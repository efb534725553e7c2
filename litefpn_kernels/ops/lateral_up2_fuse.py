"""lateral_up2_fuse: one top-down level, ``alpha*gc*Up2(coarse) + beta*gf*BN(conv1x1(z))``.

Order: public function -> custom op + checking fake -> backward op + checking fake -> autograd.

The kernels (contracts `_lateral_*`, `_up2_fuse_bwd_coarse` in csrc/ops.cpp) never write
y = conv1x1(z): BatchNorm is folded into the 1x1 weight (W' = diag(gamma*r) W,
b' = beta - mean*gamma*r, r = 1/sqrt(var+eps)) and, in training, the batch statistics of y come
from the mean and covariance of z: mean_y = W mean_z, var_y = diag(W cov_z W^T). Only small
[C, Cin]-sized math runs here (`_batch_norm.py`). The forward op returns y's batch moments too,
so the running-statistics update and the backward reuse them instead of recomputing them.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends, eager
from ..backends import registry
from ..eager import FUSION_EPS, fusion_weights
from . import _autograd_support, _batch_norm, _checks
from ._fusion import fusion_param_grads
from ._tensor import acc_dtype, empty_in_format, like_param, sum_shape, to_acc_contiguous


def lateral_up2_fuse(coarse: Tensor, z: Tensor, conv_weight: Tensor, bn_weight: Tensor,
                     bn_bias: Tensor, running_mean: Optional[Tensor],
                     running_var: Optional[Tensor], training: bool, momentum: float = 0.1,
                     bn_eps: float = 1e-5, w_coarse: Optional[Tensor] = None,
                     w_fine: Optional[Tensor] = None, *, eps: float = FUSION_EPS,
                     gate_coarse: Optional[Tensor] = None, gate_fine: Optional[Tensor] = None,
                     backend: str = "auto") -> Tensor:
    """``alpha*gate_coarse*Up2(coarse) + beta*gate_fine*BN(conv1x1(z))`` without writing the
    convolution's output or the upsampled map.

    BatchNorm follows `F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training,
    momentum, bn_eps)`: eval normalises with the running statistics; training with the batch's
    (biased variance) and updates running_mean / running_var in place (unbiased variance), unless
    they are None. z: [N, Cin, 2H, 2W]; coarse: [N, C, H, W]; conv_weight: [C, Cin, 1, 1];
    the rest as in `up2_fuse`. The output has z's dtype and memory format.
    """
    name = backends.resolve("lateral_up2_fuse", backend, _checks.device_of("z", z))
    if name != "eager":
        _autograd_support.check_supported("lateral_up2_fuse", coarse, z, conv_weight, bn_weight,
                                          bn_bias, w_coarse, w_fine, gate_coarse, gate_fine)
    if name == "eager":
        _checks.lateral_up2_fuse(coarse, z, conv_weight, bn_weight, bn_bias, running_mean,
                                 running_var, training, momentum, bn_eps, w_coarse, w_fine,
                                 gate_coarse, gate_fine, eps)
        return eager.lateral_up2_fuse(coarse, z, conv_weight, bn_weight, bn_bias, running_mean,
                                      running_var, training, momentum, bn_eps, w_coarse, w_fine,
                                      eps, gate_coarse, gate_fine)
    _checks.training_flag(training)  # the schema's bool would reject it less clearly
    out, _mean_z, _cov_z, mean_y, var_y = torch.ops.litefpn.lateral_up2_fuse(
        coarse, z, conv_weight, bn_weight, bn_bias, running_mean, running_var, training,
        float(momentum), float(bn_eps), w_coarse, w_fine, gate_coarse, gate_fine, float(eps), name)
    if training and running_mean is not None and z.numel() > 0:
        _batch_norm.update_running_stats(running_mean, running_var, mean_y, var_y,
                                         _batch_norm.count(z), momentum)
    return out


def _out_like_z(coarse, z):
    """The output [N, C, 2H, 2W] of a lateral level: z's dtype and memory format."""
    n, _, h2, w2 = z.shape
    return empty_in_format(z, (n, coarse.shape[1], h2, w2))


# ----------------------------------------------------------------------------- forward op
@torch.library.custom_op("litefpn::lateral_up2_fuse", mutates_args=())
def _lateral_up2_fuse_op(coarse: Tensor, z: Tensor, conv_weight: Tensor, bn_weight: Tensor,
                         bn_bias: Tensor, running_mean: Optional[Tensor],
                         running_var: Optional[Tensor], training: bool, momentum: float,
                         bn_eps: float, w_coarse: Optional[Tensor], w_fine: Optional[Tensor],
                         gate_coarse: Optional[Tensor], gate_fine: Optional[Tensor], eps: float,
                         backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (out, mean_z, cov_z, mean_y, var_y). Functional: in training, the moments of z
    ([Cin], [Cin, Cin]) are saved for the backward instead of any activation, and those of y
    ([C], [C]; biased variance) serve the backward and `lateral_up2_fuse`'s running-statistics
    update; in eval all four are empty ([0], [0, 0], [0], [0])."""
    _checks.lateral_up2_fuse(coarse, z, conv_weight, bn_weight, bn_bias, running_mean,
                             running_var, training, momentum, bn_eps, w_coarse, w_fine,
                             gate_coarse, gate_fine, eps)
    acc = acc_dtype(z.dtype)
    c, c_in = conv_weight.shape[:2]
    mean_z = z.new_empty((0,), dtype=acc)
    cov_z = z.new_empty((0, 0), dtype=acc)
    mean_y, var_y = z.new_empty((0,), dtype=acc), z.new_empty((0,), dtype=acc)
    if z.numel() == 0:  # F.batch_norm leaves the running statistics alone on an empty batch
        return _out_like_z(coarse, z), mean_z, cov_z, mean_y, var_y
    k = registry.kernels("lateral_up2_fuse", backend)
    weight = conv_weight.reshape(c, c_in).to(acc)
    if training:
        mean_z, cov_z = _batch_norm.z_moments(k.gram, z, acc)
        mean_y, var_y = _batch_norm.y_moments(weight, mean_z, cov_z)
        stat_mean, stat_var = mean_y, var_y
    else:
        stat_mean, stat_var = running_mean.to(acc), running_var.to(acc)
    scale = bn_weight.to(acc) * torch.rsqrt(stat_var + bn_eps)
    shift = bn_bias.to(acc) - stat_mean * scale
    out = k.fwd(coarse, z, (scale[:, None] * weight).contiguous(), shift.contiguous(),
                to_acc_contiguous(w_coarse, acc), to_acc_contiguous(w_fine, acc),
                to_acc_contiguous(gate_coarse, acc), to_acc_contiguous(gate_fine, acc),
                float(eps))
    return out, mean_z, cov_z, mean_y, var_y


@_lateral_up2_fuse_op.register_fake
def _(coarse, z, conv_weight, bn_weight, bn_bias, running_mean, running_var, training, momentum,
      bn_eps, w_coarse, w_fine, gate_coarse, gate_fine, eps, backend):
    _checks.lateral_up2_fuse(coarse, z, conv_weight, bn_weight, bn_bias, running_mean,
                             running_var, training, momentum, bn_eps, w_coarse, w_fine,
                             gate_coarse, gate_fine, eps)
    c, c_in = coarse.shape[1], z.shape[1]
    acc = acc_dtype(z.dtype)
    stats = training and z.numel() > 0
    return (_out_like_z(coarse, z), z.new_empty((c_in,) if stats else (0,), dtype=acc),
            z.new_empty((c_in, c_in) if stats else (0, 0), dtype=acc),
            z.new_empty((c,) if stats else (0,), dtype=acc),
            z.new_empty((c,) if stats else (0,), dtype=acc))


# ----------------------------------------------------------------------------- backward op
@torch.library.custom_op("litefpn::lateral_up2_fuse_backward", mutates_args=())
def _lateral_up2_fuse_backward_op(
        grad_out: Tensor, coarse: Tensor, z: Tensor, conv_weight: Tensor, bn_weight: Tensor,
        bn_bias: Tensor, stat_mean: Tensor, stat_var: Tensor, mean_z: Tensor, cov_z: Tensor,
        training: bool, bn_eps: float, w_coarse: Optional[Tensor], w_fine: Optional[Tensor],
        gate_coarse: Optional[Tensor], gate_fine: Optional[Tensor], eps: float, need_sums: bool,
        backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (grad_coarse, grad_z, grad_conv_weight, grad_bn_weight, grad_bn_bias, sum_coarse,
    sum_fine); the sums ([N, C], or [0] without need_sums) feed `fusion_param_grads`.
    `stat_mean`, `stat_var` are the statistics of y the forward normalised with: the batch's
    (mean_y, var_y) in training, the running ones in eval.

    With h = m*g the gradient at BN's output (m[n, c] = beta*gate_fine), A = sum_n m_n A_n and
    s = sum_n m_n s_n from the kernel sums A_n = sum_p g (z - zc)^T, s_n = sum_p g (zc: the
    centre of z's sums: mean_z in training, a pilot value in eval):
      d_gamma = r*(rowsum(W o A) + (W zc - mean_y)*s),  d_beta = s;
      eval:  grad_W = gamma*r*(A + s zc^T),  grad_z = W'^T (m g);
      train: grad_W = gamma*r*(A - (d_gamma*r) (W cov_z)),
             grad_z = W'^T (m g) - Q z + (Q mean_z - W'^T s / M),  Q = W^T diag(gamma r^2 d_gamma / M) W.
    """
    acc = acc_dtype(z.dtype)
    n, c = coarse.shape[:2]
    c_in = z.shape[1]
    if z.numel() == 0:
        sums = z.new_zeros((n, c) if need_sums else (0,), dtype=acc)
        return (torch.zeros_like(coarse), torch.zeros_like(z), torch.zeros_like(conv_weight),
                torch.zeros_like(bn_weight), torch.zeros_like(bn_bias), sums, sums.clone())
    k = registry.kernels("lateral_up2_fuse", backend)
    weight = conv_weight.reshape(c, c_in).to(acc)
    gamma = bn_weight.to(acc)
    mean_y, var_y = stat_mean.to(acc), stat_var.to(acc)
    zc = mean_z if training else _batch_norm.pilot(z, acc)
    r = torch.rsqrt(var_y + bn_eps)
    scaled_w = (gamma * r)[:, None] * weight  # W'
    m = torch.ones((n, c), dtype=acc, device=z.device)  # beta * gate_fine
    if gate_fine is not None:
        m = m * gate_fine.to(acc)
    if w_coarse is not None:
        m = m * fusion_weights(w_coarse.to(acc), w_fine.to(acc), eps)[1]

    a_n, s_n = k.gram(grad_out, z, None, zc.contiguous())  # [N, C, Cin], [N, C]
    a_sum = (m[:, :, None] * a_n).sum(0)
    s = (m * s_n).sum(0)
    d_gamma = r * ((weight * a_sum).sum(1) + (weight @ zc - mean_y) * s)
    if training:
        count = _batch_norm.count(z)
        grad_w = (gamma * r)[:, None] * (a_sum - (d_gamma * r)[:, None] * (weight @ cov_z))
        quad = weight.t() @ ((gamma * r * r * d_gamma / count)[:, None] * weight)
        shift = quad @ mean_z - scaled_w.t() @ s / count
        grad_z = k.grad_z(grad_out, z, scaled_w.contiguous(), m.contiguous(),
                          quad.contiguous(), shift.contiguous())
    else:
        grad_w = (gamma * r)[:, None] * (a_sum + torch.outer(s, zc))
        grad_z = k.grad_z(grad_out, z, scaled_w.contiguous(), m.contiguous(), None, None)
    grad_coarse, sum_coarse = k.bwd_coarse(
        grad_out, coarse, to_acc_contiguous(w_coarse, acc), to_acc_contiguous(w_fine, acc),
        to_acc_contiguous(gate_coarse, acc), float(eps), need_sums)
    if need_sums:  # sum_p g * BN(conv(z)) = rowsum(W' o A_n) + (W' zc + b') * s_n
        bias = bn_bias.to(acc) - mean_y * gamma * r
        sum_fine = (scaled_w * a_n).sum(2) + (scaled_w @ zc + bias) * s_n
    else:
        sum_fine = sum_coarse.new_empty((0,))
    return (grad_coarse, grad_z, like_param(grad_w.reshape(conv_weight.shape), conv_weight),
            d_gamma.to(bn_weight.dtype), s.to(bn_bias.dtype), sum_coarse, sum_fine)


@_lateral_up2_fuse_backward_op.register_fake
def _(grad_out, coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z, cov_z,
      training, bn_eps, w_coarse, w_fine, gate_coarse, gate_fine, eps, need_sums, backend):
    _checks.fake_up2_pair(coarse, z, same_channels=False)
    torch._check(grad_out.dim() == 4 and grad_out.shape[1] == coarse.shape[1]
                 and grad_out.shape[2] == z.shape[2] and grad_out.shape[3] == z.shape[3],
                 lambda: "grad_out must be [N, C, 2H, 2W]")
    sums = z.new_empty(sum_shape(coarse, need_sums), dtype=acc_dtype(z.dtype))
    return (torch.empty_like(coarse), torch.empty_like(z), torch.empty_like(conv_weight),
            torch.empty_like(bn_weight), torch.empty_like(bn_bias), sums, torch.empty_like(sums))


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    (coarse, z, conv_weight, bn_weight, bn_bias, running_mean, running_var, training, momentum,
     bn_eps, w_coarse, w_fine, gate_coarse, gate_fine, eps, backend) = inputs
    _, mean_z, cov_z, mean_y, var_y = output
    ctx.mark_non_differentiable(mean_z, cov_z, mean_y, var_y)
    # The backward normalises with what the forward did: y's batch moments in training (the
    # running statistics are updated in place right after this op, so they are not saved), the
    # running statistics in eval.
    stat_mean, stat_var = (mean_y, var_y) if training else (running_mean, running_var)
    ctx.save_for_backward(coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var,
                          mean_z, cov_z, w_coarse, w_fine, gate_coarse, gate_fine)
    ctx.training, ctx.bn_eps, ctx.eps, ctx.backend = training, bn_eps, eps, backend


def _backward(ctx, grad_out, _grad_mean_z, _grad_cov_z, _grad_mean_y, _grad_var_y):
    (coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z, cov_z,
     w_coarse, w_fine, gate_coarse, gate_fine) = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_params = (need[10], need[11], need[12], need[13])
    (grad_coarse, grad_z, grad_w, grad_gamma, grad_beta, sum_coarse,
     sum_fine) = torch.ops.litefpn.lateral_up2_fuse_backward(
        grad_out, coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z,
        cov_z, ctx.training, ctx.bn_eps, w_coarse, w_fine, gate_coarse, gate_fine, ctx.eps,
        any(need_params), ctx.backend)
    grad_wc = grad_wf = grad_gc = grad_gf = None
    if any(need_params):
        grad_wc, grad_wf, grad_gc, grad_gf = fusion_param_grads(
            sum_coarse, sum_fine, w_coarse, w_fine, gate_coarse, gate_fine, ctx.eps, need_params)
    keep = lambda g, i: g if need[i] else None  # noqa: E731
    return (keep(grad_coarse, 0), keep(grad_z, 1), keep(grad_w, 2), keep(grad_gamma, 3),
            keep(grad_beta, 4), None, None, None, None, None,
            grad_wc, grad_wf, grad_gc, grad_gf, None, None)


_lateral_up2_fuse_op.register_autograd(_backward, setup_context=_setup_context)
