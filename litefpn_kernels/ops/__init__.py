"""The fused operators, registered with torch.library (namespace `litefpn`).

`up2_fuse(coarse, fine, ...)` computes ``alpha*gate_coarse*Up2(coarse) + beta*gate_fine*fine``
in one pass; `lateral_up2_fuse` adds the 1x1 lateral conv + BatchNorm in front of `fine`;
`bn_silu` is the smooths' BatchNorm + SiLU without a stored BatchNorm output.

Two tiers. Each public operator is a Python `torch.library.custom_op` (with a backward op, fakes
that check shapes with `torch._check`, and `register_autograd`), one module per op, in the order
public function -> op + fake -> backward op + fake -> autograd. The backend is an argument of the
op, not the dispatch key: a Triton and a CUDA implementation both run on CUDA tensors, so the
device key alone cannot pick between them. The op looks its kernels up in
`litefpn_kernels.backends.registry` (one kernel-set shape per op, the same for every backend);
the kernels' own schemas and contracts are in csrc/ops.cpp. `eager` is the plain PyTorch
composition (`litefpn_kernels.eager`), the reference every backend is tested against.

Private modules: `_checks` (argument validation, once per call), `_passes` (a pass of bn_silu or
lateral_up2_fuse: one kernel with BatchNorm's small math around it, for the GPU backends; the
`cpu` backend's are C++, csrc/cpu/passes.cpp), `_batch_norm` (pilot value, moments, running
statistics), `_fusion` (fusion-weight and gate gradients), `_tensor`
(accumulation dtype, output memory format), `_autograd_support` (clear errors for the autograd
features the fused kernels lack: forward mode, torch.func transforms, double backward).
"""
from ._autograd_support import forbid_double_backward
from ._tensor import acc_dtype
from .bn_silu import bn_silu
from .lateral_up2_fuse import lateral_up2_fuse
from .up2_fuse import up2_fuse

forbid_double_backward("up2_fuse", ["up2_fuse_backward"])
forbid_double_backward("lateral_up2_fuse",
                       ["lateral_up2_fuse_backward_sums", "lateral_up2_fuse_backward"])
forbid_double_backward("bn_silu", ["bn_silu_backward_sums", "bn_silu_backward"])

__all__ = ["up2_fuse", "lateral_up2_fuse", "bn_silu"]
