"""The Triton bn_silu kernels (litefpn_kernels/triton/bn_silu.py) against their contracts
(`_bn_silu_*`, csrc/ops.cpp) written as float64 PyTorch: stats, fwd, bwd_sums, bwd.

Each runs at the interpreter's plan and at the GPU's (LITEFPN_TRITON_PLAN=gpu), over dtypes,
layouts (NCHW, channels_last, non-flat strided views), grad_out laid out unlike x (channels_last
against NCHW, expanded with zero strides, an offset view) and odd sizes. The GPU-plan shapes give
several channel blocks (masked), several pixel chunks per sample (the last one masked) and so
several partial-sum slots per channel; `small_slot_block` also makes the second stage walk the
slots in several steps.
"""
import pytest
import torch

from tests.support.helpers import CPU, layout, need

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
KINDS = ["contiguous", "channels_last", "strided"]
#: relative tolerance against the float64 formula, scaled by the size of the terms summed
RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
#: [N, C, H, W]. GPU plan: NCHW tiles 1024 pixels x 2 channels (3 channel blocks, 2 chunks of
#: the 1200 pixels), channels_last 8 channels x 256 pixels (5 chunks)
GPU_SHAPE = (2, 5, 24, 50)
SMALL_SHAPES = [(2, 5, 3, 4), (3, 1, 1, 2), (1, 7, 5, 1)]


@pytest.fixture(params=["interpreter", "gpu"])
def bn(request, monkeypatch):
    need("bn_silu", "triton", CPU)
    monkeypatch.setenv("LITEFPN_TRITON_PLAN", request.param)
    from litefpn_kernels.triton import bn_silu as mod
    return mod


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make(shape, dtype, kind, seed, mean=0.0):
    g = torch.Generator().manual_seed(seed)
    return layout((torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + mean).to(dtype),
                  kind)


def vec(c, dtype, seed, lo=None):
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(c, generator=g, dtype=torch.float64) + lo if lo is not None else \
        torch.randn(c, generator=g, dtype=torch.float64)
    return v.to(acc_of(dtype))


def bcast(v):
    return v.double()[None, :, None, None]


def ref_a(x, scale, shift):
    return x.double() * bcast(scale) + bcast(shift)


def ref_dz(g, x, scale, shift):
    a = ref_a(x, scale, shift)
    sg = 1 / (1 + torch.exp(-a))
    return g.double() * sg * (1 + a * (1 - sg))


def check(out, ref, dtype, scale):
    err = (out.double() - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= RTOL[dtype] * max(1.0, scale), f"max error {err:.3g} (scale {scale:.3g})"


def check_sums(s, ref, terms, dtype):
    """Sums accumulate in fp32 (fp64): the error scales with the sum of |terms|. (The
    interpreter's tl.sum adds a tile's 1200 pixels one after another, in numpy: up to
    m*eps = 7e-5 relative, 3e-5 seen at 2400; a GPU adds 16 per lane, then a tree.)"""
    assert s.dtype == acc_of(dtype) and s.shape == ref.shape
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    bound = tol * terms.abs().sum((0, 2, 3)).clamp_min(1.0)
    assert ((s.double() - ref).abs() <= bound).all(), (s.double() - ref).abs().max().item()


def is_cl(t):
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def test_gpu_plan_has_several_blocks_chunks_and_slots(monkeypatch):
    from litefpn_kernels.triton import bn_silu as mod
    for kind in ("contiguous", "channels_last"):
        x = make(GPU_SHAPE, torch.float32, kind, 0)
        bp, bc, chunk, chunks, grid = mod.tiling(x, x, interpret=False, sums=True)
        assert chunks > 1 and GPU_SHAPE[2] * GPU_SHAPE[3] % chunk != 0  # masked last chunk
        assert bp * bc == mod._TILE_ELEMS and mod.slots(x, interpret=False) == 2 * chunks
        assert grid[1] > 1 or kind == "channels_last"
        # the contiguous axis gets the whole C (channels_last) or 1024 pixels (NCHW)
        assert (bc, bp) == ((8, 256) if kind == "channels_last" else (2, 1024))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_stats(bn, dtype, kind):
    for i, shape in enumerate([GPU_SHAPE] + SMALL_SHAPES):
        x = make(shape, dtype, kind, seed=i, mean=5.0)
        center = x[0, :, 0, 0].to(acc_of(dtype)).contiguous()  # a pilot value per channel
        s1, s2 = bn.stats(x, center)
        d = x.double() - bcast(center)
        check_sums(s1, d.sum((0, 2, 3)), d, dtype)
        check_sums(s2, (d * d).sum((0, 2, 3)), d * d, dtype)


def test_stats_accurate_for_large_mean_fp32(bn):
    """Centred on a pilot, fp32 sums give the variance to fp32 level although mean >> spread."""
    x = make(GPU_SHAPE, torch.float32, "contiguous", seed=3, mean=1000.0)
    center = x[0, :, 0, 0].contiguous()
    s1, s2 = bn.stats(x, center)
    m = x.shape[0] * x.shape[2] * x.shape[3]
    var = s2.double() / m - (s1.double() / m) ** 2
    ref = x.double().var(dim=(0, 2, 3), unbiased=False)
    assert ((var - ref).abs() / ref).max().item() < 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_fwd(bn, dtype, kind):
    for i, shape in enumerate([GPU_SHAPE] + SMALL_SHAPES):
        x = make(shape, dtype, kind, seed=i)
        scale, shift = vec(shape[1], dtype, 1, lo=0.5), vec(shape[1], dtype, 2)
        y = bn.fwd(x, scale, shift)
        assert y.dtype == dtype and y.shape == x.shape
        assert is_cl(y) == is_cl(x) and (is_cl(y) or y.is_contiguous())
        check(y, torch.nn.functional.silu(ref_a(x, scale, shift)), dtype,
              ref_a(x, scale, shift).abs().max().item())


def grad_like(x, kind, seed):
    """grad_out with x's values layout `kind` (x's own when "same")."""
    if kind == "expanded":  # the gradient of .sum(): all strides 0
        return torch.full((1, 1, 1, 1), 0.75, dtype=x.dtype).expand(x.shape)
    g = make(x.shape, x.dtype, "contiguous", seed)
    if kind == "same":
        return torch.empty_like(x).copy_(g) if x.is_contiguous() or is_cl(x) else \
            layout(g, "strided")
    if kind == "channels_last":
        return g.contiguous(memory_format=torch.channels_last)
    if kind == "offset":  # 3 elements into its storage
        flat = torch.zeros(g.numel() + 3, dtype=g.dtype)
        return flat[3:].view(g.shape).copy_(g)
    return g


def check_bwd(bn, x, g, dtype):
    c = x.shape[1]
    scale, shift = vec(c, dtype, 1, lo=0.5), vec(c, dtype, 2)
    center = vec(c, dtype, 3)
    s1, s2 = bn.bwd_sums(g, x, scale, shift, center)
    dz = ref_dz(g, x, scale, shift)
    d = x.double() - bcast(center)
    check_sums(s1, dz.sum((0, 2, 3)), dz, dtype)
    check_sums(s2, (dz * d).sum((0, 2, 3)), dz * d, dtype)
    k_dz, k_x, k_0 = vec(c, dtype, 4), vec(c, dtype, 5), vec(c, dtype, 6)
    gx = bn.bwd(g, x, scale, shift, k_dz, k_x, k_0)
    assert gx.dtype == dtype and is_cl(gx) == is_cl(x) and (is_cl(gx) or gx.is_contiguous())
    ref = dz * bcast(k_dz) + x.double() * bcast(k_x) + bcast(k_0)
    terms = (dz * bcast(k_dz)).abs() + (x.double() * bcast(k_x)).abs() + bcast(k_0).abs()
    check(gx, ref, dtype, terms.max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_bwd_sums_and_bwd(bn, dtype, kind):
    for i, shape in enumerate([GPU_SHAPE] + SMALL_SHAPES):
        x = make(shape, dtype, kind, seed=i, mean=1.0)
        check_bwd(bn, x, grad_like(x, "same", seed=i + 20), dtype)


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
@pytest.mark.parametrize("grad_kind", ["channels_last", "contiguous", "expanded", "offset"])
def test_bwd_grad_out_laid_out_unlike_x(bn, kind, grad_kind):
    """The walk follows x (sums) or the output (grad_x), never grad_out."""
    x = make(GPU_SHAPE, torch.float64, kind, seed=1, mean=1.0)
    check_bwd(bn, x, grad_like(x, grad_kind, seed=2), torch.float64)


def test_nan_and_inf_follow_eager(bn):
    x = make((2, 3, 4, 4), torch.float32, "contiguous", seed=0)
    x[0, 0, 1, 2], x[1, 1, 0, 0], x[1, 2, 3, 3] = float("nan"), float("inf"), -float("inf")
    scale, shift = vec(3, torch.float32, 1, lo=0.5), vec(3, torch.float32, 2)
    a = x * scale[None, :, None, None] + shift[None, :, None, None]
    want = torch.nn.functional.silu(a)
    assert want.isnan().sum() == 2  # silu(-inf) is NaN in eager as well
    torch.testing.assert_close(bn.fwd(x, scale, shift), want, equal_nan=True, rtol=1e-6,
                               atol=1e-6)
    g = torch.ones_like(x)
    ones = torch.ones(3)
    want_dz = torch.ops.aten.silu_backward(g, a)
    got = bn.bwd(g, x, scale, shift, ones, torch.zeros(3), torch.zeros(3))
    torch.testing.assert_close(got, want_dz, equal_nan=True, rtol=1e-6, atol=1e-6)


@pytest.fixture
def small_slot_block(monkeypatch):
    from litefpn_kernels.triton import bn_silu as mod
    monkeypatch.setattr(mod, "_SLOT_BLOCK", 4)
    return mod


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_sums_deterministic_and_stage_two_in_steps(bn, small_slot_block, kind):
    """S = 10 (channels_last) / 4 (NCHW) slots at the GPU plan, walked 4 at a time by stage two;
    the sums are bitwise the same run to run."""
    x = make(GPU_SHAPE, torch.float32, kind, seed=5)
    g = make(GPU_SHAPE, torch.float32, kind, seed=6)
    c = GPU_SHAPE[1]
    vecs = (vec(c, torch.float32, 1, lo=0.5), vec(c, torch.float32, 2), vec(c, torch.float32, 3))
    first = bn.stats(x, vecs[2]) + bn.bwd_sums(g, x, *vecs)
    second = bn.stats(x, vecs[2]) + bn.bwd_sums(g, x, *vecs)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    d = x.double() - bcast(vecs[2])
    check_sums(first[0], d.sum((0, 2, 3)), d, torch.float32)


def test_int64_offsets_path(bn, monkeypatch):
    """I64=True (taken for tensors of 2^30+ elements) gives the int32 path's results."""
    x = make(GPU_SHAPE, torch.float64, "channels_last", seed=7)
    g = make(GPU_SHAPE, torch.float64, "contiguous", seed=8)
    c = GPU_SHAPE[1]
    vecs = (vec(c, x.dtype, 1, lo=0.5), vec(c, x.dtype, 2), vec(c, x.dtype, 3))
    want = (bn.stats(x, vecs[2]), bn.fwd(x, *vecs[:2]), bn.bwd_sums(g, x, *vecs),
            bn.bwd(g, x, *vecs[:2], *vecs))
    monkeypatch.setattr(bn, "needs_int64", lambda *t: True)
    assert bn.plan(bn.OP_FWD, x, out=x, scale=vecs[0], shift=vecs[1])[3]["I64"]
    got = (bn.stats(x, vecs[2]), bn.fwd(x, *vecs[:2]), bn.bwd_sums(g, x, *vecs),
           bn.bwd(g, x, *vecs[:2], *vecs))
    for a, b in zip(want, got):
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            torch.testing.assert_close(u, v, rtol=1e-14, atol=1e-14)


def test_empty_inputs(bn):
    for shape in [(0, 4, 3, 3), (2, 0, 3, 3), (2, 4, 0, 3)]:
        x = torch.zeros(shape)
        v = torch.zeros(shape[1])
        s1, s2 = bn.stats(x, v)
        assert s1.shape == (shape[1],) and not s1.any() and not s2.any()
        assert bn.fwd(x, v, v).shape == shape
        assert bn.bwd_sums(x, x, v, v, v)[0].shape == (shape[1],)
        assert bn.bwd(x, x, v, v, v, v, v).shape == shape


def test_partials_buffer_must_match_the_launch(bn):
    x = make(GPU_SHAPE, torch.float32, "channels_last", seed=0)
    c = GPU_SHAPE[1]
    bad = torch.empty(2, c, bn.slots(x) + 1)
    with pytest.raises(RuntimeError, match="partials buffer"):
        bn.plan(bn.OP_STATS, x, part=bad, center=torch.zeros(c))


def test_registration_auto_and_module_choice():
    """`auto` on CUDA runs bn_silu on triton until _C has CUDA bn_silu kernels, then on cuda;
    the module's fused steps use bn_silu on triton, and on cuda only once those kernels exist."""
    from litefpn_kernels import backends
    from litefpn_kernels.backends import compiled
    from litefpn_kernels.nn.fused_steps import FusedSteps
    need("bn_silu", "triton", CPU)
    cuda_has = ("bn_silu", "CUDA") in compiled.COMPILED_FOR
    want = "cuda" if cuda_has else "triton"
    assert backends.resolve("bn_silu", "auto", torch.device("cuda")) == want
    assert (backends.unavailable_reason("bn_silu", "cuda", "cuda") is None) == cuda_has
    assert FusedSteps("triton").fused_bn_silu
    assert FusedSteps("cuda").fused_bn_silu == cuda_has
