"""litefpn::bn_silu against eager's F.silu(F.batch_norm(...)): outputs, running statistics,
gradients, gradcheck, opcheck, torch.compile, determinism and bad input.

The `contract` rows run the operator's glue (statistics around a pilot, the closed-form
backward) on float64 PyTorch versions of the kernels (tests/support/contract.py); `cpu` runs the C++
kernels, `triton-interpreter` the Triton ones in the interpreter (conftest's backend rows).
"""
import pytest
import torch
import torch.nn.functional as F

from litefpn_kernels import eager, ops
from tests.support.helpers import CPU, TOL, layout
from tests.support.inputs import bn_silu_inputs as make_inputs

OP = "bn_silu"

# [N, C, H, W]: odd sizes, a single pixel per sample, a single channel
SHAPES = [(2, 5, 3, 4), (3, 1, 1, 2), (1, 7, 5, 1), (2, 130, 4, 3)]

BTOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4),
        torch.float16: TOL[torch.float16], torch.bfloat16: TOL[torch.bfloat16]}


@pytest.fixture
def backend(cpu_backend):
    return cpu_backend


def reference(x, kw, training, momentum=0.1):
    """Eager in float64; the running statistics are updated on float64 copies.

    x is made contiguous first: eager's CPU batch_norm backward (torch 2.13) returns a wrong
    gradient for some layouts made ambiguous by size-1 dims, e.g. shape [1, 7, 5, 1] with
    strides (35, 1, 7, 1) (the gradient of the contiguous copy is the right one; checked
    against the closed form). The math does not depend on the layout, so the reference does not.
    """
    d = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in kw.items()}
    xd = x.detach().double().contiguous().requires_grad_(x.requires_grad)
    y = F.silu(F.batch_norm(xd, d["running_mean"], d["running_var"], d["bn_weight"],
                            d["bn_bias"], training, momentum, 1e-5))
    return xd, y, d


def run(backend, x, kw, training, momentum=0.1):
    return ops.bn_silu(x, kw["bn_weight"], kw["bn_bias"], kw["running_mean"], kw["running_var"],
                       training, momentum, backend=backend)


def is_channels_last(t):
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_forward_and_running_stats_match_eager(backend, dtype, kind, training):
    for i, shape in enumerate(SHAPES):
        x, kw = make_inputs(shape, dtype, kind, seed=i)
        _, want, d = reference(x, kw, training, momentum=0.3)
        got = run(backend, x, kw, training, momentum=0.3)
        assert got.dtype == dtype and got.shape == x.shape
        assert is_channels_last(got) == is_channels_last(x) or x.shape[1] == 1
        torch.testing.assert_close(got.double(), want, **BTOL[dtype])
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(kw[name].double(), d[name], **BTOL[dtype], msg=name)


def test_statistics_accurate_for_large_mean_fp32(backend):
    """The pilot-centred sums keep fp32 statistics accurate when the mean dwarfs the spread."""
    x, kw = make_inputs((4, 6, 16, 16), torch.float32, mean=1000.0)
    _, want, d = reference(x, kw, True)
    got = run(backend, x, kw, True)
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(kw["running_var"].double(), d["running_var"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("momentum", [0.1, 1.0])
def test_running_stats_after_steps_equal_batchnorm2d(backend, momentum):
    bn = torch.nn.BatchNorm2d(5, momentum=momentum).double()
    x0, kw = make_inputs((3, 5, 4, 6), torch.float64)
    kw = dict(bn_weight=bn.weight, bn_bias=bn.bias, running_mean=bn.running_mean.clone(),
              running_var=bn.running_var.clone())
    for s in range(3):
        x, _ = make_inputs((3, 5, 4, 6), torch.float64, seed=s + 1)
        want = F.silu(bn(x))
        got = run(backend, x, kw, True, momentum)
        torch.testing.assert_close(got, want, **BTOL[torch.float64])
    torch.testing.assert_close(kw["running_mean"], bn.running_mean, **BTOL[torch.float64])
    torch.testing.assert_close(kw["running_var"], bn.running_var, **BTOL[torch.float64])


def test_training_without_running_stats(backend):
    x, kw = make_inputs((2, 4, 3, 3), torch.float64)
    kw["running_mean"] = kw["running_var"] = None
    want = F.silu(F.batch_norm(x, None, None, kw["bn_weight"], kw["bn_bias"], True))
    torch.testing.assert_close(run(backend, x, kw, True), want, **BTOL[torch.float64])


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_empty_batch(backend, training):
    x, kw = make_inputs((0, 4, 3, 3), torch.float32, requires_grad=True)
    before = kw["running_mean"].clone()
    out = run(backend, x, kw, training)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(kw["running_mean"], before)


def test_nan_and_inf_propagate_like_eager(backend):
    x, kw = make_inputs((2, 3, 4, 4), torch.float32)
    x = x.detach().clone()
    x[0, 0, 1, 2], x[1, 1, 0, 0], x[1, 2, 3, 3] = float("nan"), float("inf"), -float("inf")
    for training in (False, True):
        k = {n: v.detach().clone() for n, v in kw.items()}
        want = F.silu(F.batch_norm(x, k["running_mean"].clone(), k["running_var"].clone(),
                                   k["bn_weight"], k["bn_bias"], training))
        got = run(backend, x, k, training)
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- backward
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_backward_matches_eager(backend, dtype, kind, training):
    for i, shape in enumerate(SHAPES):
        x, kw = make_inputs(shape, dtype, kind, seed=i, requires_grad=True)
        xd, want, d = reference(x, kw, training)
        g = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        want.backward(g)
        got = run(backend, x, kw, training)
        got.backward(layout(g.to(dtype), kind))
        tol = BTOL[dtype]
        for a, b, name in ((x.grad, xd.grad, "x"), (kw["bn_weight"].grad, d["bn_weight"].grad,
                           "bn_weight"), (kw["bn_bias"].grad, d["bn_bias"].grad, "bn_bias")):
            scale = max(1.0, b.abs().max().item())
            torch.testing.assert_close(a.double() / scale, b / scale, **tol, msg=name)


def test_backward_with_expanded_grad(backend):
    """out.sum().backward() hands the kernels a stride-0 grad_out."""
    x, kw = make_inputs((2, 4, 3, 5), torch.float64, "channels_last", requires_grad=True)
    xd, want, d = reference(x, kw, True)
    want.sum().backward()
    run(backend, x, kw, True).sum().backward()
    torch.testing.assert_close(x.grad, xd.grad, **BTOL[torch.float64])
    torch.testing.assert_close(kw["bn_weight"].grad, d["bn_weight"].grad, **BTOL[torch.float64])


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_gradcheck(backend, training, kind):
    x, kw = make_inputs((2, 3, 3, 4), torch.float64, kind, requires_grad=True)
    fn = lambda x, w, b: ops.bn_silu(x, w, b, kw["running_mean"].clone(),  # noqa: E731
                                     kw["running_var"].clone(), training, backend=backend)
    assert torch.autograd.gradcheck(fn, (x, kw["bn_weight"], kw["bn_bias"]))


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_backward_is_bitwise_deterministic(backend, kind):
    grads = []
    for _ in range(2):
        x, kw = make_inputs((4, 16, 9, 7), torch.float32, kind, requires_grad=True)
        run(backend, x, kw, True).backward(torch.ones_like(x))
        grads.append((x.grad, kw["bn_weight"].grad, kw["bn_bias"].grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_opcheck(backend):
    """Every op of the split: statistics, running-statistics update (mutating), apply (with
    autograd), and the two backward passes."""
    o = torch.ops.litefpn
    x, kw = make_inputs((2, 3, 3, 4), torch.float64, requires_grad=True)
    mean, var = o.bn_silu_stats(x.detach(), backend)
    torch.library.opcheck(o.bn_silu_stats.default, (x.detach(), backend))
    torch.library.opcheck(o.batch_norm_update_stats.default,
                          (kw["running_mean"], kw["running_var"], mean, var, 72, 0.1))
    for training in (False, True):
        stats = (mean, var) if training else (kw["running_mean"], kw["running_var"])
        torch.library.opcheck(o.bn_silu.default, (x, kw["bn_weight"], kw["bn_bias"], *stats,
                                                  training, 1e-5, backend, ""))
        g = torch.randn_like(x)
        args = (g, x.detach(), kw["bn_weight"].detach(), kw["bn_bias"].detach(), *stats, 1e-5)
        s1, s2, _ = o.bn_silu_backward_sums(*args, backend)
        torch.library.opcheck(o.bn_silu_backward_sums.default, args + (backend,))
        torch.library.opcheck(o.bn_silu_backward.default,
                              args + (s1, s2, 72, training, backend))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torch_compile_fullgraph(backend, training):
    torch._dynamo.reset()
    x, kw = make_inputs((2, 3, 4, 4), torch.float64, requires_grad=True)
    fn = torch.compile(lambda x, k: run(backend, x, k, training), fullgraph=True)
    k_eager = {n: v.detach().clone().requires_grad_(v.requires_grad) for n, v in kw.items()}
    got, want = fn(x, kw), run("eager", x, k_eager, training)
    torch.testing.assert_close(got, want, **BTOL[torch.float64])
    torch.testing.assert_close(kw["running_var"], k_eager["running_var"], **BTOL[torch.float64])


def test_eager_backend_is_the_reference():
    x, kw = make_inputs((2, 3, 4, 4), torch.float32)
    k = {n: v.clone() for n, v in kw.items()}
    want = F.silu(F.batch_norm(x, k["running_mean"], k["running_var"], k["bn_weight"],
                               k["bn_bias"], True))
    assert torch.equal(run("eager", x, kw, True), want)
    assert torch.equal(kw["running_var"], k["running_var"])


def test_bad_inputs_name_the_argument():
    x, kw = make_inputs((2, 3, 4, 4), torch.float32)
    w, b, rm, rv = kw["bn_weight"], kw["bn_bias"], kw["running_mean"], kw["running_var"]
    cases = [
        ((x[0], w, b, rm, rv, True), ValueError, "x must be a 4-D"),
        ((x.int(), w, b, rm, rv, True), TypeError, "x has unsupported dtype"),
        ((x, w[:2], b, rm, rv, True), ValueError, "bn_weight must have shape"),
        ((x, w, b[:2], rm, rv, True), ValueError, "bn_bias must have shape"),
        ((x, w, b, rm[:2], rv, True), ValueError, "running_mean must have shape"),
        ((x, w, b, rm, None, True), ValueError, "running_mean and running_var"),
        ((x, w, b, None, None, False), ValueError, "training=False needs running_mean"),
        ((x, w, b, rm, rv, 1), TypeError, "training must be a bool"),
        ((x[:1, :, :1, :1], w, b, rm, rv, True), ValueError, "more than 1 value per channel"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            ops.bn_silu(*args)
    with pytest.raises(ValueError, match="momentum must be"):
        ops.bn_silu(x, w, b, rm, rv, True, momentum=2.0)
    with pytest.raises(ValueError, match="backend must be"):
        ops.bn_silu(x, w, b, rm, rv, True, backend="tpu")
    # a backend without bn_silu kernels (every built-in one has them now): a registered
    # stand-in that has none
    from litefpn_kernels.backends import registry
    registry.register_backend("no_bn_silu", lambda op, device: None)
    try:
        with pytest.raises(RuntimeError, match="no bn_silu kernels"):
            ops.bn_silu(x, w, b, rm, rv, True, backend="no_bn_silu")
    finally:
        registry._BACKENDS.pop("no_bn_silu")
