"""Builds of the host emulation of csrc/cuda (see runtime.h), cached by content hash.

    path = build("plain")   # -> build/cuda_emu/<variant>-<hash>/litefpn_cuda_emu.so

Variants: "plain" (-O1), "asan" (-fsanitize=address), "tsan" (-fsanitize=thread), and their
seeded-defect controls "asan-oob-global", "asan-oob-shared", "tsan-no-barrier", which compile a
copy of csrc/cuda with one mutation from MUTATIONS (a textual edit that must match exactly once,
so a changed kernel fails the build instead of silently losing the control). Product sources
carry no test hooks beyond csrc/cuda/device.cuh's switch.

The key hashes every input (sources, flags, compiler, torch version), so CI builds each variant
once per checkout; translation units compile in parallel (2 jobs by default, MAX_JOBS overrides).
Run as a script to prebuild: `python tests/cuda_emu/build.py plain asan tsan`.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[2]
EMU_DIR = Path(__file__).resolve().parent
CUDA_DIR = ROOT / "csrc" / "cuda"
BUILD_ROOT = ROOT / "build" / "cuda_emu"
CXX = os.environ.get("CXX", "g++")
UNITS = ("runtime.cpp", "control_ops.cpp", "up2_fuse_emu.cpp", "lateral_up2_fuse_emu.cpp",
         "bn_silu_emu.cpp")

# (file under csrc/cuda, old text, new text): one seeded defect each.
MUTATIONS = {
    # gram_load reads one channel past the tensor's last (global heap overrun)
    "oob-global": ("lateral_up2_fuse_kernels.cuh", "if (ch < Cx && p < p_end) {",
                   "if (ch <= Cx && p < p_end) {"),
    # the nhwc backward's shared reduction reads one pixel lane past its slots (shared overrun)
    "oob-shared": ("up2_fuse_kernels.cuh", "for (int p = 0; p < Pt; ++p) tot += red[",
                   "for (int p = 0; p <= Pt; ++p) tot += red["),
    # mix_tile without the barrier that keeps the next slice's loads after this slice's reads
    "no-barrier": ("lateral_up2_fuse_kernels.cuh",
                   "      __syncthreads();  // the next slice overwrites sm\n", ""),
}

VARIANTS = {
    "plain": ([], None),
    "asan": (["-fsanitize=address", "-fno-omit-frame-pointer"], None),
    "tsan": (["-fsanitize=thread"], None),
    "asan-oob-global": (["-fsanitize=address", "-fno-omit-frame-pointer"], "oob-global"),
    "asan-oob-shared": (["-fsanitize=address", "-fno-omit-frame-pointer"], "oob-shared"),
    "tsan-no-barrier": (["-fsanitize=thread"], "no-barrier"),
}


def runtime_library(sanitizer):
    """Path of the sanitizer runtime to LD_PRELOAD into Python, or None if g++ has none."""
    name = {"asan": "libasan.so", "tsan": "libtsan.so"}[sanitizer]
    out = subprocess.run([CXX, f"-print-file-name={name}"], capture_output=True, text=True)
    path = out.stdout.strip()
    return path if out.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else None


def _flags(extra):
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    return (["-std=c++20", "-O1", "-g", "-fPIC", "-DLITEFPN_CUDA_EMU", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
             "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function", "-Wno-unused-variable"]
            + [f"-isystem{d}" for d in includes] + extra)


def _link_flags(extra):
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    return ["-shared", *extra, f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu"]


def _snapshot():
    """{path relative to the repo: bytes} of every input, read once: the build compiles exactly
    the bytes its key hashes, even if a file changes while it runs."""
    files = sorted([*CUDA_DIR.rglob("*.cuh"), ROOT / "csrc" / "litefpn_math.h",
                    *EMU_DIR.glob("*.cpp"), *EMU_DIR.glob("*.h"), Path(__file__)])
    return {p.relative_to(ROOT).as_posix(): p.read_bytes() for p in files}


def _key(variant, snap):
    extra, mutation = VARIANTS[variant]
    h = hashlib.sha256()
    for rel, data in snap.items():
        h.update(rel.encode() + b"\0" + data)
    ver = subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout
    h.update(repr((_flags(extra), _link_flags(extra), mutation, torch.__version__, ver)).encode())
    return h.hexdigest()[:16]


def _write_sources(out, snap, mutation):
    """The snapshot under out/src (csrc/..., tests/cuda_emu/...), with the seeded defect if any."""
    src = out / "src"
    if src.exists():
        shutil.rmtree(src)
    for rel, data in snap.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    if mutation is not None:
        fname, old, new = MUTATIONS[mutation]
        path = src / "csrc" / "cuda" / fname
        text = path.read_text()
        count = text.count(old)
        if count != 1:
            raise RuntimeError(f"seeded defect {mutation!r}: {old!r} occurs {count} times in "
                               f"csrc/cuda/{fname} (expected once); update MUTATIONS")
        path.write_text(text.replace(old, new))
    return src


def build(variant="plain", verbose=False):
    """Path of the shared library for `variant`, building it if its inputs changed."""
    extra, mutation = VARIANTS[variant]
    snap = _snapshot()
    out = BUILD_ROOT / f"{variant}-{_key(variant, snap)}"
    lib = out / "litefpn_cuda_emu.so"
    if lib.exists():
        return lib
    out.mkdir(parents=True, exist_ok=True)
    src = _write_sources(out, snap, mutation)
    flags = _flags(extra) + [f"-I{src / 'csrc'}", f"-I{src / 'tests'}"]

    def compile_unit(unit):
        obj = out / (Path(unit).stem + ".o")
        cmd = [CXX, *flags, "-c", str(src / "tests" / "cuda_emu" / unit), "-o", str(obj)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"cuda_emu build ({variant}) failed:\n{' '.join(cmd)}\n"
                               f"{proc.stdout}{proc.stderr[-8000:]}")
        if verbose and proc.stderr:
            print(proc.stderr, file=sys.stderr)
        return obj

    # the controls only need the unit holding their mutation (and the runtime)
    units = UNITS if mutation is None else (
        "runtime.cpp", "control_ops.cpp",
        "up2_fuse_emu.cpp" if MUTATIONS[mutation][0].startswith("up2") else "lateral_up2_fuse_emu.cpp")
    jobs = int(os.environ.get("MAX_JOBS", "2"))
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        objs = list(pool.map(compile_unit, units))
    tmp = out / (lib.name + ".tmp")
    cmd = [CXX, *(str(o) for o in objs), "-o", str(tmp), *_link_flags(extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuda_emu link ({variant}) failed:\n{' '.join(cmd)}\n{proc.stderr}")
    os.replace(tmp, lib)  # atomic: a concurrent or interrupted build never leaves a partial .so
    return lib


if __name__ == "__main__":
    for v in sys.argv[1:] or ["plain"]:
        print(build(v, verbose=True))
