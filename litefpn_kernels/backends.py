"""Which kernel runs an operator: backend names, what is built here, and `auto` selection.

One place decides availability, so every operator gives the same clear error for a backend that
is unknown or not built on this machine.
"""
import importlib
import importlib.util
import os
import warnings

import torch

#: every backend name an operator accepts, besides "auto".
BACKENDS = ("eager", "cpu", "triton", "cuda")

#: what `backend="auto"` picks per device type, fastest first (see README, "Backends").
AUTO_ORDER = {
    "cpu": ("cpu", "eager"),
    "cuda": ("cuda", "triton", "eager"),
}


def _load_extension():
    try:
        return importlib.import_module("litefpn_kernels._C")
    except ImportError as exc:
        warnings.warn(
            f"litefpn_kernels: the C++/CUDA extension is not built ({exc}); the 'cpu' and 'cuda' "
            "backends are unavailable, 'eager' and 'triton' still work. Build it with "
            "`pip install -e . --no-build-isolation`.", RuntimeWarning, stacklevel=2)
        return None


# Everything `resolve` depends on is settled once, at import: backend choice is then plain
# Python over constants, which torch.compile traces without a graph break.
_EXTENSION = _load_extension()
#: dispatch keys ("CPU", "CUDA") the compiled extension has kernels for.
_COMPILED_FOR = frozenset(
    key for key in ("CPU", "CUDA")
    if _EXTENSION is not None
    and torch._C._dispatch_has_kernel_for_dispatch_key("litefpn::_up2_fuse_fwd", key))
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def extension():
    """The compiled `litefpn_kernels._C`, or None (warned about once, at import) if not built."""
    return _EXTENSION


def triton_interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(backend, device):
    """None if `backend` can run on tensors of `device` here, else why it cannot."""
    dev = device.type
    if backend == "eager":
        return None
    if backend == "cpu":
        if dev != "cpu":
            return f"the 'cpu' backend runs CPU tensors only, got a {dev} tensor"
        if "CPU" not in _COMPILED_FOR:
            return "the C++ extension litefpn_kernels._C is not built"
        return None
    if backend == "cuda":
        if dev != "cuda":
            return f"the 'cuda' backend runs CUDA tensors only, got a {dev} tensor"
        if "CUDA" not in _COMPILED_FOR:
            return ("litefpn_kernels._C was built without CUDA kernels (needs a CUDA torch and "
                    "nvcc at build time, or FORCE_CUDA=1)")
        return None
    if backend == "triton":
        if not _TRITON_IMPORTABLE:
            return "triton is not installed"
        if dev == "cuda":
            return None
        if dev == "cpu" and triton_interpreting():
            return None
        return (f"the 'triton' backend runs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
                f"set before import; got a {dev} tensor")
    raise AssertionError(backend)


def resolve(backend, device):
    """Map `backend` ("auto" or a name in BACKENDS) to the backend that will run on `device`."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("eager",)):
            if unavailable_reason(name, device) is None:
                return name
        return "eager"
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is not available: {reason}")
    return backend
