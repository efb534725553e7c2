"""The reference LiteFPN module against the spec (tests/spec.py), not against itself."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from litefpn_kernels import LiteFPN, LiteFPNOutput
from litefpn_kernels.eager import fusion_weights, up2
from tests.support import spec
from tests.support.helpers import randomise as _randomise
from tests.support.inputs import make_feats

SMALL = dict(in_channels=(8, 12, 16, 24), channels=16)


def _opts(**kw):
    return {**spec.DEFAULT_OPTS, **kw}


# --------------------------------------------------------------------------- Up2 and weights
@pytest.mark.parametrize("h,w", [(1, 1), (1, 5), (3, 1), (3, 5), (4, 8), (7, 2)])
def test_up2_is_the_spec_formula(h, w):
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    torch.testing.assert_close(up2(x), spec.up2(x), rtol=0, atol=1e-15)
    # every input pixel carries a total weight of 2 per axis: the spatial mean is kept
    torch.testing.assert_close(up2(x).mean((2, 3)), x.mean((2, 3)), rtol=0, atol=1e-14)


def test_fusion_weights_match_softplus_normalisation():
    wa = torch.tensor([1.0, -3.0, 25.0, 0.0], dtype=torch.float64)
    wb = torch.tensor([1.0, 2.0, -1.0, 30.0], dtype=torch.float64)
    a, b = fusion_weights(wa, wb)
    sa, sb = spec.softplus(wa), spec.softplus(wb)
    torch.testing.assert_close(a, sa / (sa + sb + 1e-4), rtol=1e-15, atol=0)
    torch.testing.assert_close(b, sb / (sa + sb + 1e-4), rtol=1e-15, atol=0)
    assert a[0].item() == pytest.approx(0.5 * math.log1p(math.e) / (math.log1p(math.e) + 5e-5))


# --------------------------------------------------------------------------- shapes
def test_spec_shapes():
    neck = LiteFPN(backend="eager")
    feats = [torch.randn(2, 32, 64, 128), torch.randn(2, 64, 32, 64),
             torch.randn(2, 128, 16, 32), torch.randn(2, 256, 8, 16)]
    with torch.no_grad():
        out = neck(feats)
    assert isinstance(out, LiteFPNOutput)
    assert out.hf.shape == (2, 128, 64, 128)
    assert out.p3_td.shape == (2, 128, 32, 64)
    assert out.p4_td.shape == (2, 128, 16, 32)
    assert out.p5.shape == (2, 128, 8, 16)
    assert out.n3 is None and out.n4 is None and out.n5 is None


@pytest.mark.parametrize("top", [(3, 5), (1, 1), (1, 7), (5, 2)])
def test_odd_sizes_match_spec(top):
    neck = LiteFPN(backend="eager", **SMALL).double()
    _randomise(neck)
    neck.eval()
    feats = make_feats(top=top, dtype=torch.float64)
    out = neck(feats)
    ref, _ = spec.litefpn(feats, neck.state_dict(), _opts(), training=False)
    h, w = top
    assert out.hf.shape == (2, 16, 8 * h, 8 * w)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_official_lite_hrnet18_channels():
    neck = LiteFPN(backend="eager", in_channels=(40, 80, 160, 320), channels=128)
    feats = make_feats(top=(2, 3), in_channels=(40, 80, 160, 320))
    with torch.no_grad():
        out = neck(feats)
    assert out.hf.shape == (2, 128, 16, 24)


# --------------------------------------------------------------------------- every option
ALL_OPTIONS = [
    dict(fuse=f, gate=g, hr_fusion=hr, pan=pan, down=d, anti_alias=aa)
    for f, g, hr in itertools.product(("add", "weighted"), (None, "se", "coord"), ("add", "concat"))
    for pan, d, aa in ((False, "dwconv", False), (True, "dwconv", False), (True, "avgpool", True),
                       (True, "dwconv", True), (True, "avgpool", False))
]


@pytest.mark.parametrize("opts", ALL_OPTIONS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_every_option_matches_spec_train_and_eval(opts):
    neck = LiteFPN(backend="eager", **SMALL, **opts).double()
    _randomise(neck)
    feats = make_feats(top=(2, 3), dtype=torch.float64, requires_grad=True)
    sd = {k: v.clone() for k, v in neck.state_dict().items()}
    for training in (True, False):
        neck.train(training)
        out = neck(feats)
        ref, new_sd = spec.litefpn(feats, sd, _opts(**opts), training)
        assert len([t for t in out if t is not None]) == (7 if opts["pan"] else 4)
        for got, want in zip(out, ref):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        # BN buffers after the step: running stats (unbiased var) and num_batches_tracked
        for name, value in neck.state_dict().items():
            torch.testing.assert_close(value, new_sd[name], rtol=1e-9, atol=1e-12, msg=name)
        sd = {k: v.clone() for k, v in neck.state_dict().items()}
        # backward runs and reaches every input and parameter used
        grads = torch.autograd.grad(sum(o.sum() for o in out if o is not None),
                                    feats + [p for p in neck.parameters()], allow_unused=True)
        assert all(g is not None and torch.isfinite(g).all() for g in grads[:4])


def test_gradients_match_spec():
    opts = dict(fuse="weighted", gate="se", pan=True)
    neck = LiteFPN(backend="eager", **SMALL, **opts).double()
    _randomise(neck)
    feats = make_feats(top=(2, 2), dtype=torch.float64, requires_grad=True)
    params = dict(neck.named_parameters())
    out = neck(feats)
    sd = {**neck.state_dict(), **params}  # parameters as leaves, for autograd through the spec
    ref, _ = spec.litefpn(feats, sd, _opts(**opts), training=True)
    weights = [torch.randn_like(o) for o in out]
    got = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)),
                              feats + list(params.values()))
    want = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ref, weights)),
                               feats + list(params.values()))
    for name, a, b in zip(["b1", "b2", "b3", "b4"] + list(params), got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name)


# --------------------------------------------------------------------------- init
def test_initialisation_follows_spec():
    torch.manual_seed(0)
    neck = LiteFPN(backend="eager", fuse="weighted", gate="se", pan=True)
    for name in ("l2", "l3", "l4", "l5", "s5"):
        assert torch.all(getattr(neck, name).bn.weight == 1.0), name
    for name in ("s2", "s3", "s4", "pan_s3", "pan_s4", "pan_s5"):
        assert torch.all(getattr(neck, name).bn.weight == 0.9), name
    for fuse in ("fuse2", "fuse3", "fuse4", "pan_fuse3"):
        f = getattr(neck, fuse)
        assert f.weight_a.tolist() == [1.0] and f.weight_b.tolist() == [1.0]
        assert f.gate.fc1.bias is not None and torch.all(f.gate.fc1.bias == 0)
        assert f.gate.fc1.out_channels == 128 // 4 and f.gate.fc2.out_channels == 256
    for mod_name, mod in neck.named_modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            assert mod.eps == 1e-5 and mod.momentum == 0.1, mod_name
            assert torch.all(mod.bias == 0) and torch.all(mod.running_var == 1), mod_name
        if isinstance(mod, torch.nn.Conv2d):
            is_gate = ".gate." in f".{mod_name}."
            assert (mod.bias is not None) == is_gate, mod_name
    # Kaiming normal (fan_in, gain sqrt(2)): std of the 3x3 128->128 smooth weight
    w = neck.s4.conv.weight
    assert w.std().item() == pytest.approx(math.sqrt(2.0 / (128 * 9)), rel=0.05)
    assert abs(w.mean().item()) < 0.01
    w = neck.l2.conv.weight
    assert w.std().item() == pytest.approx(math.sqrt(2.0 / 32), rel=0.1)


def test_concat_mode_has_no_fuse2():
    neck = LiteFPN(backend="eager", hr_fusion="concat")
    assert not hasattr(neck, "fuse2")
    assert neck.s2.conv.weight.shape == (128, 256, 3, 3)
    assert neck.s2.bn.weight[0].item() == pytest.approx(0.9)


# --------------------------------------------------------------------------- BN modes
def test_train_uses_batch_stats_eval_uses_running_stats():
    neck = LiteFPN(backend="eager", **SMALL).double()
    feats = make_feats(top=(2, 3), dtype=torch.float64)
    feats = [3.0 + 2.0 * f for f in feats]  # batch stats far from the initial running stats
    neck.train()
    out_train = neck(feats)
    # a lateral with BN in training is normalised per channel: zero mean, unit (biased) var
    p5 = out_train.p5
    torch.testing.assert_close(p5.mean((0, 2, 3)), torch.zeros(16, dtype=torch.float64),
                               atol=1e-10, rtol=0)
    torch.testing.assert_close(p5.var((0, 2, 3), unbiased=False),
                               torch.full((16,), 1 - 1e-5, dtype=torch.float64), atol=1e-3, rtol=0)
    assert int(neck.l5.bn.num_batches_tracked) == 1
    neck.eval()
    out_eval = neck(feats)
    assert int(neck.l5.bn.num_batches_tracked) == 1
    ref, _ = spec.litefpn(feats, neck.state_dict(), _opts(), training=False)
    torch.testing.assert_close(out_eval.hf, ref[0], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out_eval.p5, out_train.p5)


# --------------------------------------------------------------------------- gradcheck / compile
def test_gradcheck_float64_small_neck():
    neck = LiteFPN(backend="eager", in_channels=(2, 3, 4, 5), channels=4, fuse="weighted",
                   gate="se").double()
    _randomise(neck)
    neck.eval()  # batch statistics are checked by test_gradients_match_spec
    feats = make_feats(batch=1, top=(1, 2), in_channels=(2, 3, 4, 5), dtype=torch.float64,
                       requires_grad=True)
    assert torch.autograd.gradcheck(lambda *f: tuple(neck(list(f))[:4]), feats)


@pytest.mark.parametrize("training", [True, False])
def test_torch_compile_fullgraph_matches_eager(training):
    torch.manual_seed(0)
    neck = LiteFPN(backend="eager", **SMALL, fuse="weighted", gate="se").train(training)
    compiled_neck = LiteFPN(backend="eager", **SMALL, fuse="weighted", gate="se").train(training)
    compiled_neck.load_state_dict(neck.state_dict())
    compiled = torch.compile(compiled_neck, fullgraph=True)
    feats = make_feats(top=(2, 3))
    out, got = neck(feats), compiled(feats)
    for a, b in zip(out, got):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(neck.state_dict().items(), compiled_neck.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


# --------------------------------------------------------------------------- layout / autocast
def test_channels_last_in_channels_last_out():
    neck = LiteFPN(backend="eager", **SMALL, fuse="weighted", pan=True).eval()
    feats = make_feats(top=(2, 3), channels_last=True)
    with torch.no_grad():
        out = neck(feats)
        ref = neck([f.contiguous() for f in feats])
    for o, r in zip(out, ref):
        assert o.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_cpu_autocast_bf16(training):
    torch.manual_seed(0)
    neck = LiteFPN(backend="eager", **SMALL, fuse="weighted", gate="se", pan=True).train(training)
    feats = make_feats(top=(2, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = neck(feats)
    # the convolutions run in bf16 under CPU autocast, and every output comes from one
    assert all(o.dtype == torch.bfloat16 for o in out)
    assert all(p.dtype == torch.float32 for p in neck.parameters())
    if not training:  # and the values are the spec's within bf16 precision
        opts = _opts(fuse="weighted", gate="se", pan=True)
        sd = {k: v.double() if v.is_floating_point() else v for k, v in neck.state_dict().items()}
        ref, _ = spec.litefpn([f.double() for f in feats], sd, opts, training=False)
        for o, r in zip(out, ref):
            torch.testing.assert_close(o.double(), r, rtol=0.05, atol=0.1)


# --------------------------------------------------------------------------- bad input
def test_bad_constructor_options():
    for kw, word in [(dict(fuse="mul"), "fuse"), (dict(gate="cbam"), "gate"),
                     (dict(hr_fusion="sum"), "hr_fusion"), (dict(down="maxpool"), "down"),
                     (dict(backend="tpu"), "backend"), (dict(in_channels=(1, 2, 3)), "in_channels"),
                     (dict(channels=0), "channels")]:
        with pytest.raises(ValueError, match=word):
            LiteFPN(**kw)
    with pytest.raises(ValueError, match="'add', 'weighted'"):  # lists the valid values
        LiteFPN(fuse="mul")
    neck = LiteFPN()
    with pytest.raises(ValueError, match="backend"):
        neck.backend = "nope"


def test_bad_inputs():
    neck = LiteFPN(backend="eager", **SMALL)
    feats = make_feats(top=(2, 3))
    with pytest.raises(ValueError, match="four feature maps"):
        neck(feats[:3])
    with pytest.raises(ValueError, match="four feature maps"):
        neck(feats[0])
    bad = list(feats)
    bad[2] = torch.randn(2, 5, 8, 12)
    with pytest.raises(ValueError, match="b3 must have 16 channels"):
        neck(bad)
    bad = list(feats)
    bad[1] = torch.randn(2, 12, 7, 12)
    with pytest.raises(ValueError, match="b2 must be exactly half of b1"):
        neck(bad)
    bad = list(feats)
    bad[3] = feats[3].double()
    with pytest.raises(ValueError, match="dtype"):
        neck(bad)
    bad = list(feats)
    bad[3] = feats[3].to("meta")
    with pytest.raises(ValueError, match="meta"):
        neck(bad)
    bad = list(feats)
    bad[0] = feats[0][0]
    with pytest.raises(ValueError, match="b1 must be a 4-D"):
        neck(bad)
    bad = list(feats)
    bad[3] = feats[3][:1]
    with pytest.raises(ValueError, match="batch"):
        neck(bad)
