"""tests/integration/train_parity.py, shortened: the eager and the fused neck, trained in lockstep from
the same weights on the same batches, give the same loss curve, and the loss falls."""
import copy

import torch

from tests.integration import train_parity
from tests.support.helpers import CPU, need


def test_fused_training_tracks_eager_loss_curve():
    need("lateral_up2_fuse", "cpu", CPU)
    gen = torch.Generator().manual_seed(0)
    batches = [train_parity.make_batch(gen, 2, (2, 3), CPU, torch.float32) for _ in range(20)]
    torch.manual_seed(0)
    eager = train_parity.Model("eager").to(memory_format=torch.channels_last)
    fused = copy.deepcopy(eager)
    fused.neck.backend = "cpu"
    results = train_parity.train_side_by_side({"eager": eager, "cpu": fused}, batches, lr=0.01)
    (loss_e, rate_e), (loss_f, rate_f) = results["eager"], results["cpu"]
    assert len(loss_e) == len(loss_f) == 20 and rate_e > 0 and rate_f > 0
    # fp32 through 20 SGD steps: the curves agree to a few 1e-6 relative here (2.4e-5 over 300
    # steps of the full example); 1e-4 leaves room for the order of summation, not for a bug
    for step, (a, b) in enumerate(zip(loss_e, loss_f)):
        assert abs(a - b) <= 1e-4 * abs(a), (step, a, b)
    assert loss_e[-1] < 0.5 * loss_e[0]
    for p_e, p_f in zip(eager.parameters(), fused.parameters()):
        torch.testing.assert_close(p_f, p_e, rtol=1e-4, atol=1e-5)
