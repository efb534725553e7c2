"""Compile check of the CUDA kernels (csrc/cuda/**/*.cu) on machines without a GPU.

Runs ``nvcc -c`` on every ``csrc/cuda/**/*.cu`` for both targets at once (sm_80, sm_90: one host
compile, device code per target, as ``setup.py`` builds), with the flags that ``BuildExtension``
uses for nvcc, against the headers of the installed torch.
The CPU wheel of torch ships the ``c10/cuda`` and ``ATen/cuda`` headers (not the CUDA toolkit's
cuBLAS/cuSPARSE headers, which is why the sources include only ``c10/cuda/*`` and ``ATen/core``
/ ``ATen/ops`` headers, never ``ATen/cuda/CUDAContext.h``). Linking needs a CUDA build of torch
and is not checked here.

Skips (with the reason) when nvcc or torch's CUDA headers are missing. Nothing here needs a GPU.
All selected compilations start together on a thread pool (one nvcc per core), so the module
takes about as long as the slowest file times (files / cores).
"""
import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
SOURCES = sorted(p.relative_to(CUDA_DIR).as_posix() for p in CUDA_DIR.rglob("*.cu"))
ARCHS = ("80", "90")
TIMEOUT_S = 600
# Headers the sources need from torch; the CPU wheel has them (checked, not assumed).
TORCH_CUDA_HEADERS = ("c10/cuda/CUDAStream.h", "c10/cuda/CUDAGuard.h",
                      "c10/cuda/CUDAException.h", "c10/util/Half.h", "ATen/Dispatch.h",
                      "torch/library.h")


def find_nvcc():
    """nvcc from $CUDA_HOME / $CUDA_PATH, then PATH, then /usr/local/cuda; None if absent."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def missing_torch_headers():
    dirs = [Path(d) for d in cpp_extension.include_paths()]
    return [h for h in TORCH_CUDA_HEADERS if not any((d / h).is_file() for d in dirs)]


def nvcc_command(nvcc, source, archs, obj):
    """The compile step of BuildExtension for one .cu and one target, host code unoptimised.

    -std=c++20 is what torch 2.13's BuildExtension passes to nvcc (its headers use C++20);
    C10_CUDA_NO_CMAKE_CONFIGURE_FILE stands in for the cmake-generated c10/cuda header that
    the CPU wheel lacks.
    """
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"],
                str(ROOT / "csrc")]
    return [nvcc, "-c", str(source), "-o", str(obj), *(f"-I{d}" for d in includes),
            "-std=c++20", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
            "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
            *cpp_extension.COMMON_NVCC_FLAGS, "-lineinfo", "-Xcompiler", "-fPIC",
            *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs)]


def compile_one(nvcc, source, out_dir):
    obj = out_dir / f"{Path(source).as_posix().replace('/', '_')}.o"
    cmd = nvcc_command(nvcc, CUDA_DIR / source, ARCHS, obj)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)
    return cmd, proc, obj


@pytest.fixture(scope="module")
def nvcc():
    path = find_nvcc()
    if path is None:
        pytest.skip("nvcc not found ($CUDA_HOME/bin, $CUDA_PATH/bin, PATH, /usr/local/cuda/bin): "
                    "cannot compile-check csrc/cuda")
    missing = missing_torch_headers()
    if missing:
        pytest.skip(f"the installed torch has no CUDA headers ({', '.join(missing)} missing "
                    f"under {cpp_extension.include_paths()})")
    return path


@pytest.fixture(scope="module")
def compiled(request, nvcc, tmp_path_factory):
    """Futures of (cmd, CompletedProcess, object path) for every selected source."""
    wanted = sorted({item.callspec.params["source"]
                     for item in request.session.items
                     if item.module is request.module and hasattr(item, "callspec")
                     and "source" in item.callspec.params})
    out_dir = tmp_path_factory.mktemp("nvcc")
    pool = ThreadPoolExecutor(max_workers=max(1, min(len(wanted), os.cpu_count() or 1)))
    futures = {source: pool.submit(compile_one, nvcc, source, out_dir) for source in wanted}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def _tail(text, lines=60):
    return "\n".join(text.strip().splitlines()[-lines:])


@pytest.mark.parametrize("source", SOURCES)
def test_cuda_source_compiles(compiled, nvcc, source):
    cmd, proc, obj = compiled[source].result()
    assert proc.returncode == 0, (
        f"nvcc failed on csrc/cuda/{source}:\n{' '.join(cmd)}\n"
        f"{_tail(proc.stdout + proc.stderr)}")
    assert obj.is_file() and obj.stat().st_size > 0
    cuobjdump = Path(nvcc).with_name("cuobjdump")
    if cuobjdump.is_file():  # the object really carries code for every target
        listing = subprocess.run([str(cuobjdump), "--list-elf", str(obj)], capture_output=True,
                                 text=True, timeout=60)
        for arch in ARCHS:
            assert f"sm_{arch}" in listing.stdout, listing.stdout + listing.stderr


def test_compile_check_rejects_broken_source(nvcc, tmp_path):
    """The same command fails on a source with an error: the check above can fail."""
    src = tmp_path / "broken.cu"
    src.write_text('#include "litefpn_math.h"\n'
                   "__global__ void k(float* x) { x[0] = litefpn::no_such_function(x[1]); }\n")
    cmd = nvcc_command(nvcc, src, ARCHS[:1], tmp_path / "broken.o")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode != 0
    assert "no_such_function" in proc.stdout + proc.stderr
