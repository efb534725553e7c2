"""bn_silu: SiLU(BatchNorm2d(x)), the BatchNorm + activation after each 3x3 smooth.

Order: public function -> custom op + checking fake -> backward op + checking fake -> autograd.

Two passes over x forward (statistics, then normalise + SiLU) and two backward (per-channel
sums, then grad_x), instead of eager's BN and SiLU passes and their saved intermediate. Only x
and per-channel vectors are saved: the BN output is recomputed in the backward, never stored.
Kernel contracts: csrc/ops.cpp (`_bn_silu_*`); the statistics are taken around a per-channel
pilot value of x (as lateral_up2_fuse does for z), so fp32 sums stay accurate for a large mean.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends, eager
from ..backends import registry
from . import _autograd_support, _batch_norm, _checks
from ._tensor import acc_dtype, empty_in_format


def bn_silu(x: Tensor, bn_weight: Tensor, bn_bias: Tensor, running_mean: Optional[Tensor],
            running_var: Optional[Tensor], training: bool, momentum: float = 0.1,
            bn_eps: float = 1e-5, *, backend: str = "auto") -> Tensor:
    """``F.silu(F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training,
    momentum, bn_eps))`` with F.batch_norm's exact semantics (running statistics updated in
    place in training, unbiased variance), without storing the BatchNorm output.

    x: [N, C, H, W]; the vectors [C]. The output has x's dtype and memory format. Backends:
    "eager" (the composition above) and "cpu"; "auto" is "cpu" for CPU tensors when the
    extension is built, else "eager" (no GPU kernels yet).
    """
    name = backends.resolve("bn_silu", backend, _checks.device_of("x", x))
    if name != "eager":
        _autograd_support.check_supported("bn_silu", x, bn_weight, bn_bias)
    _checks.momentum_value(momentum)  # the op does not take it: checked here, on every path
    if name == "eager":
        _checks.bn_silu(x, bn_weight, bn_bias, running_mean, running_var, training, bn_eps)
        return eager.bn_silu(x, bn_weight, bn_bias, running_mean, running_var, training,
                             momentum, bn_eps)
    _checks.training_flag(training)  # the schema's bool would reject it less clearly
    y, mean, var = torch.ops.litefpn.bn_silu(x, bn_weight, bn_bias, running_mean, running_var,
                                             training, float(bn_eps), name)
    if training and running_mean is not None and x.numel() > 0:
        _batch_norm.update_running_stats(running_mean, running_var, mean, var,
                                         _batch_norm.count(x), momentum)
    return y


# ----------------------------------------------------------------------------- forward op
@torch.library.custom_op("litefpn::bn_silu", mutates_args=())
def _bn_silu_op(x: Tensor, bn_weight: Tensor, bn_bias: Tensor, running_mean: Optional[Tensor],
                running_var: Optional[Tensor], training: bool, bn_eps: float, backend: str
                ) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (y, mean, var): the batch mean and biased variance ([C], accumulation dtype) in
    training, for the backward and for `bn_silu`'s running-statistics update; [0] in eval."""
    _checks.bn_silu(x, bn_weight, bn_bias, running_mean, running_var, training, bn_eps)
    acc = acc_dtype(x.dtype)
    mean, var = x.new_empty((0,), dtype=acc), x.new_empty((0,), dtype=acc)
    if x.numel() == 0:
        return empty_in_format(x, x.shape), mean, var
    k = registry.kernels("bn_silu", backend)
    if training:
        center = _batch_norm.pilot(x, acc)
        s1, s2 = k.stats(x, center)
        mean, var = _batch_norm.centred_moments(s1, s2, center, _batch_norm.count(x))
        scale, shift, _ = _batch_norm.affine(bn_weight, bn_bias, mean, var, bn_eps, acc)
    else:
        scale, shift, _ = _batch_norm.affine(bn_weight, bn_bias, running_mean.to(acc),
                                             running_var.to(acc), bn_eps, acc)
    return k.fwd(x, scale, shift), mean, var


@_bn_silu_op.register_fake
def _(x, bn_weight, bn_bias, running_mean, running_var, training, bn_eps, backend):
    _checks.bn_silu(x, bn_weight, bn_bias, running_mean, running_var, training, bn_eps)
    stats = (x.shape[1],) if training and x.numel() > 0 else (0,)
    acc = acc_dtype(x.dtype)
    return (empty_in_format(x, x.shape), x.new_empty(stats, dtype=acc),
            x.new_empty(stats, dtype=acc))


# ----------------------------------------------------------------------------- backward op
@torch.library.custom_op("litefpn::bn_silu_backward", mutates_args=())
def _bn_silu_backward_op(grad_out: Tensor, x: Tensor, bn_weight: Tensor, bn_bias: Tensor,
                         mean: Tensor, var: Tensor, training: bool, bn_eps: float, backend: str
                         ) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (grad_x, grad_bn_weight, grad_bn_bias); `mean`, `var` are the statistics the forward
    normalised with (batch ones in training, running ones in eval).

    With a = BN(x), dz = grad_out * silu'(a), r = 1/sqrt(var + eps), M = N*H*W and the kernel
    sums s1 = sum dz, s2 = sum dz*(x - mean):  d_bias = s1, d_weight = r*s2;
    train: grad_x = gamma*r*(dz - s1/M - (x - mean)*r^2*s2/M);  eval: grad_x = gamma*r*dz.
    """
    acc = acc_dtype(x.dtype)
    if x.numel() == 0:
        return torch.zeros_like(x), torch.zeros_like(bn_weight), torch.zeros_like(bn_bias)
    k = registry.kernels("bn_silu", backend)
    mean, var = mean.to(acc).contiguous(), var.to(acc)
    scale, shift, r = _batch_norm.affine(bn_weight, bn_bias, mean, var, bn_eps, acc)
    s1, s2 = k.bwd_sums(grad_out, x, scale, shift, mean)
    if training:
        count = _batch_norm.count(x)
        k_x = -scale * r * r * s2 / count
        k_0 = -mean * k_x - scale * s1 / count
    else:
        k_x = k_0 = torch.zeros_like(scale)
    grad_x = k.bwd(grad_out, x, scale, shift, scale, k_x.contiguous(), k_0.contiguous())
    return grad_x, (r * s2).to(bn_weight.dtype), s1.to(bn_bias.dtype)


@_bn_silu_backward_op.register_fake
def _(grad_out, x, bn_weight, bn_bias, mean, var, training, bn_eps, backend):
    torch._check(grad_out.shape == x.shape, lambda: "grad_out must be shaped like x")
    _checks.fake_vector("bn_weight", bn_weight, x.shape[1])
    return empty_in_format(x, x.shape), torch.empty_like(bn_weight), torch.empty_like(bn_bias)


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, bn_weight, bn_bias, running_mean, running_var, training, bn_eps, backend = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    if training:  # the batch statistics; the running ones are updated in place after the op
        running_mean = running_var = None
    ctx.save_for_backward(x, bn_weight, bn_bias, mean, var, running_mean, running_var)
    ctx.training, ctx.bn_eps, ctx.backend = training, bn_eps, backend


def _backward(ctx, grad_out, _grad_mean, _grad_var):
    x, bn_weight, bn_bias, mean, var, running_mean, running_var = ctx.saved_tensors
    if not ctx.training:
        mean, var = running_mean, running_var
    grad_x, grad_w, grad_b = torch.ops.litefpn.bn_silu_backward(
        grad_out, x, bn_weight, bn_bias, mean, var, ctx.training, ctx.bn_eps, ctx.backend)
    need = ctx.needs_input_grad
    return (grad_x if need[0] else None, grad_w if need[1] else None,
            grad_b if need[2] else None, None, None, None, None, None)


_bn_silu_op.register_autograd(_backward, setup_context=_setup_context)
