"""What autograd can and cannot do through the fused kernels, said clearly instead of silently.

The fused ops register a reverse-mode formula (`register_autograd`) and nothing else. Without
these guards, forward-mode AD (`torch.func.jvp`) returned a zero tangent, `torch.func.grad` /
`vjp` / `jacrev` / `vmap` failed with PyTorch's message about an `autograd.Function` needing
`setup_context`, and a double backward named an internal op. backend="eager" supports all of
them: it is plain PyTorch.
"""
import torch
import torch.autograd.forward_ad as forward_ad

_HINT = "; use backend='eager' (plain PyTorch, same results) for this"


def check_supported(op, *tensors):
    """Raises if the call runs under a torch.func transform or with forward-mode dual tensors.

    Called by each public op for the fused backends. Skipped while torch.compile traces (Dynamo
    handles torch.func itself and the op is opaque to it)."""
    if torch.compiler.is_compiling():
        return
    if torch._C._functorch.maybe_current_level() is not None:
        raise RuntimeError(f"litefpn::{op}: torch.func transforms (grad, vjp, jvp, jacrev, "
                           f"vmap, ...) are not supported by the fused kernels{_HINT}")
    if forward_ad._current_level >= 0 and any(
            t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(f"litefpn::{op}: forward-mode AD (torch.autograd.forward_ad) is not "
                           f"supported by the fused kernels{_HINT}")


def forbid_double_backward(op, backward_ops):
    """Registers an autograd formula that raises on each of `op`'s backward ops (the passes its
    backward runs: `litefpn::<name>`): a double backward (create_graph=True, then a second
    backward) gets this error naming `op` instead of PyTorch's about an internal op."""
    def _raise(ctx, *grads):
        raise RuntimeError(f"litefpn::{op}: double backward (a gradient of its gradient) is not "
                           f"supported by the fused kernels{_HINT}")

    for name in backward_ops:
        torch.library.register_autograd(f"litefpn::{name}", _raise,
                                        setup_context=lambda ctx, inputs, output: None)
