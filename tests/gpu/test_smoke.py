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
