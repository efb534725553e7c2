"""`python -m litefpn_kernels.info` and `litefpn_kernels.info.collect()` on this machine."""
import json
import os
import subprocess
import sys

import pytest
import torch

import litefpn_kernels
from litefpn_kernels import backends, info
from tests.support.helpers import ROOT


def run_info(*args, **env):
    full_env = {**os.environ, **env}
    for k, v in env.items():
        if v is None:
            full_env.pop(k)
    out = subprocess.run([sys.executable, "-m", "litefpn_kernels.info", *args], cwd=ROOT,
                         env=full_env, capture_output=True, text=True, timeout=300, check=True)
    return out.stdout


def test_collect_matches_this_process():
    d = info.collect()
    assert d["versions"]["litefpn_kernels"] == litefpn_kernels.__version__
    assert d["versions"]["torch"] == torch.__version__
    assert d["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert d["extension"]["built"] == (backends.extension() is not None)
    for op, per_backend in d["backends"].items():
        for backend, per_device in per_backend.items():
            assert per_device["cpu"] == backends.unavailable_reason(op, backend, "cpu")
        assert d["auto"][op]["cpu"] == backends.resolve(op, "auto", torch.device("cpu"))
    assert d["triton"]["interpreter"] == (os.environ.get("TRITON_INTERPRET") == "1")
    json.dumps(d)  # serialisable as promised


def test_cli_reports_isa_cap_and_triton_switches():
    if backends.extension() is None:
        pytest.skip("the extension is not built")
    d = json.loads(run_info("--json", LITEFPN_CPU_ISA="default", TRITON_INTERPRET="0",
                            LITEFPN_TRITON_PLAN="gpu"))
    assert d["cpu"]["isa"] == "default" and d["cpu"]["isa_cap"] == "default"
    assert d["extension"]["compiler"]  # GCC/clang string from the .so
    assert d["triton"]["interpreter"] is False and d["triton"]["launch_plan"] == "gpu"
    # without the interpreter, triton cannot run CPU tensors, and says so
    for op in ("up2_fuse", "lateral_up2_fuse", "bn_silu"):
        assert "TRITON_INTERPRET=1" in d["backends"][op]["triton"]["cpu"]
    assert "CUDA tensors only" in d["backends"]["lateral_up2_fuse"]["cuda"]["cpu"]
    assert d["backends"]["lateral_up2_fuse"]["cpu"]["cpu"] is None
    if not torch.cuda.is_available():
        assert d["cuda"]["archs_compiled"] is None and d["cuda"]["device"] is None
    else:
        assert d["cuda"]["device"]["covered"] is not None

    text = run_info(LITEFPN_CPU_ISA=None, TRITON_INTERPRET="1")
    uncapped = info.collect()["cpu"]["isa"] if not os.environ.get("LITEFPN_CPU_ISA") else None
    assert text.startswith(f"litefpn_kernels {litefpn_kernels.__version__}")
    if uncapped:
        assert f"kernels use ISA {uncapped} (LITEFPN_CPU_ISA=unset)" in text
    assert "interpreter on (TRITON_INTERPRET=1)" in text
    assert "lateral_up2_fuse  (auto: cpu->cpu" in text
