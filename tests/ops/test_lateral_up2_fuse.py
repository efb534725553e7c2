"""litefpn::lateral_up2_fuse on every backend against the eager composition
conv2d(1x1) -> F.batch_norm -> up2_fuse (litefpn_kernels.eager.lateral_up2_fuse), in float64.

The `contract` rows run the operator's glue (batch statistics from z's moments, BN folding,
chain rule) on float64 PyTorch versions of the kernels (tests/support/contract.py): a failure there is
in ops.py, a failure only on a real backend is in that backend's kernels.
"""
import copy
import importlib

import pytest
import torch
import torch.nn.functional as F

from litefpn_kernels import eager, ops
from tests.support.helpers import CPU, TOL, layout
from tests.support.inputs import lateral_up2_fuse_inputs as make_inputs

# the op's module (litefpn_kernels.ops.lateral_up2_fuse is also the name of its public function)
lateral_module = importlib.import_module("litefpn_kernels.ops.lateral_up2_fuse")

OP = "lateral_up2_fuse"

# (N, Cin, C, H, W) with coarse [N, C, H, W] and z [N, Cin, 2H, 2W]
SHAPES = [(2, 5, 3, 4, 5), (1, 3, 4, 1, 2), (3, 8, 6, 3, 1)]

# fp32 and below: the 1x1 convolution sums Cin products and the batch statistics sum M values,
# so errors are a few ulps of those sums (not of one product) - relative tolerances stay per-dtype.
LTOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4),
        torch.float16: TOL[torch.float16], torch.bfloat16: TOL[torch.bfloat16]}


def reference64(coarse, z, kw, training, momentum=0.1):
    """The eager composition in float64; running stats updated on float64 copies."""
    d = {k: (None if v is None else v.double()) for k, v in kw.items()}
    return eager.lateral_up2_fuse(
        coarse.double(), z.double(), d["conv_weight"], d["bn_weight"], d["bn_bias"],
        d["running_mean"], d["running_var"], training, momentum, 1e-5, d.get("w_coarse"),
        d.get("w_fine"), 1e-4, d.get("gate_coarse"), d.get("gate_fine")), d


def run(backend, coarse, z, kw, training, momentum=0.1):
    return ops.lateral_up2_fuse(coarse, z, kw["conv_weight"], kw["bn_weight"], kw["bn_bias"],
                                kw["running_mean"], kw["running_var"], training, momentum,
                                w_coarse=kw.get("w_coarse"), w_fine=kw.get("w_fine"),
                                gate_coarse=kw.get("gate_coarse"), gate_fine=kw.get("gate_fine"),
                                backend=backend)


def is_channels_last(t):
    return t.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_forward_and_running_stats_match_eager(backend_device, dtype, kind, training):
    backend, device = backend_device
    for i, shape in enumerate(SHAPES):
        for weighted, gates in ((False, False), (True, True)):
            coarse, z, kw = make_inputs(shape, dtype, device, kind, weighted, gates, seed=i)
            want, ref_kw = reference64(coarse, z, kw, training)
            got = run(backend, coarse, z, kw, training)
            assert got.dtype == dtype and got.shape == want.shape
            if kind == "channels_last" and shape[2] > 1:
                assert is_channels_last(got)
            torch.testing.assert_close(got.double(), want, **LTOL[dtype])
            stats_tol = LTOL[torch.float64 if dtype == torch.float64 else torch.float32]
            for name in ("running_mean", "running_var"):
                torch.testing.assert_close(kw[name].double(), ref_kw[name], **stats_tol,
                                           msg=lambda m: f"{name}: {m}")


def test_training_stats_accurate_for_large_mean_fp32(backend_device):
    """z with mean 10 and std 1 in fp32: the moments must not cancel catastrophically."""
    backend, device = backend_device
    coarse, z, kw = make_inputs((4, 16, 8, 8, 12), torch.float32, device, z_mean=10.0)
    want, ref_kw = reference64(coarse, z, kw, training=True)
    got = run(backend, coarse, z, kw, training=True)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kw["running_var"].double(), ref_kw["running_var"], rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(kw["running_mean"].double(), ref_kw["running_mean"], rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, 0.7])
def test_running_stats_after_steps_equal_batchnorm2d(backend_device, momentum):
    backend, device = backend_device
    n, c_in, c, h, w = 2, 6, 4, 3, 5
    conv = torch.nn.Conv2d(c_in, c, 1, bias=False).to(device)
    bn = torch.nn.BatchNorm2d(c, momentum=momentum).to(device)
    fused_bn = copy.deepcopy(bn)
    for step in range(4):
        coarse, z, _ = make_inputs((n, c_in, c, h, w), torch.float32, device, seed=step,
                                   z_mean=step)
        bn(conv(z))
        ops.lateral_up2_fuse(coarse, z, conv.weight, fused_bn.weight, fused_bn.bias,
                             fused_bn.running_mean, fused_bn.running_var, True, momentum,
                             backend=backend)
    torch.testing.assert_close(fused_bn.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_bn.running_var, bn.running_var, rtol=1e-5, atol=1e-6)


def test_training_without_running_stats(backend_device):
    backend, device = backend_device
    coarse, z, kw = make_inputs((2, 4, 3, 2, 3), torch.float64, device)
    kw["running_mean"] = kw["running_var"] = None
    want, _ = reference64(coarse, z, kw, training=True)
    torch.testing.assert_close(run(backend, coarse, z, kw, training=True), want,
                               **LTOL[torch.float64])


def test_eval_folding_equals_eval_batchnorm(backend_device):
    backend, device = backend_device
    c_in, c = 5, 7
    conv = torch.nn.Conv2d(c_in, c, 1, bias=False).double().to(device)
    bn = torch.nn.BatchNorm2d(c).double().to(device).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    coarse, z, _ = make_inputs((2, c_in, c, 3, 4), torch.float64, device)
    want = F.interpolate(coarse, scale_factor=2, mode="bilinear") + bn(conv(z))
    got = ops.lateral_up2_fuse(coarse, z, conv.weight, bn.weight, bn.bias, bn.running_mean,
                               bn.running_var, False, backend=backend)
    torch.testing.assert_close(got, want, **LTOL[torch.float64])


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_empty_batch(backend_device, training):
    backend, device = backend_device
    coarse, z, kw = make_inputs((0, 3, 4, 2, 3), torch.float32, device, gates=True,
                                requires_grad=True)
    stats = kw["running_mean"].clone(), kw["running_var"].clone()
    out = run(backend, coarse, z, kw, training)
    assert out.shape == (0, 4, 4, 6)
    assert torch.equal(kw["running_mean"], stats[0]) and torch.equal(kw["running_var"], stats[1])
    out.sum().backward()
    assert z.grad.shape == z.shape and kw["conv_weight"].grad.abs().sum() == 0


# ----------------------------------------------------------------------------- backward
def _grads(fn, leaves, grad):
    return torch.autograd.grad(fn(), leaves, grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_backward_matches_eager(backend_device, dtype, kind, training):
    backend, device = backend_device
    for i, shape in enumerate(SHAPES):
        for weighted, gates in ((False, False), (True, True)):
            coarse, z, kw = make_inputs(shape, dtype, device, kind, weighted, gates, seed=i,
                                        requires_grad=True)
            names = ["coarse", "z"] + [k for k, v in kw.items() if v.requires_grad]
            leaves = [coarse, z] + [kw[k] for k in names[2:]]
            n, _, c, h, w = shape
            grad = layout(torch.randn(n, c, 2 * h, 2 * w, dtype=dtype, device=device), kind)
            saved = {k: kw[k].clone() for k in ("running_mean", "running_var")}
            got = _grads(lambda: run(backend, coarse, z, kw, training), leaves, grad)
            kw.update(saved)
            want = _grads(lambda: reference64(coarse, z, kw, training)[0], leaves, grad.double())
            for name, a, b, t in zip(names, got, want, leaves):
                assert a.dtype == t.dtype and a.shape == t.shape, name
                tol = LTOL[dtype] if name in ("coarse", "z") else LTOL[
                    torch.float64 if dtype == torch.float64 else torch.float32]
                scale = max(1.0, b.abs().max().item())  # sums over many pixels: relative
                torch.testing.assert_close(a.double() / scale, b.double() / scale, **tol,
                                           msg=lambda m: f"{name} ({shape}): {m}")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gradcheck(backend_device, training):
    backend, device = backend_device
    for shape, kind in (((2, 3, 2, 1, 2), "contiguous"), ((1, 2, 3, 2, 1), "channels_last")):
        coarse, z, kw = make_inputs(shape, torch.float64, device, kind, gates=True,
                                    requires_grad=True)
        rm, rv = kw["running_mean"], kw["running_var"]

        def fn(c, zz, wt, gamma, beta, wc, wf, gc, gf):
            # fresh running stats per call: gradcheck calls fn many times
            return ops.lateral_up2_fuse(c, zz, wt, gamma, beta, rm.clone(), rv.clone(), training,
                                        w_coarse=wc, w_fine=wf, gate_coarse=gc, gate_fine=gf,
                                        backend=backend)

        args = (coarse, z, kw["conv_weight"], kw["bn_weight"], kw["bn_bias"], kw["w_coarse"],
                kw["w_fine"], kw["gate_coarse"], kw["gate_fine"])
        assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_backward_is_bitwise_deterministic(backend_device, kind):
    backend, device = backend_device
    coarse, z, kw = make_inputs((2, 12, 16, 6, 5), torch.float32, device, kind, gates=True,
                                requires_grad=True)
    leaves = [coarse, z] + [v for v in kw.values() if v.requires_grad]
    grad = torch.randn(2, 16, 12, 10, device=device)
    first = _grads(lambda: run(backend, coarse, z, kw, True), leaves, grad)
    for _ in range(2):
        again = _grads(lambda: run(backend, coarse, z, kw, True), leaves, grad)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------- op machinery
def test_opcheck(backend_device):
    backend, device = backend_device
    for kind, training, gates in (("contiguous", True, False), ("channels_last", False, True)):
        coarse, z, kw = make_inputs((2, 3, 4, 2, 3), torch.float64, device, kind, gates=gates,
                                    requires_grad=True)
        o = torch.ops.litefpn
        cw = kw["conv_weight"].detach()
        torch.library.opcheck(o.lateral_moments.default, (z.detach(), cw, backend))
        acc = z.dtype
        if training:
            mean_z, cov_z, stat_mean, stat_var = o.lateral_moments(z.detach(), cw, backend)
        else:
            mean_z, cov_z = z.new_empty((0,), dtype=acc), z.new_empty((0, 0), dtype=acc)
            stat_mean, stat_var = kw["running_mean"], kw["running_var"]
        delta = z.new_empty((0,), dtype=acc)
        args = (coarse, z, kw["conv_weight"], kw["bn_weight"], kw["bn_bias"], stat_mean,
                stat_var, mean_z, cov_z, delta, training, 1e-5, kw["w_coarse"],
                kw["w_fine"], kw.get("gate_coarse"), kw.get("gate_fine"), 1e-4, backend, "")
        torch.library.opcheck(o.lateral_up2_fuse.default, args)
        d = lambda t: None if t is None else t.detach()  # noqa: E731
        g = torch.randn(2, 4, 4, 6, dtype=acc, device=device)
        params = (d(kw["conv_weight"]), d(kw["bn_weight"]), d(kw["bn_bias"]), stat_mean,
                  stat_var, mean_z)
        sums_args = (g, d(z), *params, training, 1e-5, d(kw["w_coarse"]), d(kw["w_fine"]),
                     d(kw.get("gate_fine")), 1e-4, True, backend)
        torch.library.opcheck(o.lateral_up2_fuse_backward_sums.default, sums_args)
        a_sum, s, d_gamma, sum_fine = o.lateral_up2_fuse_backward_sums(*sums_args)
        fusion = (d(kw["w_coarse"]), d(kw["w_fine"]), d(kw.get("gate_coarse")),
                  d(kw.get("gate_fine")))
        torch.library.opcheck(o.lateral_up2_fuse_backward.default, (
            g, d(coarse), d(z), *params, cov_z, delta, a_sum, s, s, d_gamma, sum_fine, 2 * 4 * 6,
            training, 1e-5, *fusion, 1e-4, *(p is not None for p in fusion), backend))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torch_compile_fullgraph(backend_device, training):
    backend, device = backend_device
    torch._dynamo.reset()

    def f(c, zz, kw):
        return torch.relu(run(backend, c, zz, kw, training)) * 2

    compiled = torch.compile(f, fullgraph=True)
    coarse, z, kw = make_inputs((2, 3, 4, 2, 3), torch.float32, device, gates=True,
                                requires_grad=True)
    kw_ref = {k: (v.detach().clone().requires_grad_(v.requires_grad)) for k, v in kw.items()}
    out = compiled(coarse, z, kw)
    ref = f(coarse, z, kw_ref)
    torch.testing.assert_close(out, ref)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(kw[name], kw_ref[name])
    names = [k for k, v in kw.items() if v.requires_grad]
    got = torch.autograd.grad(out.sum(), [coarse, z] + [kw[k] for k in names])
    want = torch.autograd.grad(ref.sum(), [coarse, z] + [kw_ref[k] for k in names])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_eager_backend_is_the_reference():
    coarse, z, kw = make_inputs((2, 4, 3, 2, 3), torch.float32, CPU, gates=True)
    kw2 = copy.deepcopy(kw)
    out = run("eager", coarse, z, kw, True)
    ref = eager.lateral_up2_fuse(coarse, z, kw2["conv_weight"], kw2["bn_weight"],
                                     kw2["bn_bias"], kw2["running_mean"], kw2["running_var"],
                                     True, 0.1, 1e-5, kw2["w_coarse"], kw2["w_fine"], 1e-4,
                                     kw2["gate_coarse"], kw2["gate_fine"])
    assert torch.equal(out, ref) and torch.equal(kw["running_var"], kw2["running_var"])


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument():
    coarse, z, kw = make_inputs((2, 4, 3, 2, 3), torch.float32, CPU)

    def call(training=True, **over):
        args = {**kw, **over}
        return ops.lateral_up2_fuse(
            args.pop("coarse", coarse), args.pop("z", z), args["conv_weight"], args["bn_weight"],
            args["bn_bias"], args["running_mean"], args["running_var"], training,
            args.get("momentum", 0.1), args.get("bn_eps", 1e-5), args.get("w_coarse"),
            args.get("w_fine"), gate_fine=args.get("gate_fine"),
            backend=args.get("backend", "eager"))

    cases = [
        (dict(z=z[0]), ValueError, "z must be a 4-D"),
        (dict(z=z[:1]), ValueError, "z has batch 1 but coarse has batch 2"),
        (dict(z=z[..., :5]), ValueError, "exactly 2x coarse"),
        (dict(z=z.double()), TypeError, "z has dtype torch.float64"),
        (dict(conv_weight=kw["conv_weight"][:, :3]), ValueError, "conv_weight has Cin=3 but z has 4"),
        (dict(conv_weight=kw["conv_weight"][:2]), ValueError, "conv_weight has 2 output channels"),
        (dict(conv_weight=kw["conv_weight"].expand(3, 4, 3, 3)), ValueError, "1x1 convolution"),
        (dict(bn_weight=torch.ones(4)), ValueError, "bn_weight must have shape \\[3\\]"),
        (dict(bn_bias=torch.ones(3, 1)), ValueError, "bn_bias must have shape \\[3\\]"),
        (dict(running_mean=torch.zeros(2)), ValueError, "running_mean must have shape \\[3\\]"),
        (dict(running_var=None), ValueError, "running_mean and running_var must be given together"),
        (dict(running_mean=None, running_var=None, training=False), ValueError, "training=False needs"),
        (dict(momentum=1.5), ValueError, "momentum"),
        (dict(bn_eps=-1.0), ValueError, "batch_norm eps must be positive during training"),
        (dict(w_fine=None), ValueError, "w_coarse and w_fine"),
        (dict(gate_fine=torch.ones(2, 4)), ValueError, "gate_fine must have shape \\[N, C\\]"),
        (dict(backend="tpu"), ValueError, "backend must be"),
    ]
    for over, exc, pattern in cases:
        training = over.pop("training", True)
        with pytest.raises(exc, match=pattern):
            call(training, **over)
