"""up2_fuse: ``alpha*gate_coarse*Up2(coarse) + beta*gate_fine*fine`` in one pass over memory.

Order: public function -> custom op + checking fake -> backward op + checking fake -> autograd.
Kernel contracts (`_up2_fuse_fwd`, `_up2_fuse_bwd`, and the backward pass `_up2_fuse_grad`):
csrc/ops.cpp; kernel sets: backends/.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends, eager
from ..backends import registry
from ..eager import FUSION_EPS
from . import _autograd_support, _checks, _dispatch
from ._tensor import acc_dtype, to_acc_contiguous


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
    name = backends.resolve("up2_fuse", backend, _checks.device_of("coarse", coarse))
    if name != "eager":
        _autograd_support.check_supported("up2_fuse", coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine)
    if name == "eager":
        _checks.up2_fuse(coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, eps)
        return eager.up2_fuse(coarse, fine, w_coarse, w_fine, eps, gate_coarse, gate_fine)
    return _up2_fuse_call(coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, float(eps),
                          name)


# ----------------------------------------------------------------------------- forward op
@torch.library.custom_op("litefpn::up2_fuse", mutates_args=())
def _up2_fuse_op(coarse: Tensor, fine: Tensor, w_coarse: Optional[Tensor],
                 w_fine: Optional[Tensor], gate_coarse: Optional[Tensor],
                 gate_fine: Optional[Tensor], eps: float, backend: str) -> Tensor:
    _checks.up2_fuse(coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, eps)
    if fine.numel() == 0:
        return torch.empty_like(fine)
    acc = acc_dtype(fine.dtype)
    k = registry.kernels("up2_fuse", backend)
    return k.fwd(coarse, fine, to_acc_contiguous(w_coarse, acc), to_acc_contiguous(w_fine, acc),
                 to_acc_contiguous(gate_coarse, acc), to_acc_contiguous(gate_fine, acc),
                 float(eps))


@_up2_fuse_op.register_fake
def _(coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, eps, backend):
    _checks.up2_fuse(coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, eps)
    return torch.empty_like(fine)


# ----------------------------------------------------------------------------- backward op
@torch.library.custom_op("litefpn::up2_fuse_backward", mutates_args=())
def _up2_fuse_backward_op(grad_out: Tensor, coarse: Tensor, fine: Tensor,
                          w_coarse: Optional[Tensor], w_fine: Optional[Tensor],
                          gate_coarse: Optional[Tensor], gate_fine: Optional[Tensor],
                          eps: float, need_w_coarse: bool, need_w_fine: bool,
                          need_gate_coarse: bool, need_gate_fine: bool, backend: str
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (grad_coarse, grad_fine, grad_w_coarse, grad_w_fine, grad_gate_coarse,
    grad_gate_fine), each of the last four [0] when not needed: the kernel's per-(n, c) sums
    through `fusion_param_grads` (in the same pass)."""
    return registry.kernels("up2_fuse", backend).grad(
        grad_out, coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, eps, need_w_coarse,
        need_w_fine, need_gate_coarse, need_gate_fine)


@_up2_fuse_backward_op.register_fake
def _(grad_out, coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, eps, need_w_coarse,
      need_w_fine, need_gate_coarse, need_gate_fine, backend):
    _checks.fake_up2_pair(coarse, fine)
    torch._check(grad_out.shape == fine.shape, lambda: "grad_out must be shaped like fine")

    def param_grad(need, p):
        return torch.empty_like(p) if need else fine.new_empty((0,), dtype=acc_dtype(fine.dtype))
    return (torch.empty_like(coarse), torch.empty_like(fine),
            param_grad(need_w_coarse, w_coarse), param_grad(need_w_fine, w_fine),
            param_grad(need_gate_coarse, gate_coarse), param_grad(need_gate_fine, gate_fine))


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, eps, backend = inputs
    ctx.save_for_backward(coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine)
    ctx.eps, ctx.backend = eps, backend


def _backward(ctx, grad_out):
    coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = _backward_call(grad_out, coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine,
                           ctx.eps, *need[2:6], ctx.backend)
    return tuple(g if n else None for g, n in zip(grads, need[:6])) + (None, None)


_up2_fuse_op.register_autograd(_backward, setup_context=_setup_context)

# the callers of the ops above (`_dispatch`): direct in plain eager, else the custom ops
_up2_fuse_call = _dispatch.direct(_up2_fuse_op, _setup_context, _backward)
_backward_call = _dispatch.direct(_up2_fuse_backward_op)
