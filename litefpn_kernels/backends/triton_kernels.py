"""The `triton` backend: the kernels of `litefpn_kernels/triton/` (same contracts as csrc/ops.cpp,
same entry-point names) in the passes of ops/_passes.py, with the Triton steps
(triton/steps.py). Imported lazily, on first use: TRITON_INTERPRET must be set before
`triton.jit` decorates anything, and importing triton is slow."""
import importlib.util
import os

from .registry import register, register_backend

TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def interpreting():
    """TRITON_INTERPRET=1: the Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _reason(op, device):
    if not TRITON_IMPORTABLE:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return (f"the 'triton' backend runs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
            f"set before import; got a {device.type} tensor")


register_backend("triton", _reason)


@register("up2_fuse", "triton")
def _up2_fuse():
    from ..ops import _passes
    from ..triton import steps, up2_fuse as k
    return _passes.up2_fuse(fwd=k.fwd, bwd=k.bwd, steps=steps)


@register("lateral_up2_fuse", "triton")
def _lateral_up2_fuse():
    from ..ops import _passes
    from ..triton import lateral_up2_fuse as k, steps
    return _passes.lateral_up2_fuse(gram=k.gram, fwd=k.fwd, grad_z=k.grad_z,
                                    bwd_coarse=k.bwd_coarse, steps=steps)


@register("bn_silu", "triton")
def _bn_silu():
    from ..ops import _passes
    from ..triton import bn_silu as k, steps
    return _passes.bn_silu(stats=k.stats, fwd=k.fwd, bwd_sums=k.bwd_sums, bwd=k.bwd,
                           steps=steps)
