"""Triton device helpers shared by the fused operators (the Triton twin of csrc/litefpn_math.h).

Small `@triton.jit` functions, inlined into the kernels: the bilinear 2x taps
(align_corners=False) in both directions, the softplus-normalised fusion weights and the
per-channel fusion coefficients. Host-side helpers for launching (device guard, int64 decision,
eps split) live here too.
"""
import contextlib
import os

import numpy as np
import torch
import triton
import triton.language as tl

#: Environment switch of the launch plan for CPU tensors (TRITON_INTERPRET=1): "interpreter"
#: (default: few large tiles, the interpreter's per-program cost is high) or "gpu" (the tiles,
#: programs and partial-sum blocking a GPU launch would use, to test those plans on CPU).
PLAN_ENV = "LITEFPN_TRITON_PLAN"


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def softplus(x):
    """F.softplus with its defaults (beta=1, threshold=20): x above 20 passes through.

    log1p(e) is computed as log(u) * e / (u - 1) with u = 1 + e (exact to a few ulp also where
    e << 1, unlike log(1 + e)); for u == 1 it is e itself. exp's argument is capped at 20 so the
    discarded branch never overflows.
    """
    e = tl.exp(tl.minimum(x, 20.0))
    u = 1.0 + e
    d = u - 1.0
    lp = tl.where(d == 0.0, e, tl.log(u) * (e / tl.where(d == 0.0, 1.0, d)))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def fusion_weights(wc_ptr, wf_ptr, eps_hi, eps_lo, ACC: tl.constexpr):
    """(alpha, beta) = sp(w_c) / D, sp(w_f) / D with D = sp(w_c) + sp(w_f) + eps, in ACC.

    The weights are [1] tensors read in-kernel (no host sync); eps arrives as two fp32 halves
    (eps_hi + eps_lo) so an fp64 accumulation sees it to ~1e-15.
    """
    sp_c = softplus(tl.load(wc_ptr).to(ACC))
    sp_f = softplus(tl.load(wf_ptr).to(ACC))
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    denom = sp_c + sp_f + eps
    return sp_c / denom, sp_f / denom


@triton.jit
def fusion_coef(w_ptr, gate_ptr, gate_off, gate_mask, weight, HAS_W: tl.constexpr,
                HAS_GATE: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Per-channel coefficient weight * gate[gate_off] as a [BLOCK] vector in ACC.

    `weight` is alpha or beta (ignored without HAS_W: then 1); without HAS_GATE the gate is 1.
    """
    coef = tl.full([BLOCK], 1.0, ACC)
    if HAS_GATE:
        coef = tl.load(gate_ptr + gate_off, mask=gate_mask, other=0.0).to(ACC)
    if HAS_W:
        coef = coef * weight
    return coef


@triton.jit
def fusion_coefs(wc_ptr, wf_ptr, gc_ptr, gf_ptr, eps_hi, eps_lo, n, C, c, c_mask,
                 HAS_W: tl.constexpr, HAS_GC: tl.constexpr, HAS_GF: tl.constexpr,
                 BLOCK: tl.constexpr, ACC: tl.constexpr):
    """(alpha*gc[n, c], beta*gf[n, c]) as [BLOCK] vectors in ACC; an absent factor is 1.

    The gate index n*C + c is formed here, after the weights, as the kernels always did: taking
    it as an argument reorders the IR and moved registers in the static table by -16 to +1."""
    alpha = 1.0
    beta = 1.0
    if HAS_W:
        alpha, beta = fusion_weights(wc_ptr, wf_ptr, eps_hi, eps_lo, ACC)
    coef_c = fusion_coef(wc_ptr, gc_ptr, n * C + c, c_mask, alpha, HAS_W, HAS_GC, BLOCK, ACC)
    coef_f = fusion_coef(wf_ptr, gf_ptr, n * C + c, c_mask, beta, HAS_W, HAS_GF, BLOCK, ACC)
    return coef_c, coef_f


@triton.jit
def up2_taps(o, n):
    """Forward taps along one axis, as csrc/litefpn_math.h (eager's exactly): fine index o reads
    coarse i0 = max((o-1) >> 1, 0) and i1 = min(i0+1, n-1) with weights w0 + w1 = 1:
    (1, 0) at o = 0 (eager reads x[1] with weight 0: a NaN there reaches out[0]), (.25, .75) at
    even o >= 2, (.75, .25) at odd o. (o-1) >> 1 is an arithmetic shift: -1 for o = 0.
    """
    i0 = tl.maximum((o - 1) >> 1, 0)
    i1 = tl.minimum(i0 + 1, n - 1)
    w1 = tl.where(o == 0, 0.0, tl.where((o & 1) == 1, 0.25, 0.75))
    return i0, i1, 1.0 - w1, w1


@triton.jit
def up2_gather_taps(i, n):
    """Backward (gather) taps along one axis: coarse index i collects fine indices
    clamp(2i-1), 2i, 2i+1, clamp(2i+2) (clamped to [0, 2n-1]) with weights 1/4, 3/4, 3/4, 1/4.
    Clamping reproduces the borders, where one coarse pixel carries the full weight 1."""
    f0 = tl.maximum(2 * i - 1, 0)
    f3 = tl.minimum(2 * i + 2, 2 * n - 1)
    return f0, 2 * i, 2 * i + 1, f3


@triton.jit
def gather4(ptr, o0, o1, o2, o3, mask, ACC: tl.constexpr):
    """.25*p[o0] + .75*p[o1] + .75*p[o2] + .25*p[o3] in ACC: one axis of Up2^T."""
    v0 = tl.load(ptr + o0, mask=mask, other=0.0).to(ACC)
    v1 = tl.load(ptr + o1, mask=mask, other=0.0).to(ACC)
    v2 = tl.load(ptr + o2, mask=mask, other=0.0).to(ACC)
    v3 = tl.load(ptr + o3, mask=mask, other=0.0).to(ACC)
    return 0.25 * (v0 + v3) + 0.75 * (v1 + v2)


@triton.jit
def tf32_round(w):
    """fp32 w rounded to the nearest tf32 value (10 mantissa bits; ties to even), as fp32.

    Why: a tf32 MMA reads only the top 10 mantissa bits of an fp32 operand - truncation toward
    zero, a systematic shrink of up to 2^-10 (~4e-4 on average in the lateral outputs, F7 of
    the GPU audit) - and Triton emits no cvt.rna for fp32 operands of a "tf32" dot. Rounded
    first, the MMA sees an exact tf32 value: the error is at most 2^-11 relative and unbiased.
    Rounding: add 0xFFF plus the lowest kept bit, clear the 13 low bits (a mantissa carry moves
    into the exponent, as it should). NaN, +-Inf and values that would round past fp32's range
    stay as they are.
    """
    bits = w.to(tl.uint32, bitcast=True)
    r = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
    special = (r & 0x7F800000) == 0x7F800000
    return tl.where(special, w, r.to(tl.float32, bitcast=True))


# ----------------------------------------------------------------------------- host helpers
def acc_tl_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def streaming_warps(tile_elems, dtype, cap=16):
    """num_warps of a streaming kernel: each thread holds one 16-byte vector of every
    [tile_elems] tile (8 warps for a 2048-element bf16 tile, 16 for fp32), at most `cap`.

    Why: at 4 warps the up2 kernels held 16 values a thread per tile and 160-240 registers
    (12-19% occupancy on sm_80/sm_90, GPU audit F4), and 64-bit tiles spilled (F6); one vector a
    thread keeps the 16-byte accesses and brings them to 25-50% without spills (measured by
    tests/compile/test_triton_resources.py). A 32-warp CTA spilled in the fp64 forward: cap 16.
    """
    size = torch.finfo(dtype).bits // 8
    return max(4, min(cap, tile_elems * size // (32 * 16)))


def split_eps(eps):
    """eps as two fp32 values whose (fp64) sum is eps to ~1e-15 relative.

    An eps past fp32's range (inf included) is (+-inf, 0): the weights sp/(sp+sp+eps) are then
    0 as in eager (hi + lo would be inf - inf = NaN otherwise); NaN stays NaN.
    """
    with np.errstate(over="ignore"):
        hi = np.float32(eps)
    if not np.isfinite(hi):
        return float(hi), 0.0
    return float(hi), float(np.float32(eps - float(hi)))


def needs_int64(*tensors, limit=2 ** 30):
    """True when an element offset (or a masked lane's, one block past the end) may reach 2^31.

    The bound has a 2x margin for masked lanes; tensors of up to 2^30 elements use int32 math.
    """
    for t in tensors:
        if t is None:
            continue
        span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)
        if max(span, t.numel()) >= limit:
            return True
    return False


def interpreter_plan(t, interpret=None):
    """True when the planners should use the interpreter's tiling for a launch on `t`.

    `interpret` (True/False) decides when given; CUDA tensors always get the GPU plan; CPU
    tensors (the interpreter) get the interpreter plan unless LITEFPN_TRITON_PLAN=gpu.
    """
    if interpret is not None:
        return bool(interpret)
    if t.is_cuda:
        return False
    plan = os.environ.get(PLAN_ENV, "interpreter")
    if plan not in ("interpreter", "gpu"):
        raise RuntimeError(f"{PLAN_ENV} must be 'interpreter' or 'gpu', got {plan!r}")
    return plan == "interpreter"


def device_guard(t):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def next_pow2(x):
    return triton.next_power_of_2(max(1, int(x)))
