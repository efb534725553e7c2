"""The fused operators, registered with torch.library (namespace `litefpn`).

`up2_fuse(coarse, fine, ...)` computes ``alpha*gate_coarse*Up2(coarse) + beta*gate_fine*fine``
in one pass; `lateral_up2_fuse` adds the 1x1 lateral conv + BatchNorm in front of `fine`;
`bn_silu` is the smooths' BatchNorm + SiLU without a stored BatchNorm output. Each backend is a
kernel behind the same custom op (`cpu` and `cuda` in `csrc/`, `triton` in
`litefpn_kernels/triton/`); `eager` is the plain PyTorch composition (`functional.py`, or
`F.batch_norm` + `F.silu` for bn_silu), the reference every backend is tested against.

Layering, one concern each:
  * `_check_up2_fuse` - argument validation with errors that name the argument;
  * `torch.ops.litefpn.up2_fuse` / `up2_fuse_backward` - custom ops with fake kernels, so
    opcheck and torch.compile(fullgraph=True) see through them;
  * `_fusion_param_grads` - the only place that turns the kernels' per-(n, c) sums into the
    gradients of the fusion weights and gates (softplus chain rule), for every backend.
"""
from types import SimpleNamespace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from .functional import (FUSION_EPS, fusion_weights, lateral_up2_fuse_reference,
                         up2_fuse_reference)

__all__ = ["up2_fuse", "lateral_up2_fuse", "bn_silu"]

#: activation dtypes the fused kernels take (float64 is for gradcheck: CPU and the interpreter).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- validation
def _check_4d(name, t):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D [N, C, H, W] tensor, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has unsupported dtype {t.dtype}; expected one of "
                        f"{[str(d) for d in SUPPORTED_DTYPES]}")


def _check_same(name, t, ref_name, ref):
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def _check_up2_pair(coarse_name, coarse, fine_name, fine, same_channels=True):
    """`fine` must be exactly twice `coarse` spatially, with the same batch (and channels)."""
    _check_4d(coarse_name, coarse)
    _check_4d(fine_name, fine)
    _check_same(fine_name, fine, coarse_name, coarse)
    n, c, h, w = coarse.shape
    if fine.shape[0] != n:
        raise ValueError(f"{fine_name} has batch {fine.shape[0]} but {coarse_name} has batch {n}")
    if same_channels and fine.shape[1] != c:
        raise ValueError(f"{fine_name} has {fine.shape[1]} channels but {coarse_name} has {c}")
    if tuple(fine.shape[2:]) != (2 * h, 2 * w):
        raise ValueError(f"{fine_name} must be exactly 2x {coarse_name} spatially: expected "
                         f"{(2 * h, 2 * w)} for {coarse_name} {(h, w)}, got {tuple(fine.shape[2:])}")


def _check_fusion_params(ref_name, ref, w_coarse, w_fine, gate_coarse, gate_fine):
    if (w_coarse is None) != (w_fine is None):
        raise ValueError("w_coarse and w_fine must be given together (weighted fusion) or both "
                         "be None (plain add)")
    for name, w in (("w_coarse", w_coarse), ("w_fine", w_fine)):
        if w is None:
            continue
        if not isinstance(w, Tensor) or tuple(w.shape) != (1,):
            raise ValueError(f"{name} must be a tensor of shape [1], got "
                             f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
        if not w.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {w.dtype}")
        if w.device != ref.device:
            raise ValueError(f"{name} is on {w.device} but {ref_name} is on {ref.device}")
    for name, g in (("gate_coarse", gate_coarse), ("gate_fine", gate_fine)):
        if g is None:
            continue
        expected = (ref.shape[0], ref.shape[1])
        if not isinstance(g, Tensor) or tuple(g.shape) != expected:
            raise ValueError(f"{name} must have shape [N, C] = {list(expected)}, got "
                             f"{tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__}")
        if not g.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {g.dtype}")
        if g.device != ref.device:
            raise ValueError(f"{name} is on {g.device} but {ref_name} is on {ref.device}")


def _check_up2_fuse(coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, eps):
    _check_up2_pair("coarse", coarse, "fine", fine)
    _check_fusion_params("coarse", coarse, w_coarse, w_fine, gate_coarse, gate_fine)
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")


# ----------------------------------------------------------------------------- helpers
def acc_dtype(dtype):
    """Accumulation dtype of the kernels: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _small(t: Optional[Tensor], dtype) -> Optional[Tensor]:
    """Fusion weights and gates reach the kernels contiguous, in the accumulation dtype.

    They are [1] / [N, C] tensors, so this is never a copy of an activation.
    """
    return None if t is None else t.to(dtype).contiguous()


def _kernels(backend):
    """(forward, backward) kernels of a compiled or Triton backend; same contract for all."""
    if backend == "triton":
        from .triton import up2_fuse as tk
        return tk.forward, tk.backward
    if backend in ("cpu", "cuda"):
        return torch.ops.litefpn._up2_fuse_fwd, torch.ops.litefpn._up2_fuse_bwd
    raise ValueError(f"no fused up2_fuse kernel for backend {backend!r}")


def _sum_shape(coarse, need_sums):
    return (coarse.shape[0], coarse.shape[1]) if need_sums else (0,)


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("litefpn::up2_fuse", mutates_args=())
def _up2_fuse_op(coarse: Tensor, fine: Tensor, w_coarse: Optional[Tensor],
                 w_fine: Optional[Tensor], gate_coarse: Optional[Tensor],
                 gate_fine: Optional[Tensor], eps: float, backend: str) -> Tensor:
    _check_up2_fuse(coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, eps)
    if fine.numel() == 0:
        return torch.empty_like(fine)
    acc = acc_dtype(fine.dtype)
    forward, _ = _kernels(backend)
    return forward(coarse, fine, _small(w_coarse, acc), _small(w_fine, acc),
                   _small(gate_coarse, acc), _small(gate_fine, acc), float(eps))


@_up2_fuse_op.register_fake
def _(coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, eps, backend):
    return torch.empty_like(fine)


@torch.library.custom_op("litefpn::up2_fuse_backward", mutates_args=())
def _up2_fuse_backward_op(grad_out: Tensor, coarse: Tensor, fine: Tensor,
                          w_coarse: Optional[Tensor], w_fine: Optional[Tensor],
                          gate_coarse: Optional[Tensor], gate_fine: Optional[Tensor],
                          eps: float, need_sums: bool, backend: str
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    acc = acc_dtype(fine.dtype)
    if fine.numel() == 0:
        sums = torch.zeros(_sum_shape(coarse, need_sums), dtype=acc, device=fine.device)
        return torch.zeros_like(coarse), torch.zeros_like(fine), sums, sums.clone()
    _, backward = _kernels(backend)
    return backward(grad_out, coarse, fine, _small(w_coarse, acc), _small(w_fine, acc),
                    _small(gate_coarse, acc), _small(gate_fine, acc), float(eps), need_sums)


@_up2_fuse_backward_op.register_fake
def _(grad_out, coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, eps, need_sums, backend):
    sums = fine.new_empty(_sum_shape(coarse, need_sums), dtype=acc_dtype(fine.dtype))
    return torch.empty_like(coarse), torch.empty_like(fine), sums, torch.empty_like(sums)


def _fusion_param_grads(sum_coarse, sum_fine, w_coarse, w_fine, gate_coarse, gate_fine, eps,
                        need):
    """Gradients of (w_coarse, w_fine, gate_coarse, gate_fine) from the per-(n, c) sums.

    sum_coarse[n, c] = sum_hw grad*Up2(coarse), sum_fine[n, c] = sum_hw grad*fine. With
    out = alpha*gc*Up2(coarse) + beta*gf*fine:  d/dgc = alpha*sum_coarse, d/dalpha =
    sum_nc gc*sum_coarse, and alpha, beta = sp_c/D, sp_f/D with D = sp_c + sp_f + eps.
    The (n, c) reductions are torch sums over a fixed shape: deterministic (stage two).
    """
    need_wc, need_wf, need_gc, need_gf = need
    acc = sum_coarse.dtype
    alpha = beta = None
    if w_coarse is not None:
        sp_c = torch.nn.functional.softplus(w_coarse.to(acc))
        sp_f = torch.nn.functional.softplus(w_fine.to(acc))
        denom = sp_c + sp_f + eps
        alpha, beta = sp_c / denom, sp_f / denom
    grad_gc = grad_gf = grad_wc = grad_wf = None
    if need_gc:
        grad_gc = (sum_coarse if alpha is None else alpha * sum_coarse).to(gate_coarse.dtype)
    if need_gf:
        grad_gf = (sum_fine if beta is None else beta * sum_fine).to(gate_fine.dtype)
    if need_wc or need_wf:
        t_c = (sum_coarse if gate_coarse is None else sum_coarse * gate_coarse.to(acc)).sum()
        t_f = (sum_fine if gate_fine is None else sum_fine * gate_fine.to(acc)).sum()
        d_sp_c = (t_c * (denom - sp_c) - t_f * sp_f) / (denom * denom)
        d_sp_f = (t_f * (denom - sp_f) - t_c * sp_c) / (denom * denom)
        # d softplus / dw exactly as F.softplus' backward: 1 above the threshold (20).
        dsp = lambda w: torch.where(w > 20, torch.ones_like(w), torch.sigmoid(w))  # noqa: E731
        grad_wc = (d_sp_c * dsp(w_coarse.to(acc))).to(w_coarse.dtype) if need_wc else None
        grad_wf = (d_sp_f * dsp(w_fine.to(acc))).to(w_fine.dtype) if need_wf else None
    return grad_wc, grad_wf, grad_gc, grad_gf


def _up2_fuse_setup_context(ctx, inputs, output):
    coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, eps, backend = inputs
    ctx.save_for_backward(coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine)
    ctx.eps, ctx.backend = eps, backend


def _up2_fuse_backward(ctx, grad_out):
    coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_params = tuple(need[2:6])
    grad_coarse, grad_fine, sum_coarse, sum_fine = torch.ops.litefpn.up2_fuse_backward(
        grad_out, coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, ctx.eps,
        any(need_params), ctx.backend)
    grad_wc = grad_wf = grad_gc = grad_gf = None
    if any(need_params):
        grad_wc, grad_wf, grad_gc, grad_gf = _fusion_param_grads(
            sum_coarse, sum_fine, w_coarse, w_fine, gate_coarse, gate_fine, ctx.eps, need_params)
    return (grad_coarse if need[0] else None, grad_fine if need[1] else None,
            grad_wc, grad_wf, grad_gc, grad_gf, None, None)


_up2_fuse_op.register_autograd(_up2_fuse_backward, setup_context=_up2_fuse_setup_context)


# ----------------------------------------------------------------------------- public API
def up2_fuse(coarse: Tensor, fine: Tensor, w_coarse: Optional[Tensor] = None,
             w_fine: Optional[Tensor] = None, *, eps: float = FUSION_EPS,
             gate_coarse: Optional[Tensor] = None, gate_fine: Optional[Tensor] = None,
             backend: str = "auto") -> Tensor:
    """``alpha*gate_coarse*Up2(coarse) + beta*gate_fine*fine`` in one pass over memory.

    Args:
        coarse: [N, C, H, W]; upsampled 2x bilinearly (align_corners=False), never materialised.
        fine: [N, C, 2H, 2W], same dtype and device.
        w_coarse, w_fine: raw fusion parameters of shape [1] (both or neither). Given, alpha and
            beta are their softplus-normalised values sp(w)/(sp(w_coarse)+sp(w_fine)+eps);
            omitted, alpha = beta = 1 (plain add).
        eps: the normalisation's epsilon.
        gate_coarse, gate_fine: optional per-sample, per-channel gates of shape [N, C].
        backend: "auto", "eager", "cpu", "triton" or "cuda".

    Returns a tensor shaped, typed and laid out (memory format) like `fine`.
    """
    _check_up2_fuse(coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, eps)
    name = backends.resolve(backend, coarse.device)
    if name == "eager":
        return up2_fuse_reference(coarse, fine, w_coarse, w_fine, eps, gate_coarse, gate_fine)
    return torch.ops.litefpn.up2_fuse(coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine,
                                      float(eps), name)


# ============================================================================= lateral_up2_fuse
# One top-down level: out = alpha*gc*Up2(coarse) + beta*gf*BN(conv1x1(z)), with F.batch_norm's
# semantics. The kernels (contracts in csrc/ops.cpp) never write y = conv1x1(z): BatchNorm is
# folded into the 1x1 weight (W' = diag(gamma*r) W, b' = beta - mean*gamma*r, r = 1/sqrt(var+eps))
# and, in training, the batch statistics of y come from the mean and covariance of z:
# mean_y = W mean_z, var_y = diag(W cov_z W^T). Only small [C, Cin]-sized math runs here.

def _check_vector(name, t, length, ref_name, ref):
    if not isinstance(t, Tensor) or tuple(t.shape) != (length,):
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must have shape [{length}] (one value per channel), got {got}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_batch_norm_args(c, ref_name, ref, bn_weight, bn_bias, running_mean, running_var,
                           training, momentum, bn_eps):
    """F.batch_norm's arguments for a map `ref` whose BatchNorm has `c` channels."""
    _check_vector("bn_weight", bn_weight, c, ref_name, ref)
    _check_vector("bn_bias", bn_bias, c, ref_name, ref)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None: "
                         "no running statistics)")
    if running_mean is not None:
        _check_vector("running_mean", running_mean, c, ref_name, ref)
        _check_vector("running_var", running_var, c, ref_name, ref)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if not training and running_mean is None:
        raise ValueError("training=False needs running_mean and running_var (eval BatchNorm "
                         "normalises with the running statistics)")
    if not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    if not isinstance(bn_eps, (int, float)) or not bn_eps >= 0:
        raise ValueError(f"bn_eps must be a non-negative number, got {bn_eps!r}")


def _check_lateral(coarse, z, conv_weight, bn_weight, bn_bias, running_mean, running_var,
                   training, momentum, bn_eps, w_coarse, w_fine, gate_coarse, gate_fine, eps):
    _check_up2_pair("coarse", coarse, "z", z, same_channels=False)
    c, c_in = coarse.shape[1], z.shape[1]
    if not isinstance(conv_weight, Tensor) or conv_weight.dim() != 4 or \
            tuple(conv_weight.shape[2:]) != (1, 1):
        got = tuple(conv_weight.shape) if isinstance(conv_weight, Tensor) else type(conv_weight)
        raise ValueError(f"conv_weight must be a 1x1 convolution weight [C, Cin, 1, 1], got {got}")
    if conv_weight.shape[0] != c:
        raise ValueError(f"conv_weight has {conv_weight.shape[0]} output channels but coarse has "
                         f"{c} channels")
    if conv_weight.shape[1] != c_in:
        raise ValueError(f"conv_weight has Cin={conv_weight.shape[1]} but z has {c_in} channels")
    if not conv_weight.is_floating_point() or conv_weight.device != z.device:
        raise ValueError(f"conv_weight must be a floating point tensor on {z.device}, got "
                         f"{conv_weight.dtype} on {conv_weight.device}")
    _check_batch_norm_args(c, "z", z, bn_weight, bn_bias, running_mean, running_var, training,
                           momentum, bn_eps)
    _check_fusion_params("coarse", coarse, w_coarse, w_fine, gate_coarse, gate_fine)
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    # (z is 2x coarse spatially, so a non-empty batch has >= 4 values per channel: F.batch_norm's
    # "more than 1 value per channel when training" cannot arise.)


def _lateral_kernels(backend):
    """Namespace of the four lateral kernels (gram, fwd, grad_z, bwd_coarse) of a backend."""
    if backend == "triton":
        from .triton import lateral
        return lateral
    if backend in ("cpu", "cuda"):
        ops = torch.ops.litefpn
        return SimpleNamespace(gram=ops._lateral_gram, fwd=ops._lateral_up2_fuse_fwd,
                               grad_z=ops._lateral_grad_z, bwd_coarse=ops._up2_fuse_bwd_coarse)
    raise ValueError(f"no fused lateral_up2_fuse kernels for backend {backend!r}")


def _empty_in_format(t, shape):
    """An empty tensor of `shape` with t's dtype and device, channels_last when t is (and not
    also contiguous): the memory format of the C++ kernels' outputs (output_format_of in
    csrc/cpu/torch_glue.h)."""
    channels_last = (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
                     and not t.is_contiguous())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=t.dtype, device=t.device, memory_format=fmt)


def _out_like_z(coarse, z):
    """The output [N, C, 2H, 2W] of a lateral level: z's dtype and memory format."""
    n, _, h2, w2 = z.shape
    return _empty_in_format(z, (n, coarse.shape[1], h2, w2))


def _pilot(z, acc):
    """A per-channel centre for z's sums (one of its own values): keeps the fp32 moment sums
    accurate when z's mean is large against its spread."""
    return z[0, :, 0, 0].to(acc).contiguous()


def _batch_moments(kernels, z, acc):
    """(mean_z [Cin], cov_z [Cin, Cin]) over (N, H, W), biased, in the accumulation dtype."""
    pilot = _pilot(z, acc)
    gram, colsum = kernels.gram(z, z, pilot, pilot)
    count = z.shape[0] * z.shape[2] * z.shape[3]
    d = colsum.sum(0) / count
    cov = gram.sum(0) / count - torch.outer(d, d)
    return pilot + d, cov


def _y_moments(weight, mean_z, cov_z):
    """Batch mean and biased variance of y = W z from z's moments."""
    return weight @ mean_z, ((weight @ cov_z) * weight).sum(1).clamp_min(0)


def _update_running_stats(running_mean, running_var, mean, var, count, momentum):
    """F.batch_norm's update from a batch's mean and biased variance over `count` values:
    running = (1 - momentum)*running + momentum*batch, with the unbiased variance."""
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_((momentum * mean).to(running_mean.dtype))
        running_var.mul_(1 - momentum).add_(
            (momentum * count / (count - 1) * var).to(running_var.dtype))


@torch.library.custom_op("litefpn::lateral_up2_fuse", mutates_args=())
def _lateral_op(coarse: Tensor, z: Tensor, conv_weight: Tensor, bn_weight: Tensor,
                bn_bias: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                training: bool, momentum: float, bn_eps: float, w_coarse: Optional[Tensor],
                w_fine: Optional[Tensor], gate_coarse: Optional[Tensor],
                gate_fine: Optional[Tensor], eps: float, backend: str
                ) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (out, mean_z, cov_z). Functional: in training, the moments of z ([Cin], [Cin, Cin];
    else [0] / [0, 0]) are saved for the backward instead of any activation, and
    `lateral_up2_fuse` updates the running statistics from them."""
    _check_lateral(coarse, z, conv_weight, bn_weight, bn_bias, running_mean, running_var,
                   training, momentum, bn_eps, w_coarse, w_fine, gate_coarse, gate_fine, eps)
    acc = acc_dtype(z.dtype)
    c, c_in = conv_weight.shape[:2]
    mean_z = z.new_empty((0,), dtype=acc)
    cov_z = z.new_empty((0, 0), dtype=acc)
    if z.numel() == 0:  # F.batch_norm leaves the running statistics alone on an empty batch
        return _out_like_z(coarse, z), mean_z, cov_z
    kernels = _lateral_kernels(backend)
    weight = conv_weight.reshape(c, c_in).to(acc)
    if training:
        mean_z, cov_z = _batch_moments(kernels, z, acc)
        mean_y, var_y = _y_moments(weight, mean_z, cov_z)
    else:
        mean_y, var_y = running_mean.to(acc), running_var.to(acc)
    scale = bn_weight.to(acc) * torch.rsqrt(var_y + bn_eps)
    shift = bn_bias.to(acc) - mean_y * scale
    out = kernels.fwd(coarse, z, (scale[:, None] * weight).contiguous(), shift.contiguous(),
                      _small(w_coarse, acc), _small(w_fine, acc), _small(gate_coarse, acc),
                      _small(gate_fine, acc), float(eps))
    return out, mean_z, cov_z


@_lateral_op.register_fake
def _(coarse, z, conv_weight, bn_weight, bn_bias, running_mean, running_var, training, momentum,
      bn_eps, w_coarse, w_fine, gate_coarse, gate_fine, eps, backend):
    acc = acc_dtype(z.dtype)
    c_in = z.shape[1]
    stats = training and z.numel() > 0
    return (_out_like_z(coarse, z), z.new_empty((c_in,) if stats else (0,), dtype=acc),
            z.new_empty((c_in, c_in) if stats else (0, 0), dtype=acc))


def _like_param(grad: Tensor, param: Tensor) -> Tensor:
    """`grad` in `param`'s dtype and strides: the autograd layout contract, which eager's conv
    backward keeps (a [C, Cin, 1, 1] weight of a channels_last module has channels_last strides;
    DDP's gradient buckets warn about grads that differ)."""
    if grad.stride() == param.stride() and grad.dtype == param.dtype:
        return grad
    return torch.empty_like(param).copy_(grad)


@torch.library.custom_op("litefpn::lateral_up2_fuse_backward", mutates_args=())
def _lateral_backward_op(grad_out: Tensor, coarse: Tensor, z: Tensor, conv_weight: Tensor,
                         bn_weight: Tensor, bn_bias: Tensor, running_mean: Optional[Tensor],
                         running_var: Optional[Tensor], mean_z: Tensor, cov_z: Tensor,
                         training: bool, bn_eps: float, w_coarse: Optional[Tensor],
                         w_fine: Optional[Tensor], gate_coarse: Optional[Tensor],
                         gate_fine: Optional[Tensor], eps: float, need_sums: bool, backend: str
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (grad_coarse, grad_z, grad_conv_weight, grad_bn_weight, grad_bn_bias, sum_coarse,
    sum_fine); the sums ([N, C], or [0] without need_sums) feed `_fusion_param_grads`.

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
    kernels = _lateral_kernels(backend)
    weight = conv_weight.reshape(c, c_in).to(acc)
    gamma = bn_weight.to(acc)
    if training:
        zc = mean_z
        mean_y, var_y = _y_moments(weight, mean_z, cov_z)
    else:
        zc, mean_y, var_y = _pilot(z, acc), running_mean.to(acc), running_var.to(acc)
    r = torch.rsqrt(var_y + bn_eps)
    scaled_w = (gamma * r)[:, None] * weight  # W'
    m = torch.ones((n, c), dtype=acc, device=z.device)  # beta * gate_fine
    if gate_fine is not None:
        m = m * gate_fine.to(acc)
    if w_coarse is not None:
        m = m * fusion_weights(w_coarse.to(acc), w_fine.to(acc), eps)[1]

    a_n, s_n = kernels.gram(grad_out, z, None, zc.contiguous())  # [N, C, Cin], [N, C]
    a_sum = (m[:, :, None] * a_n).sum(0)
    s = (m * s_n).sum(0)
    d_gamma = r * ((weight * a_sum).sum(1) + (weight @ zc - mean_y) * s)
    if training:
        count = z.shape[0] * z.shape[2] * z.shape[3]
        grad_w = (gamma * r)[:, None] * (a_sum - (d_gamma * r)[:, None] * (weight @ cov_z))
        quad = weight.t() @ ((gamma * r * r * d_gamma / count)[:, None] * weight)
        shift = quad @ mean_z - scaled_w.t() @ s / count
        grad_z = kernels.grad_z(grad_out, z, scaled_w.contiguous(), m.contiguous(),
                                quad.contiguous(), shift.contiguous())
    else:
        grad_w = (gamma * r)[:, None] * (a_sum + torch.outer(s, zc))
        grad_z = kernels.grad_z(grad_out, z, scaled_w.contiguous(), m.contiguous(), None, None)
    grad_coarse, sum_coarse = kernels.bwd_coarse(
        grad_out, coarse, _small(w_coarse, acc), _small(w_fine, acc), _small(gate_coarse, acc),
        float(eps), need_sums)
    if need_sums:  # sum_p g * BN(conv(z)) = rowsum(W' o A_n) + (W' zc + b') * s_n
        bias = bn_bias.to(acc) - mean_y * gamma * r
        sum_fine = (scaled_w * a_n).sum(2) + (scaled_w @ zc + bias) * s_n
    else:
        sum_fine = sum_coarse.new_empty((0,))
    return (grad_coarse, grad_z, _like_param(grad_w.reshape(conv_weight.shape), conv_weight),
            d_gamma.to(bn_weight.dtype), s.to(bn_bias.dtype), sum_coarse, sum_fine)


@_lateral_backward_op.register_fake
def _(grad_out, coarse, z, conv_weight, bn_weight, bn_bias, running_mean, running_var, mean_z,
      cov_z, training, bn_eps, w_coarse, w_fine, gate_coarse, gate_fine, eps, need_sums, backend):
    sums = z.new_empty(_sum_shape(coarse, need_sums), dtype=acc_dtype(z.dtype))
    return (torch.empty_like(coarse), torch.empty_like(z), torch.empty_like(conv_weight),
            torch.empty_like(bn_weight), torch.empty_like(bn_bias), sums, torch.empty_like(sums))


def _lateral_setup_context(ctx, inputs, output):
    (coarse, z, conv_weight, bn_weight, bn_bias, running_mean, running_var, training, momentum,
     bn_eps, w_coarse, w_fine, gate_coarse, gate_fine, eps, backend) = inputs
    _, mean_z, cov_z = output
    ctx.mark_non_differentiable(mean_z, cov_z)
    # Only eval's backward reads the running statistics; training does not save them, since
    # lateral_up2_fuse updates them in place right after this op.
    if training:
        running_mean = running_var = None
    ctx.save_for_backward(coarse, z, conv_weight, bn_weight, bn_bias, running_mean, running_var,
                          mean_z, cov_z, w_coarse, w_fine, gate_coarse, gate_fine)
    ctx.training, ctx.bn_eps, ctx.eps, ctx.backend = training, bn_eps, eps, backend


def _lateral_backward(ctx, grad_out, _grad_mean, _grad_cov):
    (coarse, z, conv_weight, bn_weight, bn_bias, running_mean, running_var, mean_z, cov_z,
     w_coarse, w_fine, gate_coarse, gate_fine) = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_params = (need[10], need[11], need[12], need[13])
    (grad_coarse, grad_z, grad_w, grad_gamma, grad_beta, sum_coarse,
     sum_fine) = torch.ops.litefpn.lateral_up2_fuse_backward(
        grad_out, coarse, z, conv_weight, bn_weight, bn_bias, running_mean, running_var, mean_z,
        cov_z, ctx.training, ctx.bn_eps, w_coarse, w_fine, gate_coarse, gate_fine, ctx.eps,
        any(need_params), ctx.backend)
    grad_wc = grad_wf = grad_gc = grad_gf = None
    if any(need_params):
        grad_wc, grad_wf, grad_gc, grad_gf = _fusion_param_grads(
            sum_coarse, sum_fine, w_coarse, w_fine, gate_coarse, gate_fine, ctx.eps, need_params)
    keep = lambda g, i: g if need[i] else None  # noqa: E731
    return (keep(grad_coarse, 0), keep(grad_z, 1), keep(grad_w, 2), keep(grad_gamma, 3),
            keep(grad_beta, 4), None, None, None, None, None,
            grad_wc, grad_wf, grad_gc, grad_gf, None, None)


_lateral_op.register_autograd(_lateral_backward, setup_context=_lateral_setup_context)


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
    _check_lateral(coarse, z, conv_weight, bn_weight, bn_bias, running_mean, running_var,
                   training, momentum, bn_eps, w_coarse, w_fine, gate_coarse, gate_fine, eps)
    name = backends.resolve(backend, z.device)
    if name == "eager":
        return lateral_up2_fuse_reference(coarse, z, conv_weight, bn_weight, bn_bias,
                                          running_mean, running_var, training, momentum, bn_eps,
                                          w_coarse, w_fine, eps, gate_coarse, gate_fine)
    out, mean_z, cov_z = torch.ops.litefpn.lateral_up2_fuse(
        coarse, z, conv_weight, bn_weight, bn_bias, running_mean, running_var, training,
        float(momentum), float(bn_eps), w_coarse, w_fine, gate_coarse, gate_fine, float(eps), name)
    if training and running_mean is not None and z.numel() > 0:
        weight = conv_weight.detach().reshape(conv_weight.shape[0], -1).to(mean_z.dtype)
        _update_running_stats(running_mean, running_var, *_y_moments(weight, mean_z, cov_z),
                              z.shape[0] * z.shape[2] * z.shape[3], momentum)
    return out


# ============================================================================= bn_silu
# SiLU(BatchNorm2d(x)): the BatchNorm + activation after each 3x3 smooth, in two passes over x
# forward (statistics, then normalise + SiLU) and two backward (per-channel sums, then grad_x),
# instead of eager's BN and SiLU passes and their saved intermediate. Only x and per-channel
# vectors are saved: the BN output is recomputed in the backward, never stored. Kernel contracts
# are in csrc/ops.cpp (`_bn_silu_*`); the statistics are taken around a per-channel pilot value
# of x (as lateral_up2_fuse does for z), so fp32 sums stay accurate for a large mean.

#: backends with bn_silu kernels; on the others the module keeps nn.BatchNorm2d + SiLU.
BN_SILU_BACKENDS = ("eager", "cpu")


def _check_bn_silu(x, bn_weight, bn_bias, running_mean, running_var, training, momentum,
                   bn_eps):
    _check_4d("x", x)
    _check_batch_norm_args(x.shape[1], "x", x, bn_weight, bn_bias, running_mean, running_var,
                           training, momentum, bn_eps)
    if training and x.numel() > 0 and x.shape[0] * x.shape[2] * x.shape[3] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{list(x.shape)}")  # F.batch_norm's own check


def _bn_silu_kernels(backend):
    """Namespace of the four bn_silu kernels (stats, fwd, bwd_sums, bwd) of a backend."""
    if backend == "cpu":
        ops = torch.ops.litefpn
        return SimpleNamespace(stats=ops._bn_silu_stats, fwd=ops._bn_silu_fwd,
                               bwd_sums=ops._bn_silu_bwd_sums, bwd=ops._bn_silu_bwd)
    raise ValueError(f"no fused bn_silu kernels for backend {backend!r}")


def _bn_silu_affine(bn_weight, bn_bias, mean, var, bn_eps, acc):
    """(scale, shift, r) with BN(x) = x*scale + shift, r = 1/sqrt(var + eps)."""
    r = torch.rsqrt(var + bn_eps)
    scale = bn_weight.to(acc) * r
    return scale.contiguous(), (bn_bias.to(acc) - mean * scale).contiguous(), r


@torch.library.custom_op("litefpn::bn_silu", mutates_args=())
def _bn_silu_op(x: Tensor, bn_weight: Tensor, bn_bias: Tensor, running_mean: Optional[Tensor],
                running_var: Optional[Tensor], training: bool, bn_eps: float, backend: str
                ) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (y, mean, var): the batch mean and biased variance ([C], accumulation dtype) in
    training, for the backward and for `bn_silu`'s running-statistics update; [0] in eval."""
    acc = acc_dtype(x.dtype)
    mean, var = x.new_empty((0,), dtype=acc), x.new_empty((0,), dtype=acc)
    if x.numel() == 0:
        return _empty_in_format(x, x.shape), mean, var
    kernels = _bn_silu_kernels(backend)
    if training:
        pilot = _pilot(x, acc)
        s1, s2 = kernels.stats(x, pilot)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        d = s1 / count
        mean, var = pilot + d, (s2 / count - d * d).clamp_min(0)
        scale, shift, _ = _bn_silu_affine(bn_weight, bn_bias, mean, var, bn_eps, acc)
    else:
        scale, shift, _ = _bn_silu_affine(bn_weight, bn_bias, running_mean.to(acc),
                                          running_var.to(acc), bn_eps, acc)
    return kernels.fwd(x, scale, shift), mean, var


@_bn_silu_op.register_fake
def _(x, bn_weight, bn_bias, running_mean, running_var, training, bn_eps, backend):
    stats = (x.shape[1],) if training and x.numel() > 0 else (0,)
    acc = acc_dtype(x.dtype)
    return (_empty_in_format(x, x.shape), x.new_empty(stats, dtype=acc),
            x.new_empty(stats, dtype=acc))


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
    kernels = _bn_silu_kernels(backend)
    mean, var = mean.to(acc).contiguous(), var.to(acc)
    scale, shift, r = _bn_silu_affine(bn_weight, bn_bias, mean, var, bn_eps, acc)
    s1, s2 = kernels.bwd_sums(grad_out, x, scale, shift, mean)
    if training:
        count = x.shape[0] * x.shape[2] * x.shape[3]
        k_x = -scale * r * r * s2 / count
        k_0 = -mean * k_x - scale * s1 / count
    else:
        k_x = k_0 = torch.zeros_like(scale)
    grad_x = kernels.bwd(grad_out, x, scale, shift, scale, k_x.contiguous(), k_0.contiguous())
    return grad_x, (r * s2).to(bn_weight.dtype), s1.to(bn_bias.dtype)


@_bn_silu_backward_op.register_fake
def _(grad_out, x, bn_weight, bn_bias, mean, var, training, bn_eps, backend):
    return _empty_in_format(x, x.shape), torch.empty_like(bn_weight), torch.empty_like(bn_bias)


def _bn_silu_setup_context(ctx, inputs, output):
    x, bn_weight, bn_bias, running_mean, running_var, training, bn_eps, backend = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    if training:  # the batch statistics; the running ones are updated in place after the op
        running_mean = running_var = None
    ctx.save_for_backward(x, bn_weight, bn_bias, mean, var, running_mean, running_var)
    ctx.training, ctx.bn_eps, ctx.backend = training, bn_eps, backend


def _bn_silu_backward(ctx, grad_out, _grad_mean, _grad_var):
    x, bn_weight, bn_bias, mean, var, running_mean, running_var = ctx.saved_tensors
    if not ctx.training:
        mean, var = running_mean, running_var
    grad_x, grad_w, grad_b = torch.ops.litefpn.bn_silu_backward(
        grad_out, x, bn_weight, bn_bias, mean, var, ctx.training, ctx.bn_eps, ctx.backend)
    need = ctx.needs_input_grad
    return (grad_x if need[0] else None, grad_w if need[1] else None,
            grad_b if need[2] else None, None, None, None, None, None)


_bn_silu_op.register_autograd(_bn_silu_backward, setup_context=_bn_silu_setup_context)


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
    _check_bn_silu(x, bn_weight, bn_bias, running_mean, running_var, training, momentum, bn_eps)
    name = backends.resolve(backend, x.device)
    if backend == "auto" and name not in BN_SILU_BACKENDS:
        name = "eager"
    if name not in BN_SILU_BACKENDS:
        raise RuntimeError(f"backend={backend!r} has no bn_silu kernels (available: "
                           f"{BN_SILU_BACKENDS})")
    if name == "eager":
        return F.silu(F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training,
                                   momentum, bn_eps))
    y, mean, var = torch.ops.litefpn.bn_silu(x, bn_weight, bn_bias, running_mean, running_var,
                                             training, float(bn_eps), name)
    if training and running_mean is not None and x.numel() > 0:
        _update_running_stats(running_mean, running_var, mean, var,
                              x.shape[0] * x.shape[2] * x.shape[3], momentum)
    return y
