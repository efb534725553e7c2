"""How the public functions call the custom ops: `direct(op)` returns the caller every op uses.

A torch.library custom op is what torch.compile, FakeTensor, opcheck, `make_fx` and other
tracing or intercepting tools need, but in plain eager its Python wrapper costs about 35 us a
call, and 90 us with its autograd (measured here, torch 2.13, 2-core CPU), more than the kernels
at small sizes: a fused training step runs 35 of them. In plain eager (nothing tracing or
intercepting, plain tensors) the caller runs the op's own implementation instead, through a
torch.autograd.Function with the op's registered backward: the same functions, so the same
results, without the wrapper. Anything else (torch.compile, jit tracing, a dispatch or function
mode, a tensor subclass, a double backward) gets the custom op, exactly as before.
"""
import torch
from torch import Tensor, nn

_PLAIN = (Tensor, nn.Parameter)


def _plain_eager(args) -> bool:
    if (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._is_torch_function_mode_enabled()
            or torch._C._functorch.maybe_current_level() is not None):
        return False
    return all(type(a) in _PLAIN for a in args if isinstance(a, Tensor))


def _records_graph(args) -> bool:
    """Whether autograd would record a graph through an op without its own formula (a backward
    pass run with create_graph=True): the custom op then raises the double-backward error."""
    return torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad
                                           for a in args)


def direct(op, setup_context=None, backward=None):
    """-> call(*args): `op` (a torch.library CustomOpDef) called with positional args, directly
    in plain eager. With `backward`/`setup_context` (the functions given to the op's
    register_autograd) the direct call is differentiable the same way."""
    impl = op._init_fn  # the decorated function: the op's implementation for every device
    if backward is None:
        def call(*args):
            if _plain_eager(args) and not _records_graph(args):
                return impl(*args)
            return op(*args)
        return call

    class _Direct(torch.autograd.Function):
        # forward(ctx, ...) rather than a separate setup_context: about 4x less overhead
        @staticmethod
        def forward(ctx, *args):
            out = impl(*args)
            setup_context(ctx, args, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    def call(*args):
        return _Direct.apply(*args) if _plain_eager(args) else op(*args)
    return call
