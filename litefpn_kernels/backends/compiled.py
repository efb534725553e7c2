"""The `cpu` and `cuda` backends: the C++/CUDA kernels of `litefpn_kernels._C` (csrc/), whose
schemas and contracts are in csrc/ops.cpp.

A compiled op is available for a dispatch key iff every schema of its kernel set has a kernel
for that key; this is settled once, at import (then `resolve` is plain Python over constants,
which torch.compile traces without a graph break).
"""
import functools
import importlib
import warnings

import torch

from .registry import (BnSiluKernels, LateralUp2FuseKernels, Up2FuseKernels, register,
                       register_backend)
from .triton_kernels import TRITON_IMPORTABLE

#: the kernels (torch.ops.litefpn.<name>) each op's kernel set runs: an op is available for a
#: device if all of them are (the CPU passes, csrc/cpu/passes.cpp, are built with them).
SCHEMAS = {
    "up2_fuse": ("_up2_fuse_fwd", "_up2_fuse_bwd"),
    "lateral_up2_fuse": ("_lateral_gram", "_lateral_up2_fuse_fwd", "_lateral_grad_z",
                         "_up2_fuse_bwd_coarse"),
    "bn_silu": ("_bn_silu_stats", "_bn_silu_fwd", "_bn_silu_bwd_sums", "_bn_silu_bwd"),
}


def _load_extension():
    try:
        return importlib.import_module("litefpn_kernels._C")
    except ImportError as exc:
        warnings.warn(
            f"litefpn_kernels: the C++/CUDA extension is not built ({exc}); the 'cpu' and 'cuda' "
            "backends are unavailable, 'eager' and 'triton' still work. Build it with "
            "`pip install -e . --no-build-isolation`.", RuntimeWarning, stacklevel=3)
        return None


EXTENSION = _load_extension()


def _has_kernel(schema, key):
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"litefpn::{schema}", key)
    except RuntimeError:  # the schema itself is not registered
        return False


#: (op, dispatch key) pairs the extension has every kernel of.
COMPILED_FOR = frozenset(
    (op, key) for op, schemas in SCHEMAS.items() for key in ("CPU", "CUDA")
    if EXTENSION is not None and all(_has_kernel(s, key) for s in schemas))


def _reason_cpu(op, device):
    if device.type != "cpu":
        return f"the 'cpu' backend runs CPU tensors only, got a {device.type} tensor"
    if EXTENSION is None:
        return "the C++ extension litefpn_kernels._C is not built"
    if (op, "CPU") not in COMPILED_FOR:
        return f"litefpn_kernels._C has no CPU kernels for {op}"
    return None


def arch_covered(capability, archs):
    """Whether a build for `archs` (compute capabilities x10, e.g. [80, 90]) runs on a GPU of
    `capability` (x10): SASS of an arch runs on later minors of its major (80 on 86, 89), and
    the highest arch's PTX (embedded by setup.py's default) JIT-compiles on any newer GPU."""
    return any(a // 10 == capability // 10 and a <= capability for a in archs) or (
        bool(archs) and capability >= max(archs))


def _uncovered_cuda_devices():
    """{device index: why the CUDA kernels cannot run there} for the visible GPUs, settled at
    import (a GPU build only: it reads each device's capability, which initialises CUDA)."""
    if not any(key == "CUDA" for _, key in COMPILED_FOR) or not torch.cuda.is_available():
        return {}
    archs = list(torch.ops.litefpn._cuda_archs())
    uncovered = {}
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        if not arch_covered(10 * major + minor, archs):
            uncovered[index] = (
                f"litefpn_kernels._C has no code for cuda:{index}'s sm_{major}{minor} (built for "
                f"{', '.join(f'sm_{a}' for a in archs)}); rebuild with TORCH_CUDA_ARCH_LIST="
                f"\"{major}.{minor}\"")
    if uncovered:
        warnings.warn(f"litefpn_kernels: {'; '.join(uncovered.values())}. backend='auto' uses "
                      "triton (or eager) there.", RuntimeWarning, stacklevel=3)
    return uncovered


UNCOVERED_CUDA_DEVICES = _uncovered_cuda_devices()


def _reason_cuda(op, device):
    if device.type != "cuda":
        return f"the 'cuda' backend runs CUDA tensors only, got a {device.type} tensor"
    if UNCOVERED_CUDA_DEVICES:  # empty (no lookup) unless a visible GPU is not covered
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index in UNCOVERED_CUDA_DEVICES:
            return UNCOVERED_CUDA_DEVICES[index]
    if (op, "CUDA") not in COMPILED_FOR:
        if EXTENSION is not None and not any(key == "CUDA" for _, key in COMPILED_FOR):
            return ("litefpn_kernels._C was built without CUDA kernels (needs a CUDA torch and "
                    "nvcc at build time, or FORCE_CUDA=1)")
        if EXTENSION is None:
            return "the C++ extension litefpn_kernels._C is not built"
        return f"litefpn_kernels._C has no CUDA kernels for {op}"
    return None


register_backend("cpu", _reason_cpu)
register_backend("cuda", _reason_cuda)


def _up2_fuse(device_key, steps):
    o = torch.ops.litefpn
    if device_key == "CPU":  # the backward pass in C++ (csrc/cpu/passes.cpp, CPU only)
        return Up2FuseKernels(fwd=o._up2_fuse_fwd, grad=o._up2_fuse_grad)
    from ..ops import _passes
    return _passes.up2_fuse(fwd=o._up2_fuse_fwd, bwd=o._up2_fuse_bwd, steps=steps)


def _lateral_up2_fuse(device_key, steps):
    o = torch.ops.litefpn
    if device_key == "CPU":  # the passes in C++ (csrc/cpu/passes.cpp, CPU only)
        return LateralUp2FuseKernels(moments=o._lateral_moments, apply=o._lateral_apply,
                                     grad_sums=o._lateral_grad_sums,
                                     grad_inputs=o._lateral_grad_inputs)
    from ..ops import _passes
    return _passes.lateral_up2_fuse(gram=o._lateral_gram, fwd=o._lateral_up2_fuse_fwd,
                                    grad_z=o._lateral_grad_z, bwd_coarse=o._up2_fuse_bwd_coarse,
                                    steps=steps)


def _bn_silu(device_key, steps):
    o = torch.ops.litefpn
    if device_key == "CPU":
        return BnSiluKernels(moments=o._bn_silu_moments, apply=o._bn_silu_apply,
                             grad_sums=o._bn_silu_grad_sums, grad_x=o._bn_silu_grad_x)
    from ..ops import _passes
    return _passes.bn_silu(stats=o._bn_silu_stats, fwd=o._bn_silu_fwd,
                           bwd_sums=o._bn_silu_bwd_sums, bwd=o._bn_silu_bwd, steps=steps)


def gpu_steps():
    """The small math of the `cuda` backend's passes: the Triton steps (one or two launches a
    step, litefpn_kernels/triton/steps.py) where Triton is installed (every CUDA build of torch
    has it), else the PyTorch steps (ops/_steps.py: a few to a few dozen small launches)."""
    if TRITON_IMPORTABLE:
        from ..triton import steps
        return steps
    from ..ops import _steps
    return _steps


#: ops whose kernels csrc/ implements per backend. An op is registered for a backend if it is
#: listed here or the built extension has its kernels; availability is then exact per op
#: (COMPILED_FOR), so a build without CUDA says so, and a CUDA build without an op's kernels
#: (e.g. bn_silu before csrc/cuda/bn_silu.cu) says so and `auto` moves on to triton, instead
#: of failing in the dispatcher.
IMPLEMENTED = {"cpu": ("up2_fuse", "lateral_up2_fuse", "bn_silu"),
               "cuda": ("up2_fuse", "lateral_up2_fuse", "bn_silu")}
_FACTORIES = {"up2_fuse": _up2_fuse, "lateral_up2_fuse": _lateral_up2_fuse, "bn_silu": _bn_silu}


def kernel_set(op, device_key, steps=None):
    """`op`'s kernel set of the backend of `device_key` ("CPU": the C++ passes; "CUDA": the
    passes around the kernels with `steps` (default: `gpu_steps()`); with the PyTorch steps they
    also run on CPU tensors through the CPU kernels: benchmarks/bandwidth_model.py counts the
    GPU backends' kernels that way)."""
    return _FACTORIES[op](device_key, gpu_steps() if steps is None else steps)


for _backend, _key in (("cpu", "CPU"), ("cuda", "CUDA")):
    for _op in _FACTORIES:
        if _op in IMPLEMENTED[_backend] or (_op, _key) in COMPILED_FOR:
            register(_op, _backend)(functools.partial(kernel_set, _op, _key))
