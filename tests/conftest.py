"""Fixtures and session set-up only; helpers live in tests/support/.

Layout (mirrors the package): ops/ (every backend vs eager, per op), kernels/<backend>/ (each
kernel against its contract), nn/ (the module), compile/ (nvcc and Triton AOT checks without a GPU;
"build" would be skipped by pytest's default norecursedirs),
integration/ (training parity), gpu/ (the GPU-session harness and its dry run), benchmarks/ (the
report's byte accounting and its GPU prediction).
"""
import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is present; the variable
# must be set before any @triton.jit decorator runs, i.e. before litefpn_kernels.triton imports.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# thread-count guard: the shared 2-core machines, split between pytest-xdist workers (make test
# runs two; oversubscribed OpenMP teams spin against each other); determinism tests set their own
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // _WORKERS))

from litefpn_kernels import backends  # noqa: E402
from tests.support import contract  # noqa: E402,F401  (registers the "contract" backend)

#: (backend, device) pairs every operator test runs on; CUDA ones on a GPU machine only.
BACKEND_DEVICES = [
    pytest.param(("contract", "cpu"), id="contract"),
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(("triton", "cpu"), id="triton-interpreter"),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.cuda),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.cuda),
]


@pytest.fixture(params=BACKEND_DEVICES)
def backend_device(request):
    """(backend, torch.device) for the op named by the test module's OP (skipped where that
    backend cannot run it here: not built, no kernels for the op, wrong device)."""
    backend, device = request.param
    op = getattr(request.module, "OP")
    reason = backends.unavailable_reason(op, backend, device)
    if reason is not None:
        pytest.skip(reason)
    return backend, torch.device(device)


@pytest.fixture
def cpu_backend(backend_device):
    """The backend name of `backend_device`, for tests that build CPU inputs (skipped on other
    devices)."""
    name, device = backend_device
    if device.type != "cpu":
        pytest.skip("these tests build CPU inputs")
    return name


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:  # not "cuda" in keywords: folder names count there
            item.add_marker(skip)


def pytest_configure(config):
    # `make test` builds the extension first; there a missing _C is a broken build, not a skip.
    if os.environ.get("LITEFPN_REQUIRE_EXT") == "1":
        if backends.extension() is None:
            raise pytest.UsageError("LITEFPN_REQUIRE_EXT=1 but litefpn_kernels._C is not built")
