"""`tf32_round` (litefpn_kernels/triton/_common.py): fp32 rounded to the nearest tf32 value, ties
to even, bit for bit as an independent float64 reference.

The lateral kernels feed fp32 weights to "tf32" dots through it (`_dot_w`): a tf32 MMA truncates
an fp32 operand, and the interpreter's exact tl.dot cannot show that, so the helper itself is
tested here (in the interpreter without a GPU, compiled on one). The end-to-end bias check is
test_lateral_up2_fuse.py::test_tf32_weights_unbiased_*.
"""
import numpy as np
import pytest
import torch

from tests.support.helpers import need

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


triton = pytest.importorskip("triton")
tl = triton.language
from litefpn_kernels.triton._common import tf32_round  # noqa: E402


@triton.jit
def _round_kernel(w_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(out_ptr + i, tf32_round(tl.load(w_ptr + i, mask=m, other=0.0)), mask=m)


@pytest.fixture(scope="module")
def rounded():
    need("lateral_up2_fuse", "triton", DEVICE)

    def run(w):
        w = w.to(DEVICE)
        out = torch.empty_like(w)
        _round_kernel[(triton.cdiv(w.numel(), 1024),)](w, out, w.numel(), BLOCK=1024)
        return out.cpu()
    return run


def rne_tf32_reference(w):
    """Nearest tf32 (11 significant bits, fp32's exponent range), ties to even, in float64:
    the significand scaled to [1024, 2048) and np.round'ed (half to even); subnormals on the
    fixed 2^-136 grid; past fp32's range -> keep w (as the helper documents)."""
    with np.errstate(invalid="ignore"):
        x = w.astype(np.float64)
    out = x.copy()
    fin = np.isfinite(x) & (x != 0)
    m, e = np.frexp(x[fin])                      # x = m * 2^e, 0.5 <= |m| < 1
    e = np.maximum(e, -125)                      # subnormals: quantum 2^(-125 - 11) = 2^-136
    r = np.ldexp(np.round(np.ldexp(x[fin], 11 - e)), e - 11)
    out[fin] = np.where(np.abs(r) >= 2.0 ** 128, x[fin], r)
    return out.astype(np.float32)


def bits(*u32):
    return np.array(u32, dtype=np.uint32).view(np.float32)


def test_tf32_round_is_round_to_nearest_even(rounded):
    rng = np.random.default_rng(0)
    random = rng.standard_normal(20000).astype(np.float32) * \
        np.exp2(rng.integers(-140, 127, 20000)).astype(np.float32)
    base = rng.integers(0, 2 ** 31, 4000, dtype=np.uint32) & ~np.uint32(0x1FFF)
    ties = np.concatenate([base | 0x1000, base | 0x3000])  # halfway, kept bit 0 and 1
    near = np.concatenate([base | 0x0FFF, base | 0x1001, base | 0x1FFF])
    special = bits(0x3F7FFFFF, 0x3FFFF000, 0x007FFFFF, 0x00001000, 0x00003000, 0x00000001,
                   0x7F7FEFFF, 0x7F7FF000, 0x7F7FFFFF, 0x80000000, 0x7F800000, 0xFF800000,
                   0x7FC00000, 0xBF801000, 0xBF803000)
    w = np.concatenate([random, ties.view(np.float32), near.view(np.float32), special,
                        -ties.view(np.float32)])
    hi = rounded(torch.from_numpy(w)).numpy()
    want = rne_tf32_reference(w)
    nan = np.isnan(w)
    assert np.isnan(hi[nan]).all()
    assert np.array_equal(hi[~nan].view(np.uint32), want[~nan].view(np.uint32)), \
        w[~nan][hi[~nan].view(np.uint32) != want[~nan].view(np.uint32)][:5]
    # a tf32 value (13 zero low bits) below the first value that rounds past fp32's range
    # (2^128 - 2^115; kept as is from there)
    rounds = np.isfinite(w) & (np.abs(w) < bits(0x7F7FF000)[0])
    assert not (hi[rounds].view(np.uint32) & 0x1FFF).any()
    assert np.array_equal(hi[np.isfinite(w) & ~rounds], w[np.isfinite(w) & ~rounds])
    assert np.array_equal(hi[np.isinf(w)], w[np.isinf(w)])
    # a known tie each way: 1 + 2^-11 rounds down to 1 (even), 1 + 3*2^-11 up to 1 + 2^-9
    one_tie, up_tie = bits(0x3F801000, 0x3F803000)
    h = rounded(torch.from_numpy(np.array([one_tie, up_tie])))
    assert h[0].item() == 1.0 and h[1].item() == 1.0 + 2 ** -9
