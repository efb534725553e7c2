"""The wheel: built from this tree, installed into a fresh virtualenv, imported and run from
outside the source tree.

Time: build_ext compiles into build/temp/ for every build (setup.py), so `pip wheel` reuses the
objects of `make build` (ninja: no work) instead of recompiling every kernel (3-4 minutes on
CI). The `_C.so` that `make test` just built and tested is put where build_ext looks for its
output (build/lib.<platform>-<tag>/), newer than every object, so bdist_wheel packages exactly
that binary: seconds, and the wheel holds the tested build.
The fresh venv has no pip and no site-packages of its own besides the wheel; torch (a 700 MB
dependency that cannot be downloaded in CI's time) comes from this interpreter's
site-packages via a .pth line, which adds that directory without running its .pth files (so no
editable install of litefpn_kernels leaks in; the test checks where the package is imported
from).
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
import torch

import litefpn_kernels
from litefpn_kernels import backends
from tests.support.helpers import ROOT

RUN_FROM_OUTSIDE = r"""
import os, sys, torch
import litefpn_kernels
from litefpn_kernels import eager, ops, info
venv = sys.argv[1]
assert litefpn_kernels.__file__.startswith(venv), litefpn_kernels.__file__
assert litefpn_kernels.backends.extension() is not None, "the wheel's _C did not load"
g = torch.Generator().manual_seed(0)
coarse = torch.randn(2, 8, 4, 6, generator=g)
fine = torch.randn(2, 8, 8, 12, generator=g)
w_c, w_f = torch.tensor([0.3]), torch.tensor([1.2])
got = ops.up2_fuse(coarse, fine, w_c, w_f, backend="cpu")
want = eager.up2_fuse(coarse, fine, w_c, w_f)
torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
print("isa", info.collect()["cpu"]["isa"], "version", litefpn_kernels.__version__)
"""


def _elf_has_debug_info(data: bytes) -> bool:
    return b".debug_info" in data


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    ext = backends.extension()
    if ext is None:
        pytest.skip("the extension is not built")
    if os.path.dirname(os.path.abspath(ext.__file__)) != os.path.join(ROOT, "litefpn_kernels"):
        pytest.skip(f"litefpn_kernels._C is not the in-tree build ({ext.__file__})")
    plat_lib = os.path.join(ROOT, "build", f"lib.{sysconfig.get_platform()}-"
                                             f"{sys.implementation.cache_tag}", "litefpn_kernels")
    os.makedirs(plat_lib, exist_ok=True)
    target = os.path.join(plat_lib, os.path.basename(ext.__file__))
    shutil.copy2(ext.__file__, target)
    os.utime(target)  # newer than every source: build_ext skips compiling
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-build-isolation",
                    "--no-deps", "-q", "-w", str(out)], cwd=ROOT, check=True, timeout=600)
    wheels = glob.glob(str(out / "litefpn_kernels-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contents(wheel):
    assert os.path.basename(wheel).startswith(f"litefpn_kernels-{litefpn_kernels.__version__}-")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        licenses = [n for n in names if n.endswith("licenses/LICENSE")]
        assert licenses, names
        assert z.read(licenses[0]).startswith(b"BSD 3-Clause License")
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        assert "License-Expression: BSD-3-Clause" in meta
        assert "Requires-Dist: torch" in meta
        so = [n for n in names if n.startswith("litefpn_kernels/_C") and n.endswith(".so")]
        assert len(so) == 1, names
        data = z.read(so[0])
    assert not any(n.startswith(("tests/", "benchmarks/", "csrc/")) for n in names)
    if os.environ.get("LITEFPN_DEBUG") != "1":
        assert not _elf_has_debug_info(data), "release _C.so still carries debug info"


def test_wheel_installs_and_runs_outside_the_tree(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    py = str(venv / "bin" / "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    torch_site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    with open(os.path.join(site, "_torch_from_host.pth"), "w") as f:
        f.write(torch_site + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps",
                    "--no-index", "-q", wheel], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    run = subprocess.run([py, "-c", RUN_FROM_OUTSIDE, str(venv)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"version {litefpn_kernels.__version__}" in run.stdout
