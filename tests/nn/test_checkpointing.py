"""LiteFPN under activation checkpointing (both modes), fused against eager: outputs, input and
parameter gradients, running statistics and num_batches_tracked (eager's behaviour: the
recomputation updates the running statistics a second time; see README)."""
import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from litefpn_kernels import LiteFPN
from tests.support.helpers import randomise
from tests.support.inputs import make_feats

SMALL = dict(in_channels=(8, 12, 16, 24), channels=16)
OP = "lateral_up2_fuse"
TOL = dict(rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_neck_matches_eager(backend_device, reentrant):
    backend, device = backend_device
    if device.type != "cpu":
        pytest.skip("CPU inputs")
    torch.manual_seed(0)
    eager = LiteFPN(**SMALL, fuse="weighted", backend="eager")
    randomise(eager, 0)
    eager = eager.double().train()
    fused = copy.deepcopy(eager)
    fused.backend = backend
    results = []
    for neck in (eager, fused):
        feats = [f.double().requires_grad_() for f in make_feats(2, (2, 3), SMALL["in_channels"])]
        # the neck's last output (hf) ends in a BN (s2): where non-reentrant recomputation stops
        out = checkpoint(lambda *f: neck(list(f)).hf, *feats, use_reentrant=reentrant)
        out.backward(torch.ones_like(out))
        results.append((out, [f.grad for f in feats]))
    (out_e, grads_e), (out_f, grads_f) = results
    torch.testing.assert_close(out_f, out_e, **TOL)
    for a, b in zip(grads_f, grads_e):
        torch.testing.assert_close(a, b, **TOL)
    for (name, p), q in zip(eager.named_parameters(), fused.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, **TOL, msg=lambda m: f"{name}: {m}")
    for (name, b), c in zip(eager.named_buffers(), fused.buffers()):
        torch.testing.assert_close(c, b, **TOL, msg=lambda m: f"{name}: {m}")
        if name.endswith("num_batches_tracked"):
            assert int(b) == 2, name  # forward + recomputation
