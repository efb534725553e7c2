"""tests/gpu/smoke.py (what compute-sanitizer runs on a GPU machine) works: its dry run on
the `cpu` backend passes, so a GPU session spends its time on the GPU, not on the script."""
import pytest

from tests.gpu import smoke as gpu_smoke
from tests.support.helpers import CPU, need


def test_gpu_smoke_dry_run_on_cpu(capsys):
    need("up2_fuse", "cpu", CPU)
    assert gpu_smoke.main(["cpu"]) == 0
    assert "0 failures" in capsys.readouterr().out


@pytest.mark.cuda
def test_gpu_smoke_on_gpu():
    assert gpu_smoke.main(["cuda"]) == 0


def test_profile_small_dry_run_on_cpu(capsys):
    """tests/gpu/profile_small.py (host vs kernel time at the small levels) runs: its CPU dry
    run times eager and the `cpu` backend."""
    need("up2_fuse", "cpu", CPU)
    from tests.gpu import profile_small
    assert profile_small.main(["cpu", "1", "1/16"]) == 0
    out = capsys.readouterr().out
    assert "lateral_up2_fuse" in out and " cpu " in out
