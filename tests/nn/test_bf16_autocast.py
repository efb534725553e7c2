"""LiteFPN on the fused CPU kernels under torch.autocast("cpu", bfloat16), the CPU bf16
serving/training set-up: activations stay bf16 through the fused operators (no hidden fp32
copies of a feature map), outputs have eager autocast's dtypes, and the results are within bf16
tolerances of an fp32 reference (and no further from it than eager autocast is)."""
import collections
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from litefpn_kernels import LiteFPN
from tests.support.helpers import TOL, need, randomise
from tests.support.inputs import make_feats

OP = "lateral_up2_fuse"
SMALL = dict(in_channels=(8, 12, 16, 24), channels=32)
#: relative-norm bound: the bf16 tolerance the op tests use (tests/support/helpers.TOL)
BF16_REL = TOL[torch.bfloat16]["rtol"]
GATES = (None, "se")


def rel(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


class ActivationCasts(TorchDispatchMode):
    """Counts dtype conversions of 4-D tensors (feature maps, not weights: 4-D conv weights are
    [C, Cin, k, k] with k <= 3) and the input dtypes of the litefpn custom ops."""

    def __init__(self):
        super().__init__()
        self.map_casts, self.op_inputs = [], collections.defaultdict(set)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            t = args[0]
            if t.dim() == 4 and t.shape[-1] > 3:
                self.map_casts.append((tuple(t.shape), t.dtype, kwargs.get("dtype")))
        elif func.namespace == "litefpn":
            for a in args:
                if isinstance(a, torch.Tensor) and a.dim() == 4 and a.shape[-1] > 3:
                    self.op_inputs[func._schema.name.split("::")[-1]].add(a.dtype)
        return func(*args, **kwargs)


def necks(gate, training):
    torch.manual_seed(0)
    ref = LiteFPN(**SMALL, fuse="weighted", gate=gate, backend="eager")
    randomise(ref)
    ref = ref.to(memory_format=torch.channels_last).train(training)
    eager, fused = copy.deepcopy(ref), copy.deepcopy(ref)
    fused.backend = "cpu"
    return ref, eager, fused


def feats_pair():
    feats = make_feats(batch=4, top=(4, 8), in_channels=SMALL["in_channels"], channels_last=True)
    return feats, [f.to(torch.bfloat16) for f in feats]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("gate", GATES)
def test_fused_cpu_keeps_activations_bf16_under_autocast(gate, training):
    need(OP, "cpu", "cpu")
    _, eager, fused = necks(gate, training)
    _, feats = feats_pair()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(training):
        want = eager(feats)
        with ActivationCasts() as casts:
            got = fused(feats)
    assert casts.map_casts == []
    # no gate: one lateral_up2_fuse per level; SE: lateral conv + BN, then up2_fuse
    assert casts.op_inputs["up2_fuse" if gate == "se" else "lateral_up2_fuse"] == {torch.bfloat16}
    assert all(dtypes == {torch.bfloat16} for dtypes in casts.op_inputs.values()), casts.op_inputs
    if training:  # the smooths' BN + SiLU is the fused bn_silu in training
        assert casts.op_inputs["bn_silu"] == {torch.bfloat16}
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert g.dtype == w.dtype == torch.bfloat16


@pytest.mark.parametrize("gate", GATES)
def test_bf16_autocast_accuracy_against_fp32(gate):
    need(OP, "cpu", "cpu")
    for training in (False, True):
        ref, eager, fused = necks(gate, training)
        feats, feats16 = feats_pair()
        want = ref(feats)[:4]
        outs = {}
        for name, m in (("eager", eager), ("cpu", fused)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs[name] = m(feats16)[:4]
        for k, (w, e, f) in enumerate(zip(want, outs["eager"], outs["cpu"])):
            err_f, err_e = rel(f, w), rel(e, w)
            assert err_f <= BF16_REL, f"output {k}: fused bf16 rel error {err_f:.4f}"
            # no further from fp32 than eager autocast (plus one bf16 ulp of slack)
            assert err_f <= 1.5 * err_e + 2 ** -8, f"output {k}: {err_f:.4f} vs eager {err_e:.4f}"
        if not training:
            continue
        sum(o.square().mean() for o in want).backward()
        for name in ("eager", "cpu"):
            sum(o.float().square().mean() for o in outs[name]).backward()
        # all parameter gradients as one vector: per-scalar ones (fusion weights) cancel
        flat = {n: torch.cat([p.grad.flatten().double() for p in m.parameters()])
                for n, m in (("ref", ref), ("eager", eager), ("cpu", fused))}
        err_f, err_e = rel(flat["cpu"], flat["ref"]), rel(flat["eager"], flat["ref"])
        assert err_f <= BF16_REL, f"parameter grads: fused bf16 rel error {err_f:.4f}"
        assert err_f <= 1.5 * err_e + 2 ** -8, f"parameter grads: {err_f:.4f} vs eager {err_e:.4f}"
        for (name, b_ref), b_f in zip(ref.named_buffers(), fused.buffers()):
            if b_ref.dtype.is_floating_point:
                assert rel(b_f, b_ref) <= BF16_REL, f"{name}: {rel(b_f, b_ref):.4f}"
            else:
                assert torch.equal(b_f, b_ref), name
