"""Helpers shared by the tests: availability skips, tolerances, layouts, determinism and
narrower-ISA runs. (The (backend, device) fixture is in tests/conftest.py.)"""
import os
import subprocess
import sys

import pytest
import torch

from litefpn_kernels import backends
from tests.support.layouts import layout  # noqa: F401  (the tests import it from here too)

CPU = torch.device("cpu")

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def need(op, backend, device):
    """Skip unless `backend` runs `op` on `device` here; -> torch.device(device)."""
    device = torch.device(device)
    reason = backends.unavailable_reason(op, backend, device)
    if reason is not None:
        pytest.skip(reason)
    return device


def randomise(module, seed=0):
    """Move every parameter and BN buffer off its init value, so the comparison sees them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g, dtype=torch.float64))
            elif name.endswith(("bn.weight", "bn1.weight", "weight_a", "weight_b")):
                t.copy_(0.5 + torch.rand(t.shape, generator=g, dtype=torch.float64))
            else:
                t.copy_(0.3 * torch.randn(t.shape, generator=g, dtype=torch.float64))


def assert_same_for_thread_counts(run, counts=(1, 2, 1)):
    """run() -> list of tensors, bitwise the same at every torch.set_num_threads in `counts`."""
    threads = torch.get_num_threads()
    try:
        results = []
        for nt in counts:
            torch.set_num_threads(nt)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)


#: the compiled CPU kernel variants, narrowest first (csrc/cpu/common/cpu_isa.h)
CPU_ISAS = ("default", "avx2", "avx512")


def run_with_cpu_isa(isa, argv, timeout):
    """Runs `python *argv` with the CPU kernels capped at `isa` (LITEFPN_CPU_ISA) and returns the
    CompletedProcess. Skips when that is no narrower than what this process runs (the in-process
    tests cover it then), i.e. the CPU lacks anything wider, or the extension is not built."""
    need("up2_fuse", "cpu", CPU)
    current = torch.ops.litefpn._cpu_isa()
    if CPU_ISAS.index(isa) >= CPU_ISAS.index(current):
        pytest.skip(f"this process already runs the {current!r} kernels")
    env = dict(os.environ, LITEFPN_CPU_ISA=isa)
    return subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_checks_pass_with_cpu_isa(isa, module, checks, timeout=300):
    """Runs `checks` (Python lines using torch and `t`, the test module `module`, dotted from the
    repository root, e.g. "tests.kernels.cpu.test_bn_silu")
    in a subprocess whose CPU kernels are capped at `isa`, after asserting that the cap took."""
    script = "\n".join([
        "import sys, torch",
        f"sys.path.insert(0, {ROOT!r})",
        f"import {module} as t",
        f"assert torch.ops.litefpn._cpu_isa() == {isa!r}",
        checks.strip("\n"),
        'print("ok")'])
    proc = run_with_cpu_isa(isa, ["-c", script], timeout)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
