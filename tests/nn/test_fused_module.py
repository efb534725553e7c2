"""The LiteFPN module on the fused backends against the same module on `eager` (same
state_dict): outputs, every parameter and input gradient, BN buffers after several steps."""
import copy
import itertools

import pytest
import torch

from litefpn_kernels import LiteFPN, backends, convert
from tests.support.helpers import randomise
from tests.support.inputs import make_feats

SMALL = dict(in_channels=(8, 12, 16, 24), channels=16)

#: the module resolves its backend for lateral_up2_fuse, which every fused level runs; the
#: `contract` rows run every op on the float64 kernel contracts (the module's wiring apart from
#: any compiled kernel)
OP = "lateral_up2_fuse"

# fuse x gate x hr_fusion (pan rides along with two of them)
OPTIONS = [dict(fuse=f, gate=g, hr_fusion=h, pan=(f == "weighted" and h == "add" and g != "coord"))
           for f, g, h in itertools.product(("add", "weighted"), (None, "se", "coord"),
                                            ("add", "concat"))]


def pair(backend, device, dtype=torch.float64, seed=0, **opts):
    """(eager neck, fused neck) with identical randomised parameters and buffers."""
    torch.manual_seed(seed)
    eager = LiteFPN(**SMALL, **opts, backend="eager")
    randomise(eager, seed)
    eager = eager.to(device=device, dtype=dtype)
    fused = copy.deepcopy(eager)
    fused.backend = backend
    return eager, fused


def steps(neck, feats_list, training):
    """Run one forward(+backward) per input set; -> outputs and input grads of each step."""
    neck.train(training)
    results = []
    for feats in feats_list:
        feats = [f.detach().clone().requires_grad_(training) for f in feats]
        out = neck(feats)
        if training:
            loss = sum((o.float() * (i + 1)).sum() for i, o in enumerate(out) if o is not None)
            loss.backward()
        results.append((out, [f.grad for f in feats]))
    return results


def assert_same_module(eager, fused, tol):
    for (name, a), b in zip(eager.named_parameters(), fused.parameters()):
        if a.grad is None:
            assert b.grad is None, name
            continue
        # the autograd layout contract: grads with their parameter's strides, as eager's
        assert b.grad.stride() == a.grad.stride() == b.stride(), name
        scale = max(1.0, a.grad.abs().max().item())
        torch.testing.assert_close(b.grad / scale, a.grad / scale, **tol, msg=lambda m: f"{name}.grad: {m}")
    for (name, a), b in zip(eager.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b, a, **tol, msg=lambda m: f"{name}: {m}")


def assert_same_results(got, want, tol):
    for (out_g, grads_g), (out_w, grads_w) in zip(got, want):
        for a, b in zip(out_g, out_w):
            if b is None:
                assert a is None
                continue
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a, b, **tol)
        for a, b in zip(grads_g, grads_w):
            if b is not None:
                torch.testing.assert_close(a, b, **tol)


TOL64 = dict(rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{v}" for v in o.values()))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_module_parity_train_then_eval(backend_device, opts, channels_last):
    backend, device = backend_device
    eager, fused = pair(backend, device, **opts)
    if channels_last:  # as users convert a model: parameters too
        eager, fused = (m.to(memory_format=torch.channels_last) for m in (eager, fused))
    feats = [make_feats(top=(2, 3), dtype=torch.float64, device=device,
                        channels_last=channels_last, seed=s) for s in range(2)]
    want, got = steps(eager, feats, True), steps(fused, feats, True)
    assert_same_results(got, want, TOL64)
    assert_same_module(eager, fused, TOL64)
    want, got = steps(eager, feats[:1], False), steps(fused, feats[:1], False)
    assert_same_results(got, want, TOL64)
    if channels_last:
        assert all(o.is_contiguous(memory_format=torch.channels_last)
                   for o in got[0][0] if o is not None)


@pytest.mark.parametrize("variant", ["momentum_none", "no_running_stats"])
def test_batchnorm_contract(backend_device, variant):
    """momentum=None (cumulative average) and track_running_stats=False, as nn.BatchNorm2d."""
    backend, device = backend_device
    eager, fused = pair(backend, device, fuse="weighted")
    for neck in (eager, fused):
        for m in neck.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                if variant == "momentum_none":
                    m.momentum = None
                else:
                    m.track_running_stats = False
                    m.running_mean = m.running_var = m.num_batches_tracked = None
    feats = [make_feats(top=(2, 3), dtype=torch.float64, device=device, seed=s) for s in range(3)]
    assert_same_results(steps(fused, feats, True), steps(eager, feats, True), TOL64)
    assert_same_module(eager, fused, TOL64)
    assert_same_results(steps(fused, feats[:1], False), steps(eager, feats[:1], False), TOL64)


def test_checkpoints_round_trip_across_backends(backend_device):
    backend, device = backend_device
    eager, fused = pair(backend, device, fuse="weighted", gate="se")
    assert list(eager.state_dict()) == list(fused.state_dict())
    steps(fused, [make_feats(top=(2, 3), dtype=torch.float64, device=device)], True)
    plain = LiteFPN(**SMALL, fuse="weighted", gate="se", backend="eager").to(device, torch.float64)
    plain.load_state_dict(fused.state_dict())  # saved on a fused backend, loaded into eager
    for a, b in zip(plain.state_dict().values(), fused.state_dict().values()):
        assert torch.equal(a, b)
    convert(plain, backend)
    assert plain.backend == backend
    assert convert(plain, "eager") is plain and plain.backend == "eager"


def test_gradients_bitwise_deterministic(backend_device):
    backend, device = backend_device
    runs = []
    for _ in range(2):
        _, fused = pair(backend, device, dtype=torch.float32, fuse="weighted")
        feats = [make_feats(top=(2, 3), device=device, channels_last=True)]
        steps(fused, feats, True)
        runs.append([p.grad.clone() for p in fused.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cpu_autocast_bf16_dtypes_and_accuracy(backend_device, training):
    """Under CPU autocast the fused module gives eager's dtypes, and its outputs and gradients
    are as close to the float64 truth as eager's bf16 ones (bf16 rounding differs, so the two
    are compared through their error against float64, not against each other)."""
    backend, device = backend_device
    if device.type != "cpu":
        pytest.skip("CPU autocast")
    eager, fused = pair(backend, device, dtype=torch.float32, fuse="weighted", gate="se")
    truth = copy.deepcopy(eager).double()
    feats = [make_feats(top=(2, 3), channels_last=True)]
    want64 = steps(truth, [[f.double() for f in feats[0]]], training)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = steps(eager, feats, training), steps(fused, feats, training)
    for a, b, t in zip(got[0][0][:4], want[0][0][:4], want64[0][0][:4]):
        assert a.dtype == b.dtype == torch.bfloat16
        assert _rel_err(a, t) <= max(2 * _rel_err(b, t), 0.01)
    if training:
        # all parameter gradients as one vector, each scaled by its float64 norm: a single
        # scalar (a fusion weight's gradient, a sum with cancellation) carries a few % of bf16
        # noise on either path, the whole vector does not
        flat = {"eager": [], "fused": []}
        for (name, a), b, t in zip(eager.named_parameters(), fused.parameters(),
                                   truth.parameters()):
            assert (a.grad is None) == (b.grad is None), name
            if a.grad is not None:
                assert b.grad.dtype == a.grad.dtype, name
                norm = t.grad.norm().clamp_min(1e-12)
                flat["eager"].append(((a.grad.double() - t.grad) / norm).flatten())
                flat["fused"].append(((b.grad.double() - t.grad) / norm).flatten())
        err = {k: torch.cat(v).norm().item() for k, v in flat.items()}
        assert err["fused"] <= max(2 * err["eager"], 0.01), err


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_compile_fullgraph(backend_device, training):
    backend, device = backend_device
    torch._dynamo.reset()
    eager, fused = pair(backend, device, fuse="weighted")
    compiled = torch.compile(fused, fullgraph=True)
    feats = [make_feats(top=(2, 3), dtype=torch.float64, device=device)]
    assert_same_results(steps(compiled, feats, training), steps(eager, feats, training), TOL64)
    assert_same_module(eager, fused, TOL64)


def test_unavailable_backend_is_a_clear_error():
    neck = LiteFPN(**SMALL, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        neck(make_feats(top=(2, 3)))
    with pytest.raises(ValueError, match="backend must be one of"):
        neck.backend = "tpu"
    assert backends.resolve(OP, "auto", torch.device("cpu")) in ("cpu", "eager")


def test_conv_weight_grads_keep_the_parameters_strides():
    """A channels_last [C, Cin, 1, 1] weight's strides are ambiguous in the size-1 dims; a GPU
    conv backward returned its fp64 gradient with contiguous strides, which AccumulateGrad keeps
    (tests/gpu: test_module_parity_train_then_eval[*-nhwc-*] failed on an H200). The fused
    path's conv weight hands autograd the gradient in the parameter's own strides."""
    from litefpn_kernels.nn.fused_steps import conv_weight
    conv = torch.nn.Conv2d(24, 16, 1, bias=False).to(memory_format=torch.channels_last)
    assert conv.weight.stride() == (24, 1, 24, 24)
    grad = torch.randn(16, 24, 1, 1)  # strides (24, 1, 1, 1): what that backward returned
    conv.weight.view_as(conv.weight).backward(grad)  # the control: kept as it came
    assert conv.weight.grad.stride() == (24, 1, 1, 1)
    conv.weight.grad = None
    conv_weight(conv).backward(grad)
    assert conv.weight.grad.stride() == conv.weight.stride()
    torch.testing.assert_close(conv.weight.grad, grad, rtol=0, atol=0)
