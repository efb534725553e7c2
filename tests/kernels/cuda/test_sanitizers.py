"""csrc/cuda's kernels under AddressSanitizer and ThreadSanitizer, through the host emulation.

Each sanitizer build of the emulated ops (tests/cuda_emu/build.py) runs every launch path on
small inputs (tests/cuda_emu/exercise.py, results checked against float64) in a subprocess with
the sanitizer runtime preloaded into Python. ASan sees any out-of-bounds access to a global
(tensor) buffer or to __shared__ memory (exact-size heap blocks per emulated block); TSan sees
races on __shared__ between __syncthreads (blocks are real threads and barriers).

Seeded-defect controls show that each harness can fail: a copy of csrc/cuda with one mutation
(build.MUTATIONS: an off-by-one channel bound in the gram loads, an off-by-one shared-memory
reduction, a removed barrier in the channel mix) must be reported by its sanitizer.

torch's own OpenMP threads are switched off (OMP_NUM_THREADS=1) in the subprocess: libgomp is
not instrumented, so TSan would report torch-internal accesses between its team threads; the
emulated blocks use their own std::threads, which is what is being checked.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: the cuda_emu package
from cuda_emu import build as emu_build  # noqa: E402

EXERCISE = Path(__file__).resolve().parents[2] / "cuda_emu" / "exercise.py"
TIMEOUT_S = 600
REPORT = {"asan": "ERROR: AddressSanitizer", "tsan": "WARNING: ThreadSanitizer"}


def run_under(sanitizer, variant, group):
    runtime = emu_build.runtime_library(sanitizer)
    if runtime is None:
        pytest.skip(f"{emu_build.CXX} has no {sanitizer} runtime (lib{sanitizer}.so)")
    lib = emu_build.build(variant)
    env = dict(os.environ, LD_PRELOAD=runtime, OMP_NUM_THREADS="1",
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=23",
               TSAN_OPTIONS="exitcode=66:report_signal_unsafe=0")
    proc = subprocess.run([sys.executable, str(EXERCISE), str(lib), group], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    return proc, proc.stdout + proc.stderr


@pytest.mark.parametrize("sanitizer", ["asan", "tsan"])
def test_kernels_are_clean(sanitizer):
    proc, out = run_under(sanitizer, sanitizer, "all")
    assert REPORT[sanitizer] not in out, out[-20000:]
    assert proc.returncode == 0, out[-20000:]
    assert "exercise ok:" in proc.stdout


@pytest.mark.parametrize("variant,group,where", [
    ("asan-oob-global", "oob-global", "heap-buffer-overflow"),
    ("asan-oob-shared", "oob-shared", "heap-buffer-overflow"),
    ("tsan-no-barrier", "no-barrier", "data race"),
])
def test_seeded_defect_is_reported(variant, group, where):
    sanitizer = variant.split("-")[0]
    proc, out = run_under(sanitizer, variant, group)
    assert proc.returncode != 0, out[-20000:]
    assert REPORT[sanitizer] in out and where in out, out[-20000:]
    # the report points into the mutated kernel, not into torch or the emulator
    frame = {"oob-global": "gram_load", "oob-shared": "up2_bwd_nhwc_kernel",
             "no-barrier": "mix_"}[group]
    assert frame in out, out[-20000:]
