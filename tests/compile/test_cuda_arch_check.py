"""`auto` never picks CUDA kernels that this build has no code for: the arch rule, and the
fallback it causes (the GPU itself is simulated; the rule is what runs on a GPU machine)."""
import pytest
import torch

from litefpn_kernels import backends
from litefpn_kernels.backends import compiled


@pytest.mark.parametrize("capability,archs,covered", [
    (80, [80, 90], True), (86, [80, 90], True), (89, [80, 90], True),  # sm_80 SASS on 8.x
    (90, [80, 90], True), (100, [80, 90], True),  # 10.0 JITs the sm_90 PTX
    (75, [80, 90], False), (70, [80], False),
    (86, [90], False), (90, [], False)])
def test_arch_covered(capability, archs, covered):
    assert compiled.arch_covered(capability, archs) is covered


def test_uncovered_gpu_makes_auto_fall_back_to_triton(monkeypatch):
    monkeypatch.setattr(compiled, "UNCOVERED_CUDA_DEVICES",
                        {0: "litefpn_kernels._C has no code for cuda:0's sm_75"})
    device = torch.device("cuda", 0)
    assert "sm_75" in backends.unavailable_reason("up2_fuse", "cuda", device)
    assert backends.resolve("up2_fuse", "auto", device) == "triton"
    with pytest.raises(RuntimeError, match="sm_75"):
        backends.resolve("up2_fuse", "cuda", device)
