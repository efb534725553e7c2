"""Tensor conventions of the kernels, the only Python copy: accumulation dtype, the small
per-channel operands, and the output memory format (output_format_of in csrc/cpu/common/torch_glue.h)."""
from typing import Optional

import torch
from torch import Tensor


def acc_dtype(dtype):
    """Accumulation dtype of the kernels: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_acc_contiguous(t: Optional[Tensor], dtype) -> Optional[Tensor]:
    """Fusion weights and gates reach the kernels contiguous, in the accumulation dtype.

    They are [1] / [N, C] tensors, so this is never a copy of an activation. (Tested first:
    a no-op .to / .contiguous is still a dispatch, and the glue runs per call.)
    """
    if t is None:
        return None
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def as_dtype(t: Tensor, dtype) -> Tensor:
    """`t` in `dtype`, without a call when it already is (a no-op .to is still a dispatch)."""
    return t if t.dtype == dtype else t.to(dtype)


def empty_in_format(t, shape):
    """An empty tensor of `shape` with t's dtype and device, channels_last when t is (and not
    also contiguous): the memory format of the C++ kernels' outputs (output_format_of in
    csrc/cpu/common/torch_glue.h)."""
    channels_last = (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
                     and not t.is_contiguous())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=t.dtype, device=t.device, memory_format=fmt)


def like_param(grad: Tensor, param: Tensor) -> Tensor:
    """`grad` in `param`'s dtype and strides: the autograd layout contract, which eager's conv
    backward keeps (a [C, Cin, 1, 1] weight of a channels_last module has channels_last strides;
    DDP's gradient buckets warn about grads that differ)."""
    if grad.stride() == param.stride() and grad.dtype == param.dtype:
        return grad
    return torch.empty_like(param).copy_(grad)


def sum_shape(coarse, need_sums):
    """Shape of the per-(n, c) sums a backward returns: [N, C], or [0] when not needed."""
    return (coarse.shape[0], coarse.shape[1]) if need_sums else (0,)
