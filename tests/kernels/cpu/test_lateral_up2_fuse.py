"""The CPU kernels of lateral_up2_fuse, called directly (torch.ops.litefpn._lateral_gram,
_lateral_up2_fuse_fwd, _lateral_grad_z, _up2_fuse_bwd_coarse) against float64 formulas of their
contracts (csrc/ops.cpp): dtypes, layouts (contiguous, channels_last, strided, mixed), odd sizes,
panels wider than one staging buffer, fp32 accuracy of centred sums, determinism across thread
counts, empty tensors, argument errors and the narrower-ISA builds (baseline, AVX2).
"""
import pytest
import torch
import torch.nn.functional as F

from tests.support.contract import grad_z64 as ref_grad_z
from tests.support.helpers import (CPU_ISAS, assert_checks_pass_with_cpu_isa,
                                   assert_same_for_thread_counts, layout, need)

ops = torch.ops.litefpn
F64 = torch.float64
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
KINDS = ["contiguous", "channels_last", "strided"]
# Sums run in fp32 for every storage dtype but fp64; low-precision inputs are exact in fp32, so
# only the outputs' rounding differs by dtype.
SUM_TOL = {torch.float64: dict(rtol=1e-11, atol=1e-11)}
OUT_TOL = {torch.float64: dict(rtol=1e-11, atol=1e-11), torch.float32: dict(rtol=2e-5, atol=2e-5),
           torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}

# (N, Cin, C, H, W): coarse [N, C, H, W], z [N, Cin, 2H, 2W]; W = 70 -> fine rows of 140 pixels
# (more than one 128-pixel panel); 1x1 and single-row / single-column maps.
SHAPES = [(2, 3, 5, 1, 3), (1, 4, 7, 3, 1), (2, 6, 13, 2, 70), (1, 1, 1, 1, 1), (2, 17, 16, 3, 5)]


@pytest.fixture(autouse=True)
def _cpu_backend():
    need("lateral_up2_fuse", "cpu", "cpu")


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def rand(*shape, gen, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=gen, dtype=F64) * scale + shift


def put(t, dtype, kind):
    return layout(t.to(dtype), kind)


def fmt_of(t):
    cl = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


# ----------------------------------------------------------------------------- float64 contracts
def ref_gram(a, b, ac, bc):
    a64, b64 = a.double(), b.double()
    if ac is not None:
        a64 = a64 - ac.double()[:, None, None]
    if bc is not None:
        b64 = b64 - bc.double()[:, None, None]
    return torch.einsum("nihw,njhw->nij", a64, b64), a64.sum((2, 3))


def ref_weights(w_coarse, w_fine, eps=1e-4):
    if w_coarse is None:
        return 1.0, 1.0
    sc, sf = F.softplus(w_coarse.double()), F.softplus(w_fine.double())
    return sc / (sc + sf + eps), sf / (sc + sf + eps)


def ref_fwd(coarse, z, weight, bias, w_coarse, w_fine, gate_coarse, gate_fine, eps=1e-4):
    y = torch.einsum("ck,nkhw->nchw", weight.double(), z.double()) + bias.double()[:, None, None]
    up = F.interpolate(coarse.double(), scale_factor=2, mode="bilinear", align_corners=False)
    alpha, beta = ref_weights(w_coarse, w_fine, eps)
    gc = 1.0 if gate_coarse is None else gate_coarse.double()[:, :, None, None]
    gf = 1.0 if gate_fine is None else gate_fine.double()[:, :, None, None]
    return alpha * gc * up + beta * gf * y


def ref_bwd_coarse(g, coarse, w_coarse, w_fine, gate_coarse, eps=1e-4):
    g64 = g.double()
    up_t = torch.ops.aten.upsample_bilinear2d_backward(g64, list(g.shape[2:]),
                                                       list(coarse.shape), False, 2.0, 2.0)
    alpha, _ = ref_weights(w_coarse, w_fine, eps)
    gc = 1.0 if gate_coarse is None else gate_coarse.double()[:, :, None, None]
    up = F.interpolate(coarse.double(), scale_factor=2, mode="bilinear", align_corners=False)
    return alpha * gc * up_t, (g64 * up).sum((2, 3))


def close(got, want, dtype, tol=None, what=""):
    tol = tol or OUT_TOL[dtype]
    torch.testing.assert_close(got.double(), want, **tol, msg=lambda m: f"{what}: {m}")


def sum_tol(dtype, count):
    """fp32 sums of `count` O(1) products: a few ulps of sqrt(count)-sized partial sums."""
    if dtype == torch.float64:
        return SUM_TOL[dtype]
    return dict(rtol=2e-5, atol=2e-6 * count ** 0.5 + 1e-5)


# ----------------------------------------------------------------------------- gram
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kinds", [("contiguous", "contiguous"), ("channels_last", "channels_last"),
                                   ("strided", "strided"), ("contiguous", "channels_last"),
                                   ("channels_last", "strided")], ids="-".join)
def test_gram(dtype, kinds):
    acc = acc_of(dtype)
    for i, (n, c_in, c, h, w) in enumerate(SHAPES):
        gen = torch.Generator().manual_seed(i)
        a = put(rand(n, c, 2 * h, 2 * w, gen=gen), dtype, kinds[0])
        b = put(rand(n, c_in, 2 * h, 2 * w, gen=gen, shift=0.5), dtype, kinds[1])
        centers = (rand(c, gen=gen).to(acc), rand(c_in, gen=gen).to(acc))
        for ac, bc in ((None, None), (None, centers[1]), centers):
            gram, colsum = ops._lateral_gram(a, b, ac, bc)
            assert gram.dtype == acc and gram.shape == (n, c, c_in)
            assert colsum.dtype == acc and colsum.shape == (n, c)
            want_g, want_s = ref_gram(a, b, ac, bc)
            tol = sum_tol(dtype, 4 * h * w)
            close(gram, want_g, dtype, tol, "gram")
            close(colsum, want_s, dtype, tol, "colsum")
        # a and b the same tensor with the same centre (z's moments): one staged copy
        gram, colsum = ops._lateral_gram(b, b, centers[1], centers[1])
        want_g, want_s = ref_gram(b, b, centers[1], centers[1])
        close(gram, want_g, dtype, sum_tol(dtype, 4 * h * w), "gram(z, z)")
        close(colsum, want_s, dtype, sum_tol(dtype, 4 * h * w), "colsum(z, z)")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_gram_of_itself_skips_the_lower_tiles(dtype, kind):
    """z's own gram (the moments pass) computes only the tiles on and above the diagonal and
    reads the rest mirrored: with channels spanning several row and column tiles (70: 12 row
    tiles of 6 and 3 column tiles of 32 at fp32/AVX-512, with remainders) it must still match the
    reference everywhere and be bitwise symmetric, as the full computation is."""
    acc = acc_of(dtype)
    n, c_in, h, w = 2, 70, 5, 9
    gen = torch.Generator().manual_seed(7)
    z = put(rand(n, c_in, h, w, gen=gen, shift=0.5), dtype, kind)
    center = rand(c_in, gen=gen).to(acc)
    for zc in (center, None):
        gram, colsum = ops._lateral_gram(z, z, zc, zc)
        want_g, want_s = ref_gram(z, z, zc, zc)
        close(gram, want_g, dtype, sum_tol(dtype, h * w), "gram(z, z)")
        close(colsum, want_s, dtype, sum_tol(dtype, h * w), "colsum(z, z)")
        assert torch.equal(gram, gram.transpose(1, 2))
        # the general path (a different tensor with the same values) gives the same bits
        general, _ = ops._lateral_gram(z, z.clone(), zc, None if zc is None else zc.clone())
        assert torch.equal(gram, general)


def test_gram_centred_fp32_is_accurate_for_large_mean():
    """z ~ 10 + N(0, 1) in fp32: with a pilot centre the covariance keeps ~6 digits."""
    gen = torch.Generator().manual_seed(0)
    z64 = rand(4, 16, 64, 96, gen=gen, shift=10.0)
    z = z64.float()
    pilot = z[0, :, 0, 0].contiguous()
    count = z.shape[0] * z.shape[2] * z.shape[3]
    zr = z.double()
    mean = zr.mean((0, 2, 3))
    want = torch.einsum("nihw,njhw->ij", zr - mean[:, None, None], zr - mean[:, None, None]) / count
    for kind in ("contiguous", "channels_last"):
        gram, colsum = ops._lateral_gram(layout(z, kind), layout(z, kind), pilot, pilot)
        d = colsum.double().sum(0) / count
        cov = gram.double().sum(0) / count - torch.outer(d, d)
        torch.testing.assert_close(pilot.double() + d, mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(cov, want, rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------- forward
def fusion_kw(variant, n, c, acc, gen):
    kw = dict(w_coarse=None, w_fine=None, gate_coarse=None, gate_fine=None)
    if variant in ("weighted", "gated"):
        kw["w_coarse"] = (rand(1, gen=gen) + 1).to(acc)
        kw["w_fine"] = (rand(1, gen=gen) - 0.5).to(acc)
    if variant == "gated":
        kw["gate_coarse"] = torch.sigmoid(rand(n, c, gen=gen)).to(acc)
        kw["gate_fine"] = torch.sigmoid(rand(n, c, gen=gen)).to(acc)
    return kw


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kinds", [("contiguous", "contiguous"), ("channels_last", "channels_last"),
                                   ("strided", "strided"), ("channels_last", "contiguous"),
                                   ("contiguous", "channels_last")], ids="-".join)
def test_forward(dtype, kinds):
    acc = acc_of(dtype)
    for i, (n, c_in, c, h, w) in enumerate(SHAPES):
        gen = torch.Generator().manual_seed(i)
        coarse = put(rand(n, c, h, w, gen=gen), dtype, kinds[0])
        z = put(rand(n, c_in, 2 * h, 2 * w, gen=gen), dtype, kinds[1])
        weight = (rand(c, c_in, gen=gen) / c_in ** 0.5).to(acc)
        bias = rand(c, gen=gen).to(acc)
        for variant in ("add", "weighted", "gated"):
            kw = fusion_kw(variant, n, c, acc, gen)
            out = ops._lateral_up2_fuse_fwd(coarse, z, weight, bias, kw["w_coarse"], kw["w_fine"],
                                            kw["gate_coarse"], kw["gate_fine"], 1e-4)
            assert out.dtype == dtype and out.shape == (n, c, 2 * h, 2 * w)
            want_fmt = fmt_of(z)
            assert out.is_contiguous(memory_format=want_fmt)
            close(out, ref_fwd(coarse, z, weight, bias, **kw), dtype, what=variant)


def test_forward_reads_coarse_column_one_with_weight_zero():
    """Fine column 0 reads coarse columns 0 and 1 with weights (1, 0), like eager: a NaN in
    coarse column 1 reaches out[..., 0] (and the same along y)."""
    for kind in ("contiguous", "channels_last"):
        coarse = torch.zeros(1, 3, 2, 2)
        coarse[:, :, 1, 1] = float("nan")
        z = layout(torch.zeros(1, 2, 4, 4), kind)
        out = ops._lateral_up2_fuse_fwd(layout(coarse, kind), z, torch.ones(3, 2), torch.zeros(3),
                                        None, None, None, None, 1e-4)
        want = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)
        assert torch.equal(out.isnan(), want.isnan())


# ----------------------------------------------------------------------------- grad_z
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kinds", [("contiguous", "contiguous"), ("channels_last", "channels_last"),
                                   ("strided", "strided"), ("contiguous", "channels_last"),
                                   ("channels_last", "contiguous")], ids="-".join)
def test_grad_z(dtype, kinds):
    acc = acc_of(dtype)
    for i, (n, c_in, c, h, w) in enumerate(SHAPES):
        gen = torch.Generator().manual_seed(i)
        g = put(rand(n, c, 2 * h, 2 * w, gen=gen), dtype, kinds[0])
        z = put(rand(n, c_in, 2 * h, 2 * w, gen=gen), dtype, kinds[1])
        weight = (rand(c, c_in, gen=gen) / c ** 0.5).to(acc)
        scale = rand(n, c, gen=gen).to(acc)
        quad = (rand(c_in, c_in, gen=gen) / c_in).to(acc)
        shift = rand(c_in, gen=gen).to(acc)
        for args in ((None, None, None), (scale, None, None), (scale, quad, shift),
                     (None, quad, None)):
            out = ops._lateral_grad_z(g, z, weight, *args)
            assert out.dtype == dtype and out.shape == z.shape
            assert out.stride() == torch.empty_like(z).stride()
            close(out, ref_grad_z(g, z, weight, *args), dtype, what=str([a is None for a in args]))


# ----------------------------------------------------------------------------- bwd_coarse
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kinds", [("contiguous", "contiguous"), ("channels_last", "channels_last"),
                                   ("strided", "strided"), ("contiguous", "channels_last")],
                         ids="-".join)
def test_bwd_coarse(dtype, kinds):
    acc = acc_of(dtype)
    for i, (n, _, c, h, w) in enumerate(SHAPES):
        gen = torch.Generator().manual_seed(i)
        g = put(rand(n, c, 2 * h, 2 * w, gen=gen), dtype, kinds[0])
        coarse = put(rand(n, c, h, w, gen=gen), dtype, kinds[1])
        for variant in ("add", "weighted", "gated"):
            kw = fusion_kw(variant, n, c, acc, gen)
            for need_sum in (False, True):
                grad, sums = ops._up2_fuse_bwd_coarse(g, coarse, kw["w_coarse"], kw["w_fine"],
                                                      kw["gate_coarse"], 1e-4, need_sum)
                want, want_sums = ref_bwd_coarse(g, coarse, kw["w_coarse"], kw["w_fine"],
                                                 kw["gate_coarse"])
                assert grad.dtype == dtype and grad.stride() == torch.empty_like(coarse).stride()
                close(grad, want, dtype, what=variant)
                if need_sum:
                    assert sums.dtype == acc and sums.shape == (n, c)
                    close(sums, want_sums, dtype, sum_tol(dtype, 4 * h * w), "sum_coarse")
                else:
                    assert sums.dtype == acc and sums.shape == (0,)


def test_bwd_coarse_is_the_coarse_half_of_up2_fuse_bwd():
    """One kernel: same layouts -> bitwise the grad_coarse / sum_coarse of _up2_fuse_bwd."""
    gen = torch.Generator().manual_seed(3)
    for kind in ("contiguous", "channels_last"):
        n, c, h, w = 2, 5, 9, 70
        g = layout(rand(n, c, 2 * h, 2 * w, gen=gen).float(), kind)
        coarse = layout(rand(n, c, h, w, gen=gen).float(), kind)
        fine = layout(rand(n, c, 2 * h, 2 * w, gen=gen).float(), kind)
        wc, wf = torch.tensor([0.3]), torch.tensor([-0.2])
        gate = torch.rand(n, c, generator=gen)
        gc_full, _, sc_full, _ = ops._up2_fuse_bwd(g, coarse, fine, wc, wf, gate, None, 1e-4, True)
        gc_half, sc_half = ops._up2_fuse_bwd_coarse(g, coarse, wc, wf, gate, 1e-4, True)
        assert torch.equal(gc_full, gc_half) and torch.equal(sc_full, sc_half)


# ----------------------------------------------------------------------------- determinism
def run_all(kind, g_kind):
    gen = torch.Generator().manual_seed(7)
    n, c_in, c, h, w = 3, 9, 10, 35, 100  # several units and panels per image
    coarse = layout(rand(n, c, h, w, gen=gen).float(), kind)
    z = layout(rand(n, c_in, 2 * h, 2 * w, gen=gen, shift=3.0).float(), kind)
    g = layout(rand(n, c, 2 * h, 2 * w, gen=gen).float(), g_kind)
    weight = rand(c, c_in, gen=gen).float()
    pilot = z[0, :, 0, 0].contiguous()
    out = [*ops._lateral_gram(z, z, pilot, pilot), *ops._lateral_gram(g, z, None, pilot)]
    out.append(ops._lateral_up2_fuse_fwd(coarse, z, weight, rand(c, gen=gen).float(),
                                         torch.tensor([0.1]), torch.tensor([0.2]), None, None,
                                         1e-4))
    out.append(ops._lateral_grad_z(g, z, weight, torch.rand(n, c, generator=gen),
                                   torch.rand(c_in, c_in, generator=gen), rand(c_in, gen=gen).float()))
    out.extend(ops._up2_fuse_bwd_coarse(g, coarse, None, None, None, 1e-4, True))
    return out


@pytest.mark.parametrize("kind,g_kind", [("contiguous", "contiguous"),
                                         ("channels_last", "channels_last"),
                                         ("channels_last", "contiguous")])
def test_bitwise_deterministic_across_thread_counts(kind, g_kind):
    assert_same_for_thread_counts(lambda: run_all(kind, g_kind))


# ----------------------------------------------------------------------------- edge cases
def test_empty_tensors():
    f = torch.float32
    # empty batch
    z, g = torch.empty(0, 3, 4, 6), torch.empty(0, 5, 4, 6)
    gram, colsum = ops._lateral_gram(g, z, None, None)
    assert gram.shape == (0, 5, 3) and colsum.shape == (0, 5)
    out = ops._lateral_up2_fuse_fwd(torch.empty(0, 5, 2, 3), z, torch.ones(5, 3), torch.ones(5),
                                    None, None, None, None, 1e-4)
    assert out.shape == (0, 5, 4, 6)
    assert ops._lateral_grad_z(g, z, torch.ones(5, 3), None, None, None).shape == z.shape
    grad, sums = ops._up2_fuse_bwd_coarse(g, torch.empty(0, 5, 2, 3), None, None, None, 1e-4, True)
    assert grad.shape == (0, 5, 2, 3) and sums.shape == (0, 5)
    # empty spatial size: zero sums
    gram, colsum = ops._lateral_gram(torch.empty(2, 5, 0, 4), torch.empty(2, 3, 0, 4), None, None)
    assert torch.equal(gram, torch.zeros(2, 5, 3)) and torch.equal(colsum, torch.zeros(2, 5))
    grad, sums = ops._up2_fuse_bwd_coarse(torch.empty(2, 5, 0, 4), torch.empty(2, 5, 0, 2), None,
                                          None, None, 1e-4, True)
    assert torch.equal(sums, torch.zeros(2, 5))
    # Cin = 0: y = bias; C = 0 in grad_z: only -quad z + shift
    coarse = torch.randn(2, 4, 3, 2)
    out = ops._lateral_up2_fuse_fwd(coarse, torch.empty(2, 0, 6, 4), torch.empty(4, 0, dtype=f),
                                    torch.arange(4.0), None, None, None, None, 1e-4)
    close(out, ref_fwd(coarse, torch.empty(2, 0, 6, 4), torch.empty(4, 0), torch.arange(4.0),
                       None, None, None, None), torch.float32)
    z = torch.randn(2, 3, 4, 4)
    quad, shift = torch.randn(3, 3), torch.randn(3)
    out = ops._lateral_grad_z(torch.empty(2, 0, 4, 4), z, torch.empty(0, 3), None, quad, shift)
    close(out, ref_grad_z(torch.empty(2, 0, 4, 4), z, torch.empty(0, 3), None, quad, shift),
          torch.float32)
    gram, colsum = ops._lateral_gram(z, torch.empty(2, 0, 4, 4), None, None)
    assert gram.shape == (2, 3, 0)
    close(colsum, z.double().sum((2, 3)), torch.float32)


@pytest.mark.parametrize("call,match", [
    (lambda: ops._lateral_gram(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 5), None, None),
     "share batch and spatial"),
    (lambda: ops._lateral_gram(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4).double(), None,
                               None), "same dtype"),
    (lambda: ops._lateral_gram(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), torch.ones(3),
                               None), "a_center"),
    (lambda: ops._lateral_gram(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), None,
                               torch.ones(2).double()), "b_center"),
    (lambda: ops._lateral_gram(torch.ones(2, 3, 4), torch.ones(1, 2, 3, 4), None, None),
     "a must be 4-D"),
    (lambda: ops._lateral_gram(torch.ones(1, 2, 3, 4, dtype=torch.int32),
                               torch.ones(1, 2, 3, 4, dtype=torch.int32), None, None),
     "unsupported dtype"),
    (lambda: ops._lateral_up2_fuse_fwd(torch.ones(1, 4, 2, 2), torch.ones(1, 3, 4, 5),
                                       torch.ones(4, 3), torch.ones(4), None, None, None, None,
                                       1e-4), "z must be"),
    (lambda: ops._lateral_up2_fuse_fwd(torch.ones(1, 4, 2, 2), torch.ones(1, 3, 4, 4),
                                       torch.ones(3, 4), torch.ones(4), None, None, None, None,
                                       1e-4), "weight"),
    (lambda: ops._lateral_up2_fuse_fwd(torch.ones(1, 4, 2, 2), torch.ones(1, 3, 4, 4),
                                       torch.ones(4, 3), torch.ones(4).double(), None, None, None,
                                       None, 1e-4), "bias"),
    (lambda: ops._lateral_up2_fuse_fwd(torch.ones(1, 4, 2, 2), torch.ones(1, 3, 4, 4),
                                       torch.ones(4, 3), torch.ones(4), torch.ones(1), None, None,
                                       None, 1e-4), "given together"),
    (lambda: ops._lateral_up2_fuse_fwd(torch.ones(1, 4, 2, 2), torch.ones(1, 3, 4, 4),
                                       torch.ones(4, 3), torch.ones(4), None, None,
                                       torch.ones(1, 3), None, 1e-4), "gate_coarse"),
    (lambda: ops._lateral_up2_fuse_fwd(torch.ones(1, 4, 2, 2), torch.ones(1, 3, 4, 4).double(),
                                       torch.ones(4, 3), torch.ones(4), None, None, None, None,
                                       1e-4), "coarse and z must have the same dtype"),
    (lambda: ops._lateral_up2_fuse_fwd(torch.ones(1, 4, 2, 2), torch.ones(1, 3, 4, 4),
                                       torch.ones(4, 6)[:, ::2], torch.ones(4), None, None, None,
                                       None, 1e-4), "weight must be contiguous"),
    (lambda: ops._lateral_grad_z(torch.ones(1, 4, 4, 4), torch.ones(1, 3, 4, 5),
                                 torch.ones(4, 3), None, None, None), "grad_out must be"),
    (lambda: ops._lateral_grad_z(torch.ones(1, 4, 4, 4), torch.ones(1, 3, 4, 4),
                                 torch.ones(4, 3), torch.ones(4), None, None), "scale"),
    (lambda: ops._lateral_grad_z(torch.ones(1, 4, 4, 4), torch.ones(1, 3, 4, 4),
                                 torch.ones(4, 3), None, torch.ones(3, 4), None), "quad"),
    (lambda: ops._lateral_grad_z(torch.ones(1, 4, 4, 4), torch.ones(1, 3, 4, 4),
                                 torch.ones(4, 3), None, None, torch.ones(4)), "shift"),
    (lambda: ops._up2_fuse_bwd_coarse(torch.ones(1, 4, 4, 5), torch.ones(1, 4, 2, 2), None, None,
                                      None, 1e-4, True), "grad_out must be"),
    (lambda: ops._up2_fuse_bwd_coarse(torch.ones(1, 4, 4, 4).double(), torch.ones(1, 4, 2, 2),
                                      None, None, None, 1e-4, True), "same dtype"),
])
def test_bad_arguments_name_the_argument(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


_NARROWER_ISA_CHECKS = """
for dtype in (torch.float32, torch.float64, torch.bfloat16):
    t.test_gram(dtype, ("contiguous", "channels_last"))
    t.test_gram_of_itself_skips_the_lower_tiles(dtype, "channels_last")
    t.test_forward(dtype, ("channels_last", "channels_last"))
    t.test_forward(dtype, ("contiguous", "contiguous"))
    t.test_grad_z(dtype, ("contiguous", "channels_last"))
    t.test_grad_z(dtype, ("strided", "contiguous"))
"""


@pytest.mark.parametrize("isa", CPU_ISAS[:-1])
def test_narrower_isa_builds(isa):
    """The kernels compiled for the narrower instruction sets (LITEFPN_CPU_ISA=default: the
    build's baseline; avx2) pass the same checks."""
    assert_checks_pass_with_cpu_isa(isa, "tests.kernels.cpu.test_lateral_up2_fuse", _NARROWER_ISA_CHECKS)
