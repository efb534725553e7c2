"""Build of litefpn_kernels._C: CPU kernels always, CUDA kernels when a CUDA toolkit is usable.

CUDA is built when torch has CUDA and nvcc is found, or when FORCE_CUDA=1.
Release builds (the default) link the CPU extension with --strip-debug: Python's CFLAGS carry -g,
which made _C.so 20.8 MB, 2.3 MB without debug sections (measured, GCC 12). LITEFPN_DEBUG=1
keeps the debug information.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT)
                  for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _extensions():
    sources = _sources("csrc/ops.cpp") + _sources("csrc/cpu/**/*.cpp")
    with_cuda = os.environ.get("FORCE_CUDA", "0") == "1" or (
        torch.cuda.is_available() and CUDA_HOME is not None)
    cxx_flags = ["-O3", "-fopenmp", "-fdiagnostics-color=always"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        sources += _sources("csrc/cuda/**/*.cu")
        # Default targets: sm_80 (A100) and sm_90 (H100/H200) code, plus sm_90 PTX that newer GPUs
        # JIT-compile; litefpn::_cuda_archs() reports what a build carries. TORCH_CUDA_ARCH_LIST
        # (torch's variable, e.g. "8.6;8.9+PTX") replaces the default: BuildExtension then adds
        # the -gencode flags itself, which it skips when they are given here.
        arch_flags = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else [
            "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
            "-gencode=arch=compute_90,code=compute_90"]
        return [CUDAExtension(
            "litefpn_kernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", *arch_flags]},
            extra_link_args=["-fopenmp"])]
    release_link = [] if os.environ.get("LITEFPN_DEBUG", "0") == "1" else ["-Wl,--strip-debug"]
    return [CppExtension("litefpn_kernels._C", sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx_flags},
                         extra_link_args=["-fopenmp", *release_link])]


class _BuildExt(BuildExtension.with_options(no_python_abi_suffix=True)):
    """Objects always go to build/temp/, editable installs included (setuptools gives those a
    throw-away directory): ninja then recompiles only what changed, and a wheel built after
    `make build` reuses its objects and only links (tests/compile/test_wheel.py)."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "temp")


setup(
    packages=find_packages(include=["litefpn_kernels", "litefpn_kernels.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": _BuildExt},
)
