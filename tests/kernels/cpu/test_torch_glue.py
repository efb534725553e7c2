"""Large outputs of the CPU kernels are advised onto transparent huge pages before their first
write (csrc/cpu/common/torch_glue.h), unless LITEFPN_CPU_HUGEPAGES=0."""
import os
import subprocess
import sys

import pytest
import torch

THP = "/sys/kernel/mm/transparent_hugepage/enabled"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.exists(THP)
    or "[never]" in open(THP).read(), reason="needs Linux with transparent huge pages")

# Prints whether the VMA holding a fresh 32 MiB up2_fuse output carries the `hg` flag (MADV_HUGEPAGE).
_PROBE = r"""
import torch
from litefpn_kernels import ops
coarse, fine = torch.randn(8, 128, 32, 64), torch.randn(8, 128, 64, 128)
out = ops.up2_fuse(coarse, fine, backend="cpu")
torch.testing.assert_close(out, ops.up2_fuse(coarse, fine, backend="eager"))
addr = out.data_ptr() + out.numel() * out.element_size() // 2
flags = None
with open("/proc/self/smaps") as f:
    for line in f:
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("VmFlags:"):
            flags = line.split()[1:]
print("hg" in flags)
"""


def _probe(env_value):
    env = dict(os.environ)
    env.pop("LITEFPN_CPU_HUGEPAGES", None)
    if env_value is not None:
        env["LITEFPN_CPU_HUGEPAGES"] = env_value
    res = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


def test_large_output_is_advised_onto_huge_pages():
    assert _probe(None) == "True"


def test_hint_can_be_switched_off():
    assert _probe("0") == "False"
