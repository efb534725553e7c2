"""The Triton lateral kernels (litefpn_kernels/triton/lateral_up2_fuse.py) against their contracts
(csrc/ops.cpp) written as float64 PyTorch: gram, fwd, grad_z, bwd_coarse.

Run in the interpreter here (TRITON_INTERPRET=1, set by conftest.py without a GPU), on a GPU
otherwise. Each kernel runs with the tiles of its device (`interpret=None`) and, on small shapes,
with the GPU's tiles (`interpret=False`: multi-chunk gram, masked channel tiles of 16), over
dtypes, layouts (NCHW, channels_last, non-flat strided views), odd sizes and optional inputs.
"""
import pytest
import torch
import torch.nn.functional as F

from tests.support.contract import grad_z64 as ref_grad_z
from tests.support.helpers import need

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
KINDS = ["contiguous", "channels_last", "strided", "strided_cl"]
EPS = 1e-4
# (N, C, Cin, H, W): coarse [N, C, H, W], z [N, Cin, 2H, 2W]
SHAPES = [(2, 5, 3, 3, 5), (1, 4, 6, 1, 2), (2, 3, 2, 2, 1)]
#: relative tolerances against the float64 formula (scaled by the size of the terms summed)
RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module")
def lateral():
    need("lateral_up2_fuse", "triton", DEVICE)
    from litefpn_kernels.triton import lateral_up2_fuse as mod
    return mod


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make(shape, dtype, kind="contiguous", seed=0, mean=0.0, std=1.0):
    """An [N, C, H, W] tensor in the layout `kind`; the strided kinds are non-flat views
    (s_h != W*s_w), which take the kernels' general (divmod) pixel path."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    base = torch.randn(n, c, h, w + 3, generator=g, dtype=torch.float64) * std + mean
    if kind == "strided_cl":
        base = base.contiguous(memory_format=torch.channels_last)
    t = base.to(DEVICE, dtype)
    if kind in ("strided", "strided_cl"):
        t = t[..., 1:w + 1]
        assert h <= 1 or t.stride(2) != w * t.stride(3)
        return t
    t = t[..., :w].contiguous()
    return t.contiguous(memory_format=torch.channels_last) if kind == "channels_last" else t


def small(*shape, dtype=torch.float32, seed=1, positive=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(shape, generator=g, dtype=torch.float64) + 0.25 if positive else \
        torch.randn(shape, generator=g, dtype=torch.float64)
    return t.to(DEVICE, _acc(dtype)).contiguous()


def check(out, ref, dtype, scale=None):
    """|out - ref| <= rtol(dtype) * scale (default: max |ref|, at least 1)."""
    ref = ref.to(torch.float64)
    if scale is None:
        scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    err = (out.to(torch.float64) - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= RTOL[dtype] * scale, f"max error {err:.3g} > {RTOL[dtype]:.1g} * {scale:.3g}"


# ----------------------------------------------------------------------------- references
def up2_64(x):
    return F.interpolate(x.double(), scale_factor=2, mode="bilinear", align_corners=False)


def coefs(n, c, w_coarse, w_fine, gc, gf):
    a = torch.ones(n, c, dtype=torch.float64, device=DEVICE)
    b = torch.ones(n, c, dtype=torch.float64, device=DEVICE)
    if w_coarse is not None:
        sc, sf = F.softplus(w_coarse.double()), F.softplus(w_fine.double())
        a, b = a * sc / (sc + sf + EPS), b * sf / (sc + sf + EPS)
    if gc is not None:
        a = a * gc.double()
    if gf is not None:
        b = b * gf.double()
    return a[:, :, None, None], b[:, :, None, None]


def ref_gram(a, b, ac, bc):
    a64, b64 = a.double(), b.double()
    if ac is not None:
        a64 = a64 - ac.double()[:, None, None]
    if bc is not None:
        b64 = b64 - bc.double()[:, None, None]
    scale = torch.einsum("nihw,njhw->nij", a64.abs(), b64.abs()).max().item()
    return torch.einsum("nihw,njhw->nij", a64, b64), a64.sum((2, 3)), scale


def ref_fwd(coarse, z, weight, bias, wc, wf, gc, gf):
    y = torch.einsum("ck,nkhw->nchw", weight.double(), z.double()) + bias.double()[:, None, None]
    a, b = coefs(coarse.shape[0], coarse.shape[1], wc, wf, gc, gf)
    return a * up2_64(coarse) + b * y


def ref_bwd_coarse(g, coarse, wc, wf, gc):
    a, _ = coefs(coarse.shape[0], coarse.shape[1], wc, wf, gc, None)
    gt = torch.ops.aten.upsample_bilinear2d_backward(
        g.double(), list(g.shape[2:]), list(coarse.shape), False, 2.0, 2.0)
    return a * gt, (g.double() * up2_64(coarse)).sum((2, 3))


def fusion_inputs(n, c, dtype, mode):
    """(w_coarse, w_fine, gate_coarse, gate_fine) for mode all / none / gates / weights."""
    w = mode in ("all", "weights")
    gates = mode in ("all", "gates")
    return (small(1, dtype=dtype, seed=3) if w else None,
            small(1, dtype=dtype, seed=4) if w else None,
            small(n, c, dtype=dtype, seed=5, positive=True) if gates else None,
            small(n, c, dtype=dtype, seed=6, positive=True) if gates else None)


# ----------------------------------------------------------------------------- gram
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_gram(lateral, dtype, kind):
    for si, (n, c, c_in, h, w) in enumerate(SHAPES):
        z = make((n, c_in, 2 * h, 2 * w), dtype, kind, seed=si, mean=3.0)
        g = make((n, c, 2 * h, 2 * w), dtype, kind, seed=si + 10)
        zc = small(c_in, dtype=dtype, seed=7) + 3.0
        for a, b, ac, bc in ((z, z, zc, zc), (g, z, None, zc), (g, z, None, None)):
            gram, colsum = lateral.gram(a, b, ac, bc)
            assert gram.dtype == colsum.dtype == _acc(dtype)
            assert gram.shape == (n, a.shape[1], b.shape[1]) and colsum.shape == a.shape[:2]
            rg, rs, scale = ref_gram(a, b, ac, bc)
            check(gram, rg, torch.float32 if dtype != torch.float64 else dtype, scale)
            check(colsum, rs, torch.float32 if dtype != torch.float64 else dtype,
                  a.double().abs().sum((2, 3)).max().item() + 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "strided"])
def test_gram_gpu_tiles_multi_chunk_deterministic(lateral, dtype, kind):
    """The GPU tiling (16-wide masked channel tiles, several pixel chunks summed by the second
    stage) gives the same sums, bitwise the same on every run."""
    z = make((2, 5, 24, 44), dtype, kind, seed=2)   # 1056 pixels: 3 chunks of 352
    g = make((2, 3, 24, 44), dtype, kind, seed=3)
    assert lateral.gram_tiling(g, z, interpret=False)[4] > 1
    zc = z[0, :, 0, 0].to(_acc(dtype)).contiguous()
    gram, colsum = lateral.gram(g, z, None, zc, interpret=False)
    rg, rs, scale = ref_gram(g, z, None, zc)
    tol = torch.float32 if dtype != torch.float64 else dtype
    check(gram, rg, tol, scale)
    check(colsum, rs, tol, g.double().abs().sum((2, 3)).max().item())
    gram2, colsum2 = lateral.gram(g, z, None, zc, interpret=False)
    assert torch.equal(gram, gram2) and torch.equal(colsum, colsum2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_gram_symmetric_gpu_tiles(lateral, dtype):
    """gram(z, z) about one centre computes the tiles on and above the diagonal and mirrors
    them: at the GPU tiles (2 x 2 tiles of 64 channels, the second masked; 3 pixel chunks) the
    result equals the reference, is exactly symmetric, and its colsum (from the diagonal's
    programs) is right; gram(g, z) keeps every tile."""
    z = make((2, 80, 24, 44), dtype, "channels_last", seed=5, mean=2.0)
    zc = z[0, :, 0, 0].to(_acc(dtype)).contiguous()
    assert lateral.gram_tiling(z, z, interpret=False)[4] > 1
    kwargs = lambda a, ac, bc: lateral.plan_gram(  # noqa: E731
        a, z, ac, bc, None, None, interpret=False)[3]
    assert kwargs(z, zc, zc)["SYM"] and not kwargs(z, None, zc)["SYM"]
    gram, colsum = lateral.gram(z, z, zc, zc, interpret=False)
    rg, rs, scale = ref_gram(z, z, zc, zc)
    check(gram, rg, dtype, scale)
    check(colsum, rs, dtype, z.double().abs().sum((2, 3)).max().item())
    # the mirrored tile is the computed one's transpose, bit for bit (within a diagonal tile
    # the dot's (i, j) and (j, i) sums may round differently, as any GEMM's)
    block = kwargs(z, zc, zc)["BLOCK_I"]
    assert torch.equal(gram[:, block:, :block], gram[:, :block, block:].transpose(1, 2))


@pytest.mark.parametrize("interpret", [None, False], ids=["device-tiles", "gpu-tiles"])
def test_gram_covariance_accurate_for_large_mean_fp32(lateral, interpret):
    """z ~ N(10, 1) in fp32 with a pilot centre (one of z's values): the covariance from the
    gram is accurate to fp32 level, not to 1e-7 * mean^2 * count."""
    z = make((2, 4, 24, 44), torch.float32, seed=4, mean=10.0)
    pilot = z[0, :, 0, 0].contiguous()
    gram, colsum = lateral.gram(z, z, pilot, pilot, interpret=interpret)
    count = z.shape[0] * z.shape[2] * z.shape[3]
    d = colsum.double().sum(0) / count
    cov = gram.double().sum(0) / count - torch.outer(d, d)
    z64 = z.double().permute(1, 0, 2, 3).reshape(4, -1)
    ref = torch.cov(z64, correction=0)
    assert (cov - ref).abs().max().item() < 2e-6
    assert ((pilot.double() + d) - z64.mean(1)).abs().max().item() < 2e-6


# ----------------------------------------------------------------------------- fwd
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["all", "none", "gates", "weights"])
def test_fwd(lateral, dtype, kind, mode):
    for si, (n, c, c_in, h, w) in enumerate(SHAPES):
        coarse = make((n, c, h, w), dtype, kind, seed=si)
        z = make((n, c_in, 2 * h, 2 * w), dtype, kind, seed=si + 10)
        weight, bias = small(c, c_in, dtype=dtype, seed=8), small(c, dtype=dtype, seed=9)
        wc, wf, gc, gf = fusion_inputs(n, c, dtype, mode)
        out = lateral.fwd(coarse, z, weight, bias, wc, wf, gc, gf, EPS)
        assert out.shape == (n, c, 2 * h, 2 * w) and out.dtype == dtype
        if kind == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last)
        else:
            assert out.is_contiguous()
        check(out, ref_fwd(coarse, z, weight, bias, wc, wf, gc, gf), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "strided_cl"])
def test_fwd_gpu_tiles(lateral, dtype, kind):
    """GPU tiles: 32-pixel blocks over several programs, a 16-wide channel tile masked for C=5,
    Cin=37 in two 32-wide K slices (the second masked), odd spatial sizes."""
    n, c, c_in, h, w = 2, 5, 37, 5, 7
    coarse = make((n, c, h, w), dtype, kind, seed=1)
    z = make((n, c_in, 2 * h, 2 * w), dtype, kind, seed=2)
    weight, bias = small(c, c_in, dtype=dtype, seed=8), small(c, dtype=dtype, seed=9)
    wc, wf, gc, gf = fusion_inputs(n, c, dtype, "all")
    out = lateral.fwd(coarse, z, weight, bias, wc, wf, gc, gf, EPS, interpret=False)
    check(out, ref_fwd(coarse, z, weight, bias, wc, wf, gc, gf), dtype)


def test_fwd_nan_at_second_coarse_column_reaches_first_fine_column(lateral):
    """Eager's taps read x[1] with weight 0 at fine index 0: a NaN there reaches out[..., 0]."""
    coarse = make((1, 2, 3, 4), torch.float32)
    coarse[0, 0, 1, 1] = float("nan")
    z = make((1, 3, 6, 8), torch.float32)
    weight, bias = small(2, 3), small(2)
    out = lateral.fwd(coarse, z, weight, bias, None, None, None, None, EPS)
    ref = ref_fwd(coarse, z, weight, bias, None, None, None, None)
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()


# ----------------------------------------------------------------------------- grad_z
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["all", "none", "scale"])
def test_grad_z(lateral, dtype, kind, mode):
    for si, (n, c, c_in, h, w) in enumerate(SHAPES):
        g = make((n, c, 2 * h, 2 * w), dtype, kind, seed=si)
        z = make((n, c_in, 2 * h, 2 * w), dtype, kind, seed=si + 10, mean=2.0)
        weight = small(c, c_in, dtype=dtype, seed=8)
        scale = small(n, c, dtype=dtype, seed=9) if mode != "none" else None
        quad = small(c_in, c_in, dtype=dtype, seed=10) if mode == "all" else None
        shift = small(c_in, dtype=dtype, seed=11) if mode == "all" else None
        out = lateral.grad_z(g, z, weight, scale, quad, shift)
        assert out.shape == z.shape and out.dtype == dtype
        if kind == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last)
        check(out, ref_grad_z(g, z, weight, scale, quad, shift), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "strided"])
def test_grad_z_gpu_tiles(lateral, dtype, kind):
    n, c, c_in, h, w = 2, 37, 5, 5, 7  # C=37: three 16-wide slices of the C reduction
    g = make((n, c, 2 * h, 2 * w), dtype, kind, seed=1)
    z = make((n, c_in, 2 * h, 2 * w), dtype, kind, seed=2)
    weight, scale = small(c, c_in, dtype=dtype), small(n, c, dtype=dtype, seed=3)
    quad, shift = small(c_in, c_in, dtype=dtype, seed=4), small(c_in, dtype=dtype, seed=5)
    out = lateral.grad_z(g, z, weight, scale, quad, shift, interpret=False)
    check(out, ref_grad_z(g, z, weight, scale, quad, shift), dtype)


# ----------------------------------------------------------------------------- bwd_coarse
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["all", "none"])
def test_bwd_coarse(lateral, dtype, kind, mode):
    for si, (n, c, _, h, w) in enumerate(SHAPES):
        coarse = make((n, c, h, w), dtype, kind, seed=si)
        g = make((n, c, 2 * h, 2 * w), dtype, kind, seed=si + 10)
        wc, wf, gc, _ = fusion_inputs(n, c, dtype, mode)
        ref_g, ref_s = ref_bwd_coarse(g, coarse, wc, wf, gc)
        for need_sum in (True, False):
            grad, sums = lateral.bwd_coarse(g, coarse, wc, wf, gc, EPS, need_sum)
            assert grad.shape == coarse.shape and grad.dtype == dtype
            assert sums.dtype == _acc(dtype)
            check(grad, ref_g, dtype)
            if need_sum:
                assert sums.shape == (n, c)
                check(sums, ref_s, torch.float32 if dtype != torch.float64 else dtype,
                      (g.double().abs() * up2_64(coarse).abs()).sum((2, 3)).max().item() + 1)
            else:
                assert sums.shape == (0,)


# ----------------------------------------------------------------------------- tf32 weights
@pytest.mark.parametrize("kernel", ["fwd", "grad_z"])
def test_tf32_weights_unbiased(lateral, kernel):
    """bf16 / fp16 activations take "tf32" dots with an fp32 weight operand. A tensor core that
    truncates the weights (no correct rounding) shrinks every output by ~4e-4 relative (all
    terms positive here, so nothing cancels); correctly rounded (`_dot_w`), the mean
    signed relative error is the output rounding's, ~1e-6 over these 16384 outputs. (Exact in
    the interpreter; `test_tf32_round.py` checks the rounding itself there.) fp16 only: the
    interpreter converts fp32 to bf16 by truncation, a -3e-3 output bias of its own; the GPU
    rounds, and bf16 takes the same dots."""
    dtype = torch.float16
    n, c, c_in, h, w = 1, 32, 32, 8, 16
    g = torch.Generator().manual_seed(0)
    pos = lambda *s: (torch.rand(*s, generator=g, dtype=torch.float64) + 0.25)  # noqa: E731
    z = pos(n, c_in, 2 * h, 2 * w).to(DEVICE, dtype)
    weight = pos(c, c_in).to(DEVICE, torch.float32)  # random low mantissa bits
    if kernel == "fwd":
        coarse = torch.zeros(n, c, h, w, device=DEVICE, dtype=dtype)
        bias = torch.zeros(c, device=DEVICE)
        out = lateral.fwd(coarse, z, weight, bias, None, None, None, None, EPS)
        ref = torch.einsum("ck,nkhw->nchw", weight.double(), z.double())
    else:
        scale = pos(n, c).to(DEVICE, torch.float32)
        gout = pos(n, c, 2 * h, 2 * w).to(DEVICE, dtype)
        out = lateral.grad_z(gout, z, weight, scale, None, None)
        ref = ref_grad_z(gout, z, weight, scale, None, None)
    rel = (out.double() - ref) / ref
    assert abs(rel.mean().item()) < 5e-5, rel.mean().item()
    assert rel.abs().max().item() < 2e-3


# ----------------------------------------------------------------------------- int64, empty
def _launch(plan, i64=True):
    kernel, grid, args, kwargs = plan
    kernel[grid](*args, **dict(kwargs, I64=i64))


def test_int64_offsets_path(lateral):
    """The I64 code paths (taken for tensors of 2^30+ elements) compute the same results."""
    from litefpn_kernels.triton import up2_fuse

    dtype, n, c, c_in, h, w = torch.float32, 2, 5, 3, 3, 5
    coarse = make((n, c, h, w), dtype, "channels_last", seed=1)
    z = make((n, c_in, 2 * h, 2 * w), dtype, "strided", seed=2)
    g = make((n, c, 2 * h, 2 * w), dtype, "contiguous", seed=3)
    weight, bias = small(c, c_in), small(c)
    wc, wf, gc, gf = fusion_inputs(n, c, dtype, "all")

    out = torch.empty(n, c, 2 * h, 2 * w, device=DEVICE)
    acc = dict(device=DEVICE)
    _launch(lateral.plan_fwd(coarse, z, weight, bias, wc, wf, gc, gf, EPS, out))
    check(out, ref_fwd(coarse, z, weight, bias, wc, wf, gc, gf), dtype)

    zc = small(c_in)
    part_g, part_s = torch.empty(1, n, c, c_in, **acc), torch.empty(1, n, c, **acc)
    _launch(lateral.plan_gram(g, z, None, zc, part_g, part_s))
    rg, rs, scale = ref_gram(g, z, None, zc)
    check(part_g[0], rg, dtype, scale)
    check(part_s[0], rs, dtype, g.double().abs().sum((2, 3)).max().item())

    scale, quad, shift = small(n, c), small(c_in, c_in), small(c_in)
    gz = torch.empty_like(z)
    _launch(lateral.plan_grad_z(g, z, weight, scale, quad, shift, gz))
    check(gz, ref_grad_z(g, z, weight, scale, quad, shift), dtype)

    grad_c = torch.empty_like(coarse)
    parts = torch.empty(up2_fuse.partials_shape(coarse, g, with_fine=False), **acc)
    _launch(up2_fuse.plan_backward(g, coarse, None, wc, wf, gc, None, EPS, True, grad_c, None,
                                   parts))
    sums = torch.empty(n, c, **acc)
    _launch(up2_fuse.plan_sum_partials(parts, sums, None))
    ref_g, ref_s = ref_bwd_coarse(g, coarse, wc, wf, gc)
    check(grad_c, ref_g, dtype)
    check(sums, ref_s, dtype, (g.double().abs() * up2_64(coarse).abs()).sum((2, 3)).max().item())


def test_empty_batch(lateral):
    coarse, z = torch.empty(0, 4, 3, 5, device=DEVICE), torch.empty(0, 3, 6, 10, device=DEVICE)
    g = torch.empty(0, 4, 6, 10, device=DEVICE)
    gram, colsum = lateral.gram(g, z, None, None)
    assert gram.shape == (0, 4, 3) and colsum.shape == (0, 4)
    out = lateral.fwd(coarse, z, small(4, 3), small(4), None, None, None, None, EPS)
    assert out.shape == (0, 4, 6, 10)
    assert lateral.grad_z(g, z, small(4, 3), None, None, None).shape == z.shape
    grad, sums = lateral.bwd_coarse(g, coarse, None, None, None, EPS, True)
    assert grad.shape == coarse.shape and sums.shape == (0, 4)
