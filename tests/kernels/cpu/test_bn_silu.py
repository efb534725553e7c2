"""The CPU kernels of bn_silu, called directly (torch.ops.litefpn._bn_silu_stats, _bn_silu_fwd,
_bn_silu_bwd_sums, _bn_silu_bwd) against float64 formulas of their contracts (csrc/ops.cpp):
dtypes, layouts (contiguous, channels_last, strided views, expanded grad_out), odd sizes, units
spanning several chunks, NaN/Inf behaviour and exp accuracy of the forward, determinism across
thread counts, empty tensors, argument errors and the narrower-ISA builds (baseline, AVX2).
"""
import pytest
import torch
import torch.nn.functional as F

from tests.support.helpers import (CPU_ISAS, assert_checks_pass_with_cpu_isa,
                                   assert_same_for_thread_counts, layout, need)

ops = torch.ops.litefpn
F64 = torch.float64
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# x layouts: "strided" has no unit stride at all (channels permuted, every other column);
# "cl_sliced" is every other column of a channels_last tensor (unit channel stride, pixels not
# dense).
KINDS = ["contiguous", "channels_last", "strided", "cl_sliced"]
# Outputs: relative to the output's scale. Sums: relative to |sum| + the l2 norm of the terms
# (the sums run in fp32 for every storage dtype but fp64; fp16 / bf16 inputs are exact in fp32).
OUT_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SUM_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}

# (N, C, H, W): C = 1 (plane path only), C = 5, C = 130, H = 1, W = 1, odd sizes; planes of
# 34390 positions (two plane-path chunks); 2145 pixels of 16 channels (three nhwc chunks); C =
# 2100 (nhwc blocks of one pixel); 1x1 maps (NCHW-contiguous with unit channel stride).
SHAPES = [(2, 5, 7, 9), (1, 1, 3, 4), (2, 130, 5, 3), (3, 3, 1, 11), (2, 4, 6, 1),
          (1, 16, 33, 65), (1, 2, 181, 190), (2, 2100, 2, 3), (3, 7, 1, 1)]


@pytest.fixture(autouse=True)
def _cpu_backend():
    need("bn_silu", "cpu", "cpu")


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_like(x, kind, gen):
    """grad_out for x: in layout `kind`, or expanded (zero strides)."""
    n, c, h, w = x.shape
    if kind == "expanded":  # per-(c, w) values, strides (0, w, 0, 1)
        return torch.randn(1, c, 1, w, generator=gen, dtype=F64).to(x.dtype).expand(n, c, h, w)
    if kind == "ones_expanded":  # all strides 0
        return torch.ones(1, dtype=x.dtype).expand(n, c, h, w)
    return layout(torch.randn(n, c, h, w, generator=gen, dtype=F64).to(x.dtype), kind)


def fmt_of(x):
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def ch(v):
    return v.double()[:, None, None]


# ----------------------------------------------------------------------------- float64 contracts
def ref_stats(x, center):
    d = x.double() - ch(center)
    return d, d.sum((0, 2, 3)), (d * d).sum((0, 2, 3))


def ref_a(x, scale, shift):
    return x.double() * ch(scale) + ch(shift)


def ref_fwd(x, scale, shift):
    a = ref_a(x, scale, shift)
    return a / (1 + torch.exp(-a))


def ref_dz(g, x, scale, shift):
    a = ref_a(x, scale, shift)
    sg = torch.sigmoid(a)
    return g.double() * sg * (1 + a * (1 - sg))


def check_out(got, want, x, what):
    assert got.dtype == x.dtype and got.shape == x.shape, what
    assert got.stride() == torch.empty(x.shape, memory_format=fmt_of(x)).stride(), what
    tol = OUT_TOL[x.dtype]
    scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what}: {m}")


def check_sum(got, want, terms, dtype, what):
    assert got.dtype == acc_of(dtype) and got.shape == want.shape, what
    mag = terms.pow(2).sum((0, 2, 3)).sqrt()
    err = (got.double() - want).abs()
    bound = SUM_TOL[dtype] * (want.abs() + mag) + 1e-30
    assert bool((err <= bound).all()), f"{what}: max err/bound {(err / bound).max().item():.3g}"


def params(c, acc, gen):
    def r(scale=1.0, shift=0.0):
        return (torch.randn(c, generator=gen, dtype=F64) * scale + shift).to(acc)
    return dict(center=r(), scale=r(0.5, 1.0), shift=r(0.5), k_dz=r(), k_x=r(0.1), k_0=r(0.1))


# ----------------------------------------------------------------------------- all four ops
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_ops_match_contracts(dtype, kind):
    acc = acc_of(dtype)
    other = "channels_last" if kind == "contiguous" else "contiguous"
    for i, shape in enumerate(SHAPES):
        gen = torch.Generator().manual_seed(i)
        x = layout((torch.randn(*shape, generator=gen, dtype=F64) * 2 + 0.5).to(dtype), kind)
        p = params(shape[1], acc, gen)
        what = f"{dtype} {kind} {shape}"

        s1, s2 = ops._bn_silu_stats(x, p["center"])
        d, w1, w2 = ref_stats(x, p["center"])
        check_sum(s1, w1, d, dtype, f"stats s1 {what}")
        check_sum(s2, w2, d * d, dtype, f"stats s2 {what}")

        y = ops._bn_silu_fwd(x, p["scale"], p["shift"])
        check_out(y, ref_fwd(x, p["scale"], p["shift"]), x, f"fwd {what}")

        for g_kind in (kind, other, "expanded", "ones_expanded"):
            g = grad_like(x, g_kind, gen)
            dz = ref_dz(g, x, p["scale"], p["shift"])
            s1, s2 = ops._bn_silu_bwd_sums(g, x, p["scale"], p["shift"], p["center"])
            check_sum(s1, dz.sum((0, 2, 3)), dz, dtype, f"bwd_sums s1 {what} g {g_kind}")
            check_sum(s2, (dz * d).sum((0, 2, 3)), dz * d, dtype, f"bwd_sums s2 {what} g {g_kind}")
            gx = ops._bn_silu_bwd(g, x, p["scale"], p["shift"], p["k_dz"], p["k_x"], p["k_0"])
            want = dz * ch(p["k_dz"]) + x.double() * ch(p["k_x"]) + ch(p["k_0"])
            check_out(gx, want, x, f"bwd {what} g {g_kind}")


def test_centred_stats_fp32_are_accurate_for_large_mean():
    """x ~ 100 + N(0, 1) in fp32: centred at a pilot value, the variance keeps ~6 digits."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 8, 40, 50, generator=gen, dtype=F64) + 100).float()
    count = x.numel() // x.shape[1]
    want = x.double().var((0, 2, 3), unbiased=False)
    pilot = x[0, :, 0, 0].contiguous()
    for kind in ("contiguous", "channels_last"):
        s1, s2 = ops._bn_silu_stats(layout(x, kind), pilot)
        m = s1.double() / count
        var = s2.double() / count - m * m
        torch.testing.assert_close(pilot.double() + m, x.double().mean((0, 2, 3)), rtol=1e-7,
                                   atol=1e-6)
        torch.testing.assert_close(var, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- forward edge values
SPECIAL = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0, 20.0,
           -20.0, 87.0, -87.0, 88.5, -88.5, 88.8, -88.8, 89.0, -89.0, 100.0, -100.0, 104.0,
           -104.0, 200.0, -200.0, 1e30, -1e30, 3.4e38, -3.4e38]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_fwd_nan_inf_like_eager_silu(dtype, kind):
    acc = acc_of(dtype)
    vals = torch.tensor(SPECIAL, dtype=F64)
    # 3 channels, the special values along W (and a tail that is not a multiple of 8)
    x = layout(vals.repeat(3).view(1, 3, 1, -1).to(dtype), kind)
    y = ops._bn_silu_fwd(x, torch.ones(3, dtype=acc), torch.zeros(3, dtype=acc))
    want = F.silu(x)
    assert torch.equal(y.isnan(), want.isnan())
    assert torch.equal(y.isinf(), want.isinf())
    torch.testing.assert_close(y, want, rtol=2 * OUT_TOL[dtype], atol=0, equal_nan=True)
    # exp(-a) overflows for a << 0: y = a / inf = -0.0, as in eager (x = -0.0 itself gives
    # a = -0*1 + 0 = +0 by the contract, so it is left out)
    zero = (want == 0) & (x < -1)
    assert torch.equal(y[zero].signbit(), want[zero].signbit())


def test_fwd_fp32_exp_accuracy():
    """The vectorised exp: silu of every 2^-10 step of [-87, 87] within 4 ulp of float64."""
    a = torch.arange(-87 * 1024, 87 * 1024 + 1, dtype=F64) / 1024
    x = a.float().view(1, 1, 1, -1)
    y = ops._bn_silu_fwd(x, torch.ones(1), torch.zeros(1)).double().flatten()
    want = a / (1 + torch.exp(-a))
    rel = ((y - want) / want.abs().clamp_min(1e-300)).abs()
    rel[a == 0] = 0
    assert rel.max().item() < 4 * 2.0 ** -23, rel.max().item()


# ----------------------------------------------------------------------------- determinism
def run_all(kind, g_kind):
    gen = torch.Generator().manual_seed(7)
    # plane path: 2 chunks per plane; nhwc path: 24 channels, 4 chunks per image
    shape = (3, 6, 190, 181) if kind == "contiguous" else (2, 24, 50, 70)
    x = layout((torch.randn(*shape, generator=gen) * 3 + 1), kind)
    g = grad_like(x, g_kind, gen)
    p = params(shape[1], torch.float32, gen)
    out = [*ops._bn_silu_stats(x, p["center"]), ops._bn_silu_fwd(x, p["scale"], p["shift"])]
    out.extend(ops._bn_silu_bwd_sums(g, x, p["scale"], p["shift"], p["center"]))
    out.append(ops._bn_silu_bwd(g, x, p["scale"], p["shift"], p["k_dz"], p["k_x"], p["k_0"]))
    return out


@pytest.mark.parametrize("kind,g_kind", [("contiguous", "contiguous"),
                                         ("channels_last", "channels_last"),
                                         ("channels_last", "contiguous")])
def test_bitwise_deterministic_across_thread_counts(kind, g_kind):
    assert_same_for_thread_counts(lambda: run_all(kind, g_kind))


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("shape", [(0, 5, 3, 4), (2, 5, 0, 4), (2, 5, 3, 0), (2, 0, 3, 4)])
def test_empty(shape):
    c = shape[1]
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        acc = acc_of(dtype)
        x = torch.empty(shape, dtype=dtype)
        v = torch.ones(c, dtype=acc)
        for s in (*ops._bn_silu_stats(x, v), *ops._bn_silu_bwd_sums(x, x, v, v, v)):
            assert s.dtype == acc and torch.equal(s, torch.zeros(c, dtype=acc))
        y = ops._bn_silu_fwd(x, v, v)
        gx = ops._bn_silu_bwd(x, x, v, v, v, v, v)
        assert y.shape == shape and y.dtype == dtype and gx.shape == shape and gx.dtype == dtype


def _x():
    return torch.ones(2, 5, 3, 4)


def _v(c=5, dtype=torch.float32):
    return torch.ones(c, dtype=dtype)


@pytest.mark.parametrize("call,match", [
    (lambda: ops._bn_silu_stats(torch.ones(2, 5, 3), _v()), "x must be 4-D"),
    (lambda: ops._bn_silu_stats(torch.ones(2, 5, 3, 4, dtype=torch.int32), _v()),
     "x has unsupported dtype"),
    (lambda: ops._bn_silu_stats(_x(), _v(dtype=torch.float64)),
     "center must have the accumulation dtype"),
    (lambda: ops._bn_silu_stats(_x().half(), _v(dtype=torch.float16)),
     "center must have the accumulation dtype"),
    (lambda: ops._bn_silu_stats(_x(), _v(4)), r"center must have shape \[C\]"),
    (lambda: ops._bn_silu_stats(_x(), torch.ones(5, 1)), r"center must have shape \[C\]"),
    (lambda: ops._bn_silu_stats(_x(), torch.ones(10)[::2]), "center must be contiguous"),
    (lambda: ops._bn_silu_fwd(_x(), _v(6), _v()), "scale"),
    (lambda: ops._bn_silu_fwd(_x(), _v(), _v(dtype=torch.float64)), "shift"),
    (lambda: ops._bn_silu_fwd(_x().double(), _v(dtype=torch.float64), _v()), "shift"),
    (lambda: ops._bn_silu_bwd_sums(torch.ones(2, 5, 3, 5), _x(), _v(), _v(), _v()),
     "grad_out must have x's shape"),
    (lambda: ops._bn_silu_bwd_sums(_x().double(), _x(), _v(), _v(), _v()),
     "grad_out must have x's dtype"),
    (lambda: ops._bn_silu_bwd_sums(_x(), _x(), _v(), _v(), _v(3)), "center"),
    (lambda: ops._bn_silu_bwd_sums(_x(), _x(), _v(3), _v(), _v()), "scale"),
    (lambda: ops._bn_silu_bwd(_x(), torch.ones(2, 5, 3), _v(), _v(), _v(), _v(), _v()),
     "x must be 4-D"),
    (lambda: ops._bn_silu_bwd(_x().half(), _x(), _v(), _v(), _v(), _v(), _v()),
     "grad_out must have x's dtype"),
    (lambda: ops._bn_silu_bwd(_x(), _x(), _v(), _v(), _v(2), _v(), _v()), "k_dz"),
    (lambda: ops._bn_silu_bwd(_x(), _x(), _v(), _v(), _v(), _v(dtype=torch.float64), _v()),
     "k_x"),
    (lambda: ops._bn_silu_bwd(_x(), _x(), _v(), _v(), _v(), _v(), torch.ones(10)[::2]), "k_0"),
    (lambda: ops._bn_silu_bwd(_x(), _x(), _v(), _v(4), _v(), _v(), _v()), "shift"),
])
def test_bad_arguments_name_the_argument(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


# ----------------------------------------------------------------------------- narrower ISAs
_NARROWER_ISA_CHECKS = """
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    for kind in ("contiguous", "channels_last", "strided"):
        t.test_ops_match_contracts(dtype, kind)
    t.test_fwd_nan_inf_like_eager_silu(dtype, "channels_last")
t.test_fwd_fp32_exp_accuracy()
t.test_bitwise_deterministic_across_thread_counts("channels_last", "contiguous")
"""


@pytest.mark.parametrize("isa", CPU_ISAS[:-1])
def test_narrower_isa_builds(isa):
    """The kernels compiled for the narrower instruction sets (LITEFPN_CPU_ISA=default: the
    build's baseline; avx2) pass the same checks."""
    assert_checks_pass_with_cpu_isa(isa, "tests.kernels.cpu.test_bn_silu", _NARROWER_ISA_CHECKS)
