"""Which kernels run an operator: backend names, what is built here, and `auto` selection.

Why two tiers: the public operators are Python custom ops (`litefpn_kernels.ops`), and the
backend is an argument of the op, not the dispatch key, because a Triton and a CUDA
implementation both run on CUDA tensors (the device key alone cannot pick between them). Each
backend registers one kernel set per op in `registry` (`compiled.py`: cpu and cuda from
litefpn_kernels._C; `triton_kernels.py`: triton); `eager` is the plain composition in
`litefpn_kernels.eager` and implements every op. One place decides availability, per op, so
every operator gives the same clear error for a backend that is unknown, lacks the op, or is not
built on this machine.
"""
import torch

from . import compiled, registry, triton_kernels

#: every backend name an operator accepts, besides "auto".
BACKENDS = ("eager", "cpu", "triton", "cuda")

#: what `backend="auto"` picks per device type, fastest first (see README, "Backends").
AUTO_ORDER = {
    "cpu": ("cpu", "eager"),
    "cuda": ("cuda", "triton", "eager"),
}

registry.register_backend("eager", lambda op, device: None)


def extension():
    """The compiled `litefpn_kernels._C`, or None (warned about once, at import) if not built."""
    return compiled.EXTENSION


def triton_interpreting():
    return triton_kernels.interpreting()


def names():
    """Every backend name accepted now: BACKENDS, plus any registered later (tests register a
    'contract' backend)."""
    return BACKENDS + tuple(b for b in registry.backend_names() if b not in BACKENDS)


def unavailable_reason(op, backend, device):
    """None if `backend` can run `op` on tensors of `device` here, else why it cannot."""
    if backend not in names():
        raise ValueError(f"unknown backend {backend!r}")
    return registry.reason(op, backend, torch.device(device))


def resolve(op, backend, device):
    """Map `backend` ("auto" or a name in `names()`) to the backend that runs `op` on `device`."""
    accepted = names()
    if not isinstance(backend, str) or (backend != "auto" and backend not in accepted):
        raise ValueError(f"backend must be 'auto' or one of {accepted}, got {backend!r}")
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("eager",)):
            if registry.reason(op, name, device) is None:
                return name
        return "eager"
    if not registry.has_kernels(op, backend):
        raise RuntimeError(f"backend={backend!r} has no {op} kernels (available: "
                           f"{registry.available(op)})")
    reason = registry.reason(op, backend, device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is not available: {reason}")
    return backend
