"""One table of kernels: (op, backend) -> the op's kernel set, one dataclass shape per op.

A backend registers a kernel set per op it implements (`register`) and says per (op, device)
whether it can run here (`register_backend`'s `reason`). The custom ops in `litefpn_kernels.ops`
look their kernels up with `kernels(op, backend)` and never ask which backend they got: every
backend of an op has the same contract (csrc/ops.cpp). To add a backend: register its name with
`register_backend`, then one factory per op with `register`; see `compiled.py` and
`triton_kernels.py` (and tests/support/contract.py, a backend registered by the tests only).
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

#: the public operators, in the order of the package's docs.
OPS = ("up2_fuse", "lateral_up2_fuse", "bn_silu")


@dataclass(frozen=True)
class Up2FuseKernels:
    """up2_fuse: the kernel `fwd` (contract: csrc/ops.cpp, `_up2_fuse_fwd`) and the backward pass
    `grad` (`_up2_fuse_grad`: the kernel `_up2_fuse_bwd` and the fusion weights' chain rule;
    `ops/_passes.py` builds it from a backend's kernels)."""
    fwd: Callable
    grad: Callable


@dataclass(frozen=True)
class LateralUp2FuseKernels:
    """lateral_up2_fuse, one entry per pass, each a kernel with BatchNorm's small math around it
    (contracts: csrc/ops.cpp, "Passes"; `ops/_passes.py` builds them from a backend's kernels
    `_lateral_gram`, `_lateral_up2_fuse_fwd`, `_lateral_grad_z`, `_up2_fuse_bwd_coarse`)."""
    moments: Callable
    apply: Callable
    grad_sums: Callable
    grad_inputs: Callable


@dataclass(frozen=True)
class BnSiluKernels:
    """bn_silu, one entry per pass (contracts: csrc/ops.cpp, "Passes"; `ops/_passes.py` builds
    them from a backend's kernels `_bn_silu_{stats,fwd,bwd_sums,bwd}`)."""
    moments: Callable
    apply: Callable
    grad_sums: Callable
    grad_x: Callable


KERNEL_SETS = {"up2_fuse": Up2FuseKernels, "lateral_up2_fuse": LateralUp2FuseKernels,
               "bn_silu": BnSiluKernels}

#: backend name -> reason(op, device) -> None if it runs `op` on `device` here, else why not.
_BACKENDS: Dict[str, Callable[[str, torch.device], Optional[str]]] = {}
#: (op, backend) -> factory returning that op's kernel set (called once, on first use).
_TABLE: Dict[Tuple[str, str], Callable[[], object]] = {}
_CACHE: Dict[Tuple[str, str], object] = {}


def register_backend(name: str, reason: Callable[[str, torch.device], Optional[str]]):
    """Declare backend `name`; `reason(op, device)` says why it cannot run `op` on `device`
    here (None: it can). Called for registered (op, backend) pairs only."""
    _BACKENDS[name] = reason


def register(op: str, backend: str):
    """Decorator: `factory()` returns `backend`'s kernel set of `op` (a KERNEL_SETS[op]); it runs
    on first use, so a backend whose import has side effects (triton) stays unimported until
    then."""
    if op not in KERNEL_SETS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")

    def deco(factory):
        _TABLE[(op, backend)] = factory
        _CACHE.pop((op, backend), None)
        return factory
    return deco


def unregister(op: str, backend: str):
    _TABLE.pop((op, backend), None)
    _CACHE.pop((op, backend), None)


def backend_names() -> Tuple[str, ...]:
    return tuple(_BACKENDS)


def has_kernels(op: str, backend: str) -> bool:
    """Whether `backend` implements `op` (eager implements every op, without kernels)."""
    return backend == "eager" or (op, backend) in _TABLE


def available(op: str) -> Tuple[str, ...]:
    """Backends that implement `op`, eager first."""
    return ("eager",) + tuple(b for b in _BACKENDS if (op, b) in _TABLE)


def reason(op: str, backend: str, device: torch.device) -> Optional[str]:
    if not has_kernels(op, backend):
        return f"backend {backend!r} has no {op} kernels (available: {available(op)})"
    return _BACKENDS[backend](op, device)


def kernels(op: str, backend: str):
    """The kernel set of (op, backend); same shape (KERNEL_SETS[op]) for every backend."""
    got = _CACHE.get((op, backend))
    if got is None:
        factory = _TABLE.get((op, backend))
        if factory is None:
            raise RuntimeError(f"{op} has no {backend!r} kernels (available: {available(op)})")
        got = _CACHE[(op, backend)] = factory()
        if not isinstance(got, KERNEL_SETS[op]):
            raise TypeError(f"the {backend!r} kernels of {op} must be a "
                            f"{KERNEL_SETS[op].__name__}, got {type(got).__name__}")
    return got
