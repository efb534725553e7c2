"""The fused operators, registered with torch.library (namespace `litefpn`).

`up2_fuse(coarse, fine, ...)` computes ``alpha*gate_coarse*Up2(coarse) + beta*gate_fine*fine``
in one pass. Each backend is a kernel behind the same custom op (`cpu` and `cuda` in
`csrc/`, `triton` in `litefpn_kernels/triton/`); `eager` is the plain PyTorch composition in
`functional.py`, the reference every backend is tested against.

Layering, one concern each:
  * `_check_up2_fuse` - argument validation with errors that name the argument;
  * `torch.ops.litefpn.up2_fuse` / `up2_fuse_backward` - custom ops with fake kernels, so
    opcheck and torch.compile(fullgraph=True) see through them;
  * `_fusion_param_grads` - the only place that turns the kernels' per-(n, c) sums into the
    gradients of the fusion weights and gates (softplus chain rule), for every backend.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .functional import FUSION_EPS, up2_fuse_reference

__all__ = ["up2_fuse"]

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


def _check_up2_pair(coarse_name, coarse, fine_name, fine):
    """`fine` must be exactly twice `coarse` spatially, with the same batch and channels."""
    _check_4d(coarse_name, coarse)
    _check_4d(fine_name, fine)
    _check_same(fine_name, fine, coarse_name, coarse)
    n, c, h, w = coarse.shape
    if fine.shape[0] != n:
        raise ValueError(f"{fine_name} has batch {fine.shape[0]} but {coarse_name} has batch {n}")
    if fine.shape[1] != c:
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
