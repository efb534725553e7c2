"""Contract checks of the emulated CUDA ops (litefpn_emu::*) against float64 eager compositions.

Shared by tests/kernels/cuda/test_emulated_kernels.py (in-process, plain build) and exercise.py (the
sanitizer runs). Every check_* computes the op, compares it with its contract (csrc/ops.cpp) and
returns the kernel launches it caused ("<instantiation>@<blocks>"), for path-coverage asserts.
"""
import torch
import torch.nn.functional as F

from tests.support.layouts import layout  # noqa: F401  (the emulation tests use cases.layout)

F64 = torch.float64
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Output tolerances: those of the CPU / Triton kernel tests (tests/helpers.py TOL for up2_fuse,
# test_cpu_lateral_kernels.OUT_TOL for the lateral kernels).
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
MIX_TOL = {torch.float64: dict(rtol=1e-11, atol=1e-11), torch.float32: dict(rtol=2e-5, atol=2e-5),
           torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
EPS = 1e-4


def ops():
    return torch.ops.litefpn_emu


def acc_of(dtype):
    return F64 if dtype == F64 else torch.float32


def sum_tol(dtype, count):
    """fp32 sums of `count` O(1) products (test_cpu_lateral_kernels.sum_tol)."""
    if dtype == F64:
        return dict(rtol=1e-11, atol=1e-11)
    return dict(rtol=2e-5, atol=2e-6 * count ** 0.5 + 1e-5)


# ----------------------------------------------------------------------------- layouts
KINDS = ("contiguous", "channels_last", "strided", "offset", "channels_last_offset")


def fmt_of(t):
    cl = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def rand(*shape, gen, dtype, kind="contiguous", shift=0.0):
    return layout((torch.randn(*shape, generator=gen, dtype=F64) + shift).to(dtype), kind)


def close(got, want, tol, what):
    torch.testing.assert_close(got.double(), want, **tol, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- references
def up2(x):
    return F.interpolate(x.double(), scale_factor=2, mode="bilinear", align_corners=False)


def up2_t(g, coarse_shape):
    return torch.ops.aten.upsample_bilinear2d_backward(g.double(), list(g.shape[2:]),
                                                       list(coarse_shape), False, 2.0, 2.0)


def fusion(w_coarse, w_fine):
    if w_coarse is None:
        return 1.0, 1.0
    sc, sf = F.softplus(w_coarse.double()), F.softplus(w_fine.double())
    return sc / (sc + sf + EPS), sf / (sc + sf + EPS)


def gate(g):
    return 1.0 if g is None else g.double()[:, :, None, None]


def fusion_args(n, c, dtype, gen, weighted, gates):
    acc = acc_of(dtype)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    w = ((r(1) + 1).to(acc), (r(1) - 0.5).to(acc)) if weighted else (None, None)
    g = (torch.sigmoid(r(n, c)).to(acc), torch.sigmoid(r(n, c)).to(acc)) if gates else (None, None)
    return (*w, *g)


# ----------------------------------------------------------------------------- up2_fuse
def check_up2_fwd(shape, dtype, kind, weighted=True, gates=True, seed=0):
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    coarse = rand(n, c, h, w, gen=gen, dtype=dtype, kind=kind)
    fine = rand(n, c, 2 * h, 2 * w, gen=gen, dtype=dtype, kind=kind)
    wc, wf, gc, gf = fusion_args(n, c, dtype, gen, weighted, gates)
    ops()._launches()
    out = ops()._up2_fuse_fwd(coarse, fine, wc, wf, gc, gf, EPS)
    launches = ops()._launches()
    alpha, beta = fusion(wc, wf)
    want = alpha * gate(gc) * up2(coarse) + beta * gate(gf) * fine.double()
    assert out.dtype == dtype and out.shape == fine.shape
    assert out.stride() == torch.empty_like(fine).stride(), "out must be empty_like(fine)"
    close(out, want, TOL[dtype], f"_up2_fuse_fwd {shape} {dtype} {kind}")
    return launches


def grad_like(shape, dtype, kind, gen):
    """grad_out of `shape` in layout `kind`, or expanded: "expand_hw" (stride 0 along H, W),
    "expand_all" (every stride 0, as out.sum() gives)."""
    n, c, h, w = shape
    if kind == "expand_hw":
        return rand(n, c, 1, 1, gen=gen, dtype=dtype).expand(shape)
    if kind == "expand_all":
        return rand(1, 1, 1, 1, gen=gen, dtype=dtype).expand(shape)
    return rand(*shape, gen=gen, dtype=dtype, kind=kind)


def check_up2_bwd(shape, dtype, kind, grad_kind=None, weighted=True, gates=True, need_sums=True,
                  seed=0):
    n, c, h, w = shape
    fshape = (n, c, 2 * h, 2 * w)
    gen = torch.Generator().manual_seed(seed)
    coarse = rand(*shape, gen=gen, dtype=dtype, kind=kind)
    fine = rand(*fshape, gen=gen, dtype=dtype, kind=kind)
    g = grad_like(fshape, dtype, grad_kind or kind, gen)
    wc, wf, gc, gf = fusion_args(n, c, dtype, gen, weighted, gates)
    ops()._launches()
    grad_c, grad_f, sum_c, sum_f = ops()._up2_fuse_bwd(g, coarse, fine, wc, wf, gc, gf, EPS,
                                                       need_sums)
    launches = ops()._launches()
    alpha, beta = fusion(wc, wf)
    what = f"_up2_fuse_bwd {shape} {dtype} {kind}/{grad_kind}"
    assert grad_c.stride() == torch.empty_like(coarse).stride()
    assert grad_f.stride() == torch.empty_like(fine).stride()
    close(grad_c, alpha * gate(gc) * up2_t(g, shape), TOL[dtype], what + " grad_coarse")
    close(grad_f, beta * gate(gf) * g.double(), TOL[dtype], what + " grad_fine")
    acc = acc_of(dtype)
    if need_sums:
        assert sum_c.dtype == acc and sum_c.shape == (n, c) and sum_f.shape == (n, c)
        count = 4 * h * w
        close(sum_c, (g.double() * up2(coarse)).sum((2, 3)), sum_tol(dtype, count), what + " sum_c")
        close(sum_f, (g.double() * fine.double()).sum((2, 3)), sum_tol(dtype, count),
              what + " sum_f")
    else:
        assert sum_c.shape == (0,) and sum_f.shape == (0,) and sum_c.dtype == acc
    return launches


def check_up2_bwd_coarse(shape, dtype, kind, grad_kind=None, weighted=True, gates=True,
                         need_sum=True, seed=0):
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    coarse = rand(*shape, gen=gen, dtype=dtype, kind=kind)
    g = grad_like((n, c, 2 * h, 2 * w), dtype, grad_kind or kind, gen)
    wc, wf, gc, _ = fusion_args(n, c, dtype, gen, weighted, gates)
    ops()._launches()
    grad_c, sum_c = ops()._up2_fuse_bwd_coarse(g, coarse, wc, wf, gc, EPS, need_sum)
    launches = ops()._launches()
    alpha, _ = fusion(wc, wf)
    what = f"_up2_fuse_bwd_coarse {shape} {dtype} {kind}/{grad_kind}"
    assert grad_c.stride() == torch.empty_like(coarse).stride()
    close(grad_c, alpha * gate(gc) * up2_t(g, shape), TOL[dtype], what + " grad_coarse")
    if need_sum:
        close(sum_c, (g.double() * up2(coarse)).sum((2, 3)), sum_tol(dtype, 4 * h * w),
              what + " sum")
    else:
        assert sum_c.shape == (0,)
    return launches


# ----------------------------------------------------------------------------- lateral
def check_gram(n, ca, cb, hw, dtype, kinds, centers=True, seed=0, itself=False):
    """`itself`: b is a, with a's centre (the moments pass; cb must equal ca): the symmetric path,
    whose result must also be bitwise symmetric."""
    h, w = hw
    gen = torch.Generator().manual_seed(seed)
    a = rand(n, ca, h, w, gen=gen, dtype=dtype, kind=kinds[0])
    b = a if itself else rand(n, cb, h, w, gen=gen, dtype=dtype, kind=kinds[1], shift=0.5)
    acc = acc_of(dtype)
    ac = torch.randn(ca, generator=gen, dtype=F64).to(acc) if centers else None
    if itself:
        bc = ac
    else:
        bc = torch.randn(cb, generator=gen, dtype=F64).to(acc) if centers else None
    ops()._launches()
    gram, colsum = ops()._lateral_gram(a, b, ac, bc)
    launches = ops()._launches()
    a64 = a.double() - (0 if ac is None else ac.double()[:, None, None])
    b64 = b.double() - (0 if bc is None else bc.double()[:, None, None])
    what = f"_lateral_gram {(n, ca, cb, hw)} {dtype} {kinds}"
    assert gram.dtype == acc and gram.shape == (n, ca, cb) and colsum.shape == (n, ca)
    close(gram, torch.einsum("nihw,njhw->nij", a64, b64), sum_tol(dtype, h * w), what + " gram")
    close(colsum, a64.sum((2, 3)), sum_tol(dtype, h * w), what + " colsum")
    if itself:
        assert torch.equal(gram, gram.transpose(1, 2)), what + ": a's own gram is not symmetric"
    return launches


def check_lateral_fwd(n, cin, c, hw, dtype, kinds, weighted=True, gates=True, seed=0):
    h, w = hw
    gen = torch.Generator().manual_seed(seed)
    coarse = rand(n, c, h, w, gen=gen, dtype=dtype, kind=kinds[0])
    z = rand(n, cin, 2 * h, 2 * w, gen=gen, dtype=dtype, kind=kinds[1])
    acc = acc_of(dtype)
    weight = (torch.randn(c, cin, generator=gen, dtype=F64) / cin ** 0.5).to(acc)
    bias = torch.randn(c, generator=gen, dtype=F64).to(acc)
    wc, wf, gc, gf = fusion_args(n, c, dtype, gen, weighted, gates)
    ops()._launches()
    out = ops()._lateral_up2_fuse_fwd(coarse, z, weight, bias, wc, wf, gc, gf, EPS)
    launches = ops()._launches()
    y = torch.einsum("ck,nkhw->nchw", weight.double(), z.double()) + bias.double()[:, None, None]
    alpha, beta = fusion(wc, wf)
    want = alpha * gate(gc) * up2(coarse) + beta * gate(gf) * y
    assert out.dtype == dtype and out.shape == (n, c, 2 * h, 2 * w)
    fmt = fmt_of(z)
    assert out.is_contiguous(memory_format=fmt), "out takes z's memory format"
    close(out, want, MIX_TOL[dtype], f"_lateral_up2_fuse_fwd {(n, cin, c, hw)} {dtype} {kinds}")
    return launches


def check_grad_z(n, cin, c, hw, dtype, kinds, scale=True, quad=True, shift=True, seed=0):
    h, w = hw
    gen = torch.Generator().manual_seed(seed)
    g = grad_like((n, c, h, w), dtype, kinds[0], gen)
    z = rand(n, cin, h, w, gen=gen, dtype=dtype, kind=kinds[1])
    acc = acc_of(dtype)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    weight = (r(c, cin) / c ** 0.5).to(acc)
    sc = r(n, c).to(acc) if scale else None
    qd = (r(cin, cin) / cin ** 0.5).to(acc) if quad else None
    sh = r(cin).to(acc) if shift else None
    ops()._launches()
    gz = ops()._lateral_grad_z(g, z, weight, sc, qd, sh)
    launches = ops()._launches()
    g64 = g.double() * (1.0 if sc is None else sc.double()[:, :, None, None])
    want = torch.einsum("ck,nchw->nkhw", weight.double(), g64)
    if qd is not None:
        want = want - torch.einsum("kj,njhw->nkhw", qd.double(), z.double())
    if sh is not None:
        want = want + sh.double()[:, None, None]
    assert gz.dtype == dtype and gz.shape == z.shape
    assert gz.stride() == torch.empty_like(z).stride(), "grad_z is empty_like(z)"
    close(gz, want, MIX_TOL[dtype], f"_lateral_grad_z {(n, cin, c, hw)} {dtype} {kinds}")
    return launches


# ----------------------------------------------------------------------------- bn_silu
def bn_params(c, dtype, gen):
    """center, scale, shift, k_dz, k_x, k_0: [C] in the accumulation dtype."""
    acc = acc_of(dtype)
    r = lambda s=1.0, m=0.0: (torch.randn(c, generator=gen, dtype=F64) * s + m).to(acc)  # noqa: E731
    return r(), r(0.5, 1.0), r(0.5), r(), r(0.1), r(0.1)


def _ch(v):
    return v.double()[:, None, None]


def bn_ref_dz(g, x, scale, shift):
    a = x.double() * _ch(scale) + _ch(shift)
    sg = torch.sigmoid(a)
    return g.double() * sg * (1 + a * (1 - sg))


def check_bn_silu(shape, dtype, kind, grad_kind=None, mean=0.5, seed=0):
    """All four _bn_silu_* ops on one x (values around `mean`, centred on a per-channel pilot)
    against float64; returns the launches."""
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    x = rand(*shape, gen=gen, dtype=dtype, kind=kind, shift=mean)
    center, scale, shift, k_dz, k_x, k_0 = bn_params(c, dtype, gen)
    g = grad_like(shape, dtype, grad_kind or kind, gen)
    acc, what = acc_of(dtype), f"bn_silu {shape} {dtype} {kind}/{grad_kind}"
    count = n * h * w
    ops()._launches()
    s1, s2 = ops()._bn_silu_stats(x, center)
    y = ops()._bn_silu_fwd(x, scale, shift)
    b1, b2 = ops()._bn_silu_bwd_sums(g, x, scale, shift, center)
    gx = ops()._bn_silu_bwd(g, x, scale, shift, k_dz, k_x, k_0)
    launches = ops()._launches()
    d = x.double() - _ch(center)
    a = x.double() * _ch(scale) + _ch(shift)
    dz = bn_ref_dz(g, x, scale, shift)
    fmt = fmt_of(x)
    for name, got in (("y", y), ("grad_x", gx)):
        assert got.dtype == dtype and got.shape == x.shape, what + name
        assert got.stride() == torch.empty(shape, memory_format=fmt).stride(), what + " " + name
    close(y, a / (1 + torch.exp(-a)), TOL[dtype], what + " y")
    close(gx, dz * _ch(k_dz) + x.double() * _ch(k_x) + _ch(k_0), TOL[dtype], what + " grad_x")
    for name, got, want in (("stats s1", s1, d.sum((0, 2, 3))), ("stats s2", s2, (d * d).sum((0, 2, 3))),
                            ("bwd_sums s1", b1, dz.sum((0, 2, 3))),
                            ("bwd_sums s2", b2, (dz * d).sum((0, 2, 3)))):
        assert got.dtype == acc and got.shape == (c,), what + " " + name
        close(got, want, sum_tol(dtype, count), what + " " + name)
    return launches
