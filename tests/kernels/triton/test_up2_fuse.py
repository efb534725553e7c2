"""The Triton up2_fuse kernels (litefpn_kernels/triton/up2_fuse.py) at the launch plan a GPU
uses, run here in the interpreter (LITEFPN_TRITON_PLAN=gpu), against their contracts
(csrc/ops.cpp) as float64 PyTorch: forward, backward with the stage-one/stage-two sums, and the
coarse-only backward.

The shapes give the GPU plan several programs along both grid axes (column strips with a masked
last strip, channel blocks with masked channels, row blocks) and several partial-sum slots per
sample; `rows` also forces blocks of several coarse rows with a shorter last block (the planner
takes ROWS > 1 only at batch sizes far beyond CI's, when the grid would exceed its target).
"""
import pytest
import torch
import torch.nn.functional as F

from tests.support.helpers import CPU, layout, need

EPS = 1e-4
# coarse [N, C, H, W]: fine 80 columns = one 128-wide strip (NCHW) or two 64-wide ones
# (channels_last); 24 channels = two 16-channel blocks (NCHW) or one masked 32 (channels_last)
SHAPE = (2, 24, 5, 40)
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
SUM_TOL = {torch.float64: dict(rtol=1e-12, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-4),
           torch.bfloat16: dict(rtol=1e-5, atol=1e-4)}  # sums of bf16 products, in fp32


@pytest.fixture
def up2(monkeypatch, request):
    need("up2_fuse", "triton", CPU)
    from litefpn_kernels.triton import up2_fuse as mod
    monkeypatch.setenv("LITEFPN_TRITON_PLAN", "gpu")
    if request.param == "multi-row":  # fewer target programs: ROWS = 2 of H = 5 (3 blocks)
        monkeypatch.setattr(mod, "_TARGET_PROGRAMS", 10)
    return mod


def inputs(dtype, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = SHAPE
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    coarse = layout(rand(n, c, h, w).to(dtype), kind)
    fine = layout(rand(n, c, 2 * h, 2 * w).to(dtype), kind)
    grad_out = layout(rand(n, c, 2 * h, 2 * w).to(dtype), kind)
    small = dict(w_coarse=(rand(1) + 1).to(acc), w_fine=(rand(1) - 0.5).to(acc),
                 gate_coarse=torch.sigmoid(rand(n, c)).to(acc),
                 gate_fine=torch.sigmoid(rand(n, c)).to(acc))
    return coarse, fine, grad_out, small


def coefficients(small):
    wc, wf = small["w_coarse"].double(), small["w_fine"].double()
    sc, sf = F.softplus(wc), F.softplus(wf)
    alpha, beta = sc / (sc + sf + EPS), sf / (sc + sf + EPS)
    return (alpha * small["gate_coarse"].double())[:, :, None, None], \
        (beta * small["gate_fine"].double())[:, :, None, None]


def up(x):
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def assert_plan_has_several_programs_and_slots(mod, coarse, fine, grad_out):
    _, grid, args, kw = mod.plan_forward(coarse, fine, None, None, None, None, EPS,
                                         torch.empty_like(fine))
    rows = args[12]
    assert rows == (2 if mod._TARGET_PROGRAMS == 10 else 1)
    assert grid[0] > 2 * SHAPE[0] and kw["BLOCK_X"] * kw["BLOCK_C"] <= mod._TILE_ELEMS
    assert grid[1] > 1 or fine.stride(1) < fine.stride(3)  # channel blocks unless channels_last
    assert mod.partials_shape(coarse, grad_out)[1] > 1


@pytest.mark.parametrize("up2", ["one-row", "multi-row"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "strided"])
def test_gpu_plan_forward_backward_and_sums(up2, dtype, kind):
    coarse, fine, grad_out, small = inputs(dtype, kind)
    assert_plan_has_several_programs_and_slots(up2, coarse, fine, grad_out)
    a, b = coefficients(small)
    c64, f64, g64 = coarse.double(), fine.double(), grad_out.double()

    out = up2.fwd(coarse, fine, *small.values(), EPS)
    torch.testing.assert_close(out.double(), a * up(c64) + b * f64, **TOL[dtype])

    grad_coarse, grad_fine, sum_coarse, sum_fine = up2.bwd(
        grad_out, coarse, fine, *small.values(), EPS, True)
    c_leaf = c64.clone().requires_grad_()
    (want_gc,) = torch.autograd.grad(up(c_leaf), c_leaf, a * g64)
    torch.testing.assert_close(grad_coarse.double(), want_gc, **TOL[dtype])
    torch.testing.assert_close(grad_fine.double(), b * g64, **TOL[dtype])
    torch.testing.assert_close(sum_coarse.double(), (g64 * up(c64)).sum((2, 3)), **SUM_TOL[dtype])
    torch.testing.assert_close(sum_fine.double(), (g64 * f64).sum((2, 3)), **SUM_TOL[dtype])

    # the coarse-only variant (lateral_up2_fuse's backward) is the same kernel, WITH_FINE=False
    grad_coarse2, sum_coarse2 = up2.bwd_coarse(
        grad_out, coarse, small["w_coarse"], small["w_fine"], small["gate_coarse"], EPS, True)
    assert torch.equal(grad_coarse2, grad_coarse) and torch.equal(sum_coarse2, sum_coarse)


@pytest.mark.parametrize("up2", ["one-row"], indirect=True)
def test_gpu_plan_sums_are_deterministic(up2):
    coarse, fine, grad_out, small = inputs(torch.float32, "channels_last", seed=3)
    first = up2.bwd(grad_out, coarse, fine, *small.values(), EPS, True)
    second = up2.bwd(grad_out, coarse, fine, *small.values(), EPS, True)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_plan_switch_rejects_unknown_values(monkeypatch):
    need("up2_fuse", "triton", CPU)
    from litefpn_kernels.triton import up2_fuse as mod
    coarse, fine, _, _ = inputs(torch.float32, "contiguous")
    monkeypatch.setenv("LITEFPN_TRITON_PLAN", "fast")
    with pytest.raises(RuntimeError, match="LITEFPN_TRITON_PLAN"):
        mod.fwd(coarse, fine, None, None, None, None, EPS)
