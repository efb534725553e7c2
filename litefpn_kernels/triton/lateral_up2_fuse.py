"""Triton kernels of one `lateral_up2_fuse` level: the four kernels of the `_lateral_*` contracts
in csrc/ops.cpp (`gram`, `fwd`, `grad_z`, `bwd_coarse`); litefpn_kernels.ops composes them,
BatchNorm statistics and the chain rule included. Weights, biases, centres, gates and fusion
weights arrive contiguous and in the accumulation dtype (fp32; fp64 for fp64 inputs).

Design. The three GEMM-shaped kernels are small-K channel mixes over pixels, done with `tl.dot`
on fp32 (fp64) operands: activations are loaded in their own dtype and upcast in registers (the
interpreter's bf16 `tl.dot` and arithmetic are unreliable; bf16/fp16 values are exact in tf32).
Precision of the dots (host-picked constexpr): fp64 "ieee", fp32 "tf32x3" (~fp32 accuracy on
tensor cores), bf16/fp16 "tf32" for the channel mixes (their output rounding dominates) and
"tf32x3" for the gram (it feeds the BatchNorm statistics, where errors do not average out). At
"tf32" only the activation operand is exact in tf32; the fp32 weight operand (W', scale*W, quad)
is rounded to the nearest tf32 value first (`_dot_w`), since the MMA would truncate it.

* gram: a program owns a [BLOCK_I x BLOCK_J] tile of gram[n] over one chunk of CHUNK pixels;
  it walks the chunk in BLOCK_K-pixel slices: A slice [BLOCK_I, BLOCK_K] and B slice
  [BLOCK_K, BLOCK_J] are centred in registers (masked lanes forced to 0) and accumulated with
  tl.dot; the programs of the first column of tiles also accumulate colsum. gram(z, z) (the
  moments) is symmetric: the programs below the diagonal return at once, those above also store
  their tile's transpose, and the diagonal's accumulate colsum. With more than one
  chunk per sample, each writes its partial to [chunks, N, Ca, Cb] / [chunks, N, Ca] and
  `_sum_partials_kernel` (shared with up2_fuse) adds the chunks in order: no atomics, bitwise
  deterministic; the chunking is a function of the shapes only.
* fwd: a program owns [BLOCK_P fine pixels x BLOCK_C output channels] of sample n:
  acc = z[BLOCK_P, Cin] @ weight^T[Cin, BLOCK_C] in BLOCK_K slices, then the up2_fuse epilogue
  in registers: + bias, the per-pixel bilinear taps of Up2(coarse) (`up2_taps` along y and x, four
  coarse reads, L1/L2 hits), alpha/beta/gates, one store. y and Up2(coarse) never reach memory.
* grad_z: a program owns [BLOCK_P pixels x BLOCK_K input channels]: acc = g @ (scale*weight)
  over C in BLOCK_C slices, minus z @ quad^T over Cin in BLOCK_J slices, plus shift; one store.
* bwd_coarse: up2_fuse's backward kernel with WITH_FINE=False (up2_fuse.bwd_coarse, re-exported).

Pixels are flattened (p = y*W + x per sample). When every tensor of a launch has the standard
"flat" pixel strides (s_h == W*s_w: NCHW and channels_last both) a pixel's offset is p*s_w and
Triton sees the unit stride of NCHW; any other strides take y, x = divmod(p, W). Strides are
kernel arguments (a unit stride is specialised by the JIT, so loads vectorise along channels
for channels_last and along pixels for NCHW). Offsets are int64 when `needs_int64` says so.
"""
import torch
import triton
import triton.language as tl

from ._common import (acc_tl_dtype, device_guard, fusion_coefs, interpreter_plan, needs_int64,
                      next_pow2, split_eps, tf32_round, up2_taps)
from .up2_fuse import bwd_coarse, plan_sum_partials

__all__ = ["gram", "fwd", "grad_z", "bwd_coarse"]


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _pix_off(p, W, s_h, s_w, FLAT: tl.constexpr):
    """Offset of flattened pixel p (= y*W + x) of a plane with strides (s_h, s_w)."""
    if FLAT:
        off = p * s_w
    else:
        off = (p // W) * s_h + (p % W) * s_w
    return off


@triton.jit
def _dot_w(a, w, acc, DOT_PREC: tl.constexpr, ACC: tl.constexpr):
    """acc + a @ w for an activation tile `a` and an fp32 (fp64) weight tile `w`. At "tf32"
    (bf16 / fp16 activations, exact in tf32) w is rounded to tf32 first (`tf32_round`): the MMA
    would otherwise truncate its low 13 bits, a systematic bias. (A hi + lo split in two dots,
    ~fp32-exact, was measured too: grad_z bf16 went from 58 to 142 registers on sm_90; the
    unbiased 2^-11 rounding is far below the bf16 / fp16 output rounding.)"""
    if DOT_PREC == "tf32":
        w = tf32_round(w)
    return tl.dot(a, w, acc, input_precision=DOT_PREC, out_dtype=ACC)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _gram_kernel(a_ptr, b_ptr, ac_ptr, bc_ptr, gram_ptr, colsum_ptr,
                 N, CA, CB, W, P, CHUNK, N_CHUNKS,
                 s_an, s_ac, s_ah, s_aw,
                 s_bn, s_bc, s_bh, s_bw,
                 HAS_AC: tl.constexpr, HAS_BC: tl.constexpr, FLAT: tl.constexpr, SYM: tl.constexpr,
                 ACC: tl.constexpr, DOT_PREC: tl.constexpr, I64: tl.constexpr,
                 BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    # program -> (sample n, pixel chunk), (tile ib, jb) of gram[n]
    pid = tl.program_id(0)
    chunk = pid % N_CHUNKS
    n = pid // N_CHUNKS
    n_jb = tl.cdiv(CB, BLOCK_J)
    ib = tl.program_id(1) // n_jb
    jb = tl.program_id(1) % n_jb
    if SYM:  # gram(z, z): the tiles below the diagonal are the mirror of those above
        if jb < ib:
            return
    i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    j = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    i_mask = i < CA
    j_mask = j < CB
    a_cen = tl.zeros([BLOCK_I], ACC)
    if HAS_AC:
        a_cen = tl.load(ac_ptr + i, mask=i_mask, other=0.0).to(ACC)
    b_cen = tl.zeros([BLOCK_J], ACC)
    if HAS_BC:
        b_cen = tl.load(bc_ptr + j, mask=j_mask, other=0.0).to(ACC)
    p_lo = chunk * CHUNK
    p_hi = tl.minimum(p_lo + CHUNK, P)
    if I64:
        n = n.to(tl.int64)
        i = i.to(tl.int64)
        j = j.to(tl.int64)
    a_base = a_ptr + n * s_an
    b_base = b_ptr + n * s_bn
    a_ch = i[:, None] * s_ac
    b_ch = j[None, :] * s_bc
    acc = tl.zeros([BLOCK_I, BLOCK_J], ACC)
    csum = tl.zeros([BLOCK_I, BLOCK_K], ACC)
    for k0 in range(0, CHUNK, BLOCK_K):  # scalar bounds (the interpreter wants no tensors)
        p = p_lo + k0 + tl.arange(0, BLOCK_K)
        p_mask = p < p_hi
        if I64:
            p = p.to(tl.int64)
        ma = i_mask[:, None] & p_mask[None, :]
        av = tl.load(a_base + a_ch + _pix_off(p, W, s_ah, s_aw, FLAT)[None, :], mask=ma,
                     other=0.0).to(ACC)
        av = tl.where(ma, av - a_cen[:, None], 0.0)
        mb = p_mask[:, None] & j_mask[None, :]
        bv = tl.load(b_base + _pix_off(p, W, s_bh, s_bw, FLAT)[:, None] + b_ch, mask=mb,
                     other=0.0).to(ACC)
        bv = tl.where(mb, bv - b_cen[None, :], 0.0)
        acc = tl.dot(av, bv, acc, input_precision=DOT_PREC, out_dtype=ACC)
        csum += av
    # this program's (partial) result: slot `chunk` of [N_CHUNKS, N, CA, CB] / [N_CHUNKS, N, CA]
    # (with one chunk these are the outputs themselves)
    slot = chunk * N + n
    if I64:
        slot = slot.to(tl.int64)
    g_off = (slot * CA + i[:, None]) * CB + j[None, :]
    tl.store(gram_ptr + g_off, acc, mask=i_mask[:, None] & j_mask[None, :])
    if SYM:  # the mirror tile, and colsum from the diagonal's programs (column 0 is skipped)
        if jb > ib:
            tl.store(gram_ptr + (slot * CA + j[None, :]) * CB + i[:, None], acc,
                     mask=i_mask[:, None] & j_mask[None, :])
        tl.store(colsum_ptr + slot * CA + i, tl.sum(csum, axis=1), mask=i_mask & (jb == ib))
    else:
        tl.store(colsum_ptr + slot * CA + i, tl.sum(csum, axis=1), mask=i_mask & (jb == 0))


@triton.jit
def _lateral_fwd_kernel(
        coarse_ptr, z_ptr, w_ptr, bias_ptr, out_ptr, wc_ptr, wf_ptr, gc_ptr, gf_ptr,
        eps_hi, eps_lo,
        C, CIN, H, W,
        s_cn, s_cc, s_ch, s_cw,
        s_zn, s_zc, s_zh, s_zw,
        s_on, s_oc, s_oh, s_ow,
        HAS_W: tl.constexpr, HAS_GC: tl.constexpr, HAS_GF: tl.constexpr, FLAT: tl.constexpr,
        ACC: tl.constexpr, DOT_PREC: tl.constexpr, I64: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    # coarse [N, C, H, W]; z [N, CIN, 2H, 2W]; out [N, C, 2H, 2W]; weight [C, CIN] contiguous
    W2 = 2 * W
    P = 4 * H * W
    pid = tl.program_id(0)
    n_pb = tl.cdiv(P, BLOCK_P)
    pb = pid % n_pb
    n = pid // n_pb
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < P
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mask = p_mask[:, None] & c_mask[None, :]

    coef_c, coef_f = fusion_coefs(wc_ptr, wf_ptr, gc_ptr, gf_ptr, eps_hi, eps_lo, n, C, c, c_mask,
                                  HAS_W, HAS_GC, HAS_GF, BLOCK_C, ACC)
    bias = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(ACC)

    # y = z[n, :, p]^T @ weight^T, in BLOCK_K slices of the input channels
    fy = p // W2
    fx = p % W2
    if I64:
        n = n.to(tl.int64)
        p = p.to(tl.int64)
        c = c.to(tl.int64)
        fy = fy.to(tl.int64)
        fx = fx.to(tl.int64)
    if FLAT:
        z_pix = p * s_zw
        o_pix = p * s_ow
    else:
        z_pix = fy * s_zh + fx * s_zw
        o_pix = fy * s_oh + fx * s_ow
    z_base = z_ptr + n * s_zn + z_pix[:, None]
    acc = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    for k0 in range(0, CIN, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < CIN
        if I64:
            k = k.to(tl.int64)
        zv = tl.load(z_base + k[None, :] * s_zc, mask=p_mask[:, None] & k_mask[None, :],
                     other=0.0).to(ACC)
        wv = tl.load(w_ptr + c[None, :] * CIN + k[:, None], mask=k_mask[:, None] & c_mask[None, :],
                     other=0.0).to(ACC)
        acc = _dot_w(zv, wv, acc, DOT_PREC, ACC)

    # epilogue: Up2(coarse) at the fine pixels (up2_fuse's taps: x first, then y)
    y0, y1, wy0, wy1 = up2_taps(fy, H)
    x0, x1, wx0, wx1 = up2_taps(fx, W)
    c_base = coarse_ptr + n * s_cn + c[None, :] * s_cc
    r0 = c_base + (y0 * s_ch)[:, None]
    r1 = c_base + (y1 * s_ch)[:, None]
    cx0 = (x0 * s_cw)[:, None]
    cx1 = (x1 * s_cw)[:, None]
    wx0 = wx0[:, None]
    wx1 = wx1[:, None]
    u0 = (wx0 * tl.load(r0 + cx0, mask=mask, other=0.0).to(ACC)
          + wx1 * tl.load(r0 + cx1, mask=mask, other=0.0).to(ACC))
    u1 = (wx0 * tl.load(r1 + cx0, mask=mask, other=0.0).to(ACC)
          + wx1 * tl.load(r1 + cx1, mask=mask, other=0.0).to(ACC))
    up = wy0[:, None] * u0 + wy1[:, None] * u1
    res = coef_c[None, :] * up + coef_f[None, :] * (acc + bias[None, :])
    o_off = n * s_on + o_pix[:, None] + c[None, :] * s_oc
    tl.store(out_ptr + o_off, res.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lateral_grad_z_kernel(
        g_ptr, z_ptr, w_ptr, scale_ptr, quad_ptr, shift_ptr, out_ptr,
        C, CIN, W, P,
        s_gn, s_gc, s_gh, s_gw,
        s_zn, s_zc, s_zh, s_zw,
        s_on, s_oc, s_oh, s_ow,
        HAS_SCALE: tl.constexpr, HAS_QUAD: tl.constexpr, HAS_SHIFT: tl.constexpr,
        FLAT: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr, I64: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_J: tl.constexpr):
    # grad_out [N, C, H, W] (W: its width), z / out [N, CIN, H, W]; weight [C, CIN], quad
    # [CIN, CIN], scale [N, C], shift [CIN] contiguous. Output channels k, reductions c and j.
    pid = tl.program_id(0)
    n_pb = tl.cdiv(P, BLOCK_P)
    pb = pid % n_pb
    n = pid // n_pb
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < P
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k < CIN
    s_row = n * C
    if I64:
        n = n.to(tl.int64)
        p = p.to(tl.int64)
        k = k.to(tl.int64)
    g_base = g_ptr + n * s_gn + _pix_off(p, W, s_gh, s_gw, FLAT)[:, None]
    acc = tl.zeros([BLOCK_P, BLOCK_K], ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        wv = tl.load(w_ptr + c[:, None] * CIN + k[None, :],
                     mask=c_mask[:, None] & k_mask[None, :], other=0.0).to(ACC)
        if HAS_SCALE:
            wv = wv * tl.load(scale_ptr + s_row + c, mask=c_mask, other=0.0).to(ACC)[:, None]
        if I64:
            c = c.to(tl.int64)
        gv = tl.load(g_base + c[None, :] * s_gc, mask=p_mask[:, None] & c_mask[None, :],
                     other=0.0).to(ACC)
        acc = _dot_w(gv, wv, acc, DOT_PREC, ACC)
    z_base = z_ptr + n * s_zn + _pix_off(p, W, s_zh, s_zw, FLAT)[:, None]
    if HAS_QUAD:
        # acc -= z[p, :] @ quad^T: accumulated as a dot with -quad (negation is exact)
        for j0 in range(0, CIN, BLOCK_J):
            jj = j0 + tl.arange(0, BLOCK_J)
            j_mask = jj < CIN
            if I64:
                jj = jj.to(tl.int64)
            qv = tl.load(quad_ptr + k[None, :] * CIN + jj[:, None],
                         mask=j_mask[:, None] & k_mask[None, :], other=0.0).to(ACC)
            zv = tl.load(z_base + jj[None, :] * s_zc, mask=p_mask[:, None] & j_mask[None, :],
                         other=0.0).to(ACC)
            acc = _dot_w(zv, -qv, acc, DOT_PREC, ACC)
    if HAS_SHIFT:
        acc += tl.load(shift_ptr + k, mask=k_mask, other=0.0).to(ACC)[None, :]
    o_off = n * s_on + _pix_off(p, W, s_oh, s_ow, FLAT)[:, None] + k[None, :] * s_oc
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty),
             mask=p_mask[:, None] & k_mask[None, :])


# ----------------------------------------------------------------------------- launch planning
#: GPU tiles. Channel tiles are at least 16 (tl.dot's minimum K; M and N are padded anyway).
_GEMM_BLOCK_P = 32
_GEMM_MAX_C = 128      # output channels per program (the whole C = 128 of the neck: z read once)
_GEMM_MAX_K = 32       # reduction slice
_GRAM_MAX_IJ = 64      # gram tile
_GRAM_BLOCK_K = 32     # gram pixel slice
_GRAM_MIN_CHUNK = 512  # pixels per gram partial, at least
_GRAM_TARGET_PROGRAMS = 1024
#: interpreter: big tiles, few programs (its cost is per operation, not per element).
_INTERP_TILE_ELEMS = 1 << 16
_INTERP_GRAM_ELEMS = 1 << 18


def _interpret(t, interpret):
    return interpreter_plan(t, interpret)


def _flat(*tensors):
    """True when every [N, C, H, W] tensor has flat pixel strides: s_h == W*s_w (or H <= 1)."""
    return all(t.shape[2] <= 1 or t.stride(2) == t.shape[3] * t.stride(3) for t in tensors)


def _dot_precision(dtype, exact):
    """input_precision of tl.dot for fp32 operands from `dtype` activations (see module doc)."""
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32 or exact:
        return "tf32x3"
    return "tf32"


def _ch_block(c, cap):
    return max(16, min(next_pow2(c), cap))


def _warps(tile_elems):
    """8 warps for tiles of 4096+ fp32 accumulators (keeps them under ~160 registers a thread
    on sm_90 with the up2 epilogue or tf32x3 splits, no spills), else 4."""
    return 8 if tile_elems >= 4096 else 4


#: fwd: 16 warps for 4096+ accumulators from fp32 / fp64 activations (their tf32x3 split
#: operands / DMMA tiles): 163 registers x 8 warps (12.5% occupancy) -> 105 x 16 (25%), sm_90.
_WIDE = (torch.float32, torch.float64)


def _empty_format(t, shape):
    """torch.empty_like(t) adjusted to `shape`: channels_last when t is (and not contiguous)."""
    cl = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.empty(shape, dtype=t.dtype, device=t.device,
                       memory_format=torch.channels_last if cl else torch.contiguous_format)


def gram_tiling(a, b, interpret=None):
    """(BLOCK_I, BLOCK_J, BLOCK_K, CHUNK, N_CHUNKS) from the shapes only (deterministic)."""
    n, ca, h, w = a.shape
    cb = b.shape[1]
    p = h * w
    if _interpret(a, interpret):
        bi, bj = next_pow2(ca), next_pow2(cb)
        bk = max(1, min(next_pow2(p), _INTERP_GRAM_ELEMS // max(bi, bj)))
        return bi, bj, bk, max(p, 1), 1
    bi, bj, bk = _ch_block(ca, _GRAM_MAX_IJ), _ch_block(cb, _GRAM_MAX_IJ), _GRAM_BLOCK_K
    tiles = n * triton.cdiv(ca, bi) * triton.cdiv(cb, bj)
    chunks = max(1, min(triton.cdiv(_GRAM_TARGET_PROGRAMS, max(tiles, 1)),
                        triton.cdiv(p, _GRAM_MIN_CHUNK)))
    chunk = triton.cdiv(triton.cdiv(max(p, 1), chunks), bk) * bk
    return bi, bj, bk, chunk, triton.cdiv(max(p, 1), chunk)


def plan_gram(a, b, a_center, b_center, gram_out, colsum_out, interpret=None):
    """(kernel, grid, args, kwargs) of the gram's first stage. gram_out / colsum_out are the
    outputs ([N, Ca, Cb] / [N, Ca]) with one chunk, else the [chunks, N, Ca, Cb] /
    [chunks, N, Ca] partial buffers (`gram_tiling` gives the chunk count)."""
    n, ca, h, w = a.shape
    cb = b.shape[1]
    bi, bj, bk, chunk, chunks = gram_tiling(a, b, interpret)
    grid = (n * chunks, triton.cdiv(ca, bi) * triton.cdiv(cb, bj))
    args = (a, b, a if a_center is None else a_center, b if b_center is None else b_center,
            gram_out, colsum_out, n, ca, cb, w, h * w, chunk, chunks,
            *a.stride(), *b.stride())
    # gram(z, z) about one centre is symmetric: half the tiles, mirrored (BLOCK_I == BLOCK_J;
    # with a single tile there is nothing to mirror, and the plain kernel is leaner)
    sym = a is b and a_center is b_center and bi == bj and ca > bi
    kwargs = dict(HAS_AC=a_center is not None, HAS_BC=b_center is not None, FLAT=_flat(a, b),
                  SYM=sym, ACC=acc_tl_dtype(a.dtype), DOT_PREC=_dot_precision(a.dtype, exact=True),
                  I64=needs_int64(a, b, gram_out, colsum_out), BLOCK_I=bi, BLOCK_J=bj,
                  BLOCK_K=bk, num_warps=_warps(bi * bj))
    return _gram_kernel, grid, args, kwargs


def _mix_tiling(p, c_out, c_red, interp):
    """(BLOCK_P, output-channel block, reduction slice) of a channel mix over p pixels (fwd and
    grad_z): the interpreter takes both channel counts whole and pixels up to its tile budget."""
    if interp:
        bo, br = next_pow2(c_out), next_pow2(c_red)
        return max(1, min(next_pow2(p), _INTERP_TILE_ELEMS // max(bo, br))), bo, br
    return _GEMM_BLOCK_P, _ch_block(c_out, _GEMM_MAX_C), _ch_block(c_red, _GEMM_MAX_K)


def fwd_tiling(coarse, z, interpret=None):
    """(BLOCK_P, BLOCK_C, BLOCK_K) from the shapes only: C outputs, a reduction over Cin."""
    return _mix_tiling(z.shape[2] * z.shape[3], coarse.shape[1], z.shape[1],
                       _interpret(z, interpret))


def plan_fwd(coarse, z, weight, bias, w_coarse, w_fine, gate_coarse, gate_fine, eps, out,
             interpret=None):
    n, c, h, w = coarse.shape
    c_in = z.shape[1]
    bp, bc, bk = fwd_tiling(coarse, z, interpret)
    grid = (n * triton.cdiv(4 * h * w, bp), triton.cdiv(c, bc))
    dummy = bias
    eps_hi, eps_lo = split_eps(eps)
    args = (coarse, z, weight, bias, out,
            dummy if w_coarse is None else w_coarse, dummy if w_fine is None else w_fine,
            dummy if gate_coarse is None else gate_coarse,
            dummy if gate_fine is None else gate_fine, eps_hi, eps_lo,
            c, c_in, h, w, *coarse.stride(), *z.stride(), *out.stride())
    kwargs = dict(HAS_W=w_coarse is not None, HAS_GC=gate_coarse is not None,
                  HAS_GF=gate_fine is not None, FLAT=_flat(z, out), ACC=acc_tl_dtype(z.dtype),
                  DOT_PREC=_dot_precision(z.dtype, exact=False),
                  I64=needs_int64(coarse, z, out, weight), BLOCK_P=bp, BLOCK_C=bc, BLOCK_K=bk,
                  num_warps=_warps(bp * bc) * (2 if z.dtype in _WIDE and bp * bc >= 4096 else 1))
    return _lateral_fwd_kernel, grid, args, kwargs


def grad_z_tiling(grad_out, z, interpret=None):
    """(BLOCK_P, BLOCK_K (output channels), BLOCK_C, BLOCK_J (reductions)) from the shapes:
    Cin outputs, reductions over C (g @ weight) and over Cin (z @ quad^T, fwd's Cin slice)."""
    c, c_in = grad_out.shape[1], z.shape[1]
    p, interp = z.shape[2] * z.shape[3], _interpret(z, interpret)
    return (*_mix_tiling(p, c_in, c, interp), _mix_tiling(p, c, c_in, interp)[2])


def plan_grad_z(grad_out, z, weight, scale, quad, shift, out, interpret=None):
    n, c, h, w = grad_out.shape
    c_in = z.shape[1]
    bp, bk, bc, bj = grad_z_tiling(grad_out, z, interpret)
    grid = (n * triton.cdiv(h * w, bp), triton.cdiv(c_in, bk))
    dummy = weight
    args = (grad_out, z, weight, dummy if scale is None else scale,
            dummy if quad is None else quad, dummy if shift is None else shift, out,
            c, c_in, w, h * w, *grad_out.stride(), *z.stride(), *out.stride())
    kwargs = dict(HAS_SCALE=scale is not None, HAS_QUAD=quad is not None,
                  HAS_SHIFT=shift is not None, FLAT=_flat(grad_out, z, out),
                  ACC=acc_tl_dtype(z.dtype), DOT_PREC=_dot_precision(z.dtype, exact=False),
                  I64=needs_int64(grad_out, z, out, scale), BLOCK_P=bp, BLOCK_K=bk,
                  BLOCK_C=bc, BLOCK_J=bj, num_warps=_warps(bp * bk))
    return _lateral_grad_z_kernel, grid, args, kwargs


# ----------------------------------------------------------------------------- entry points
def _small(t):
    """Weights, centres, gates: tiny tensors the kernels index as contiguous (a no-op when they
    already are, as litefpn_kernels.ops hands them over)."""
    return None if t is None else t.contiguous()


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def gram(a, b, a_center, b_center, *, interpret=None):
    """-> (gram [N, Ca, Cb], colsum [N, Ca]) in the accumulation dtype:
    gram[n,i,j] = sum_hw (a[n,i]-a_center[i]) (b[n,j]-b_center[j]),
    colsum[n,i] = sum_hw (a[n,i]-a_center[i]); centres None (0) or [Ca] / [Cb]."""
    n, ca, h, w = a.shape
    cb = b.shape[1]
    acc = _acc_dtype(a.dtype)
    out_g = torch.empty((n, ca, cb), dtype=acc, device=a.device)
    out_s = torch.empty((n, ca), dtype=acc, device=a.device)
    if out_g.numel() == 0 or h * w == 0:
        return out_g.zero_(), out_s.zero_()
    chunks = gram_tiling(a, b, interpret)[4]
    if chunks == 1:
        part_g, part_s = out_g, out_s
    else:
        part_g = torch.empty((chunks, n, ca, cb), dtype=acc, device=a.device)
        part_s = torch.empty((chunks, n, ca), dtype=acc, device=a.device)
    a_center, b_center = _small(a_center), _small(b_center)
    kernel, grid, args, kwargs = plan_gram(a, b, a_center, b_center, part_g, part_s, interpret)
    with device_guard(a):
        kernel[grid](*args, **kwargs)
        if chunks > 1:
            for part, out in ((part_g, out_g), (part_s, out_s)):
                kernel, grid, args, kwargs = plan_sum_partials(part.view(chunks, -1), out, None)
                kernel[grid](*args, **kwargs)
    return out_g, out_s


def fwd(coarse, z, weight, bias, w_coarse, w_fine, gate_coarse, gate_fine, eps, *,
        interpret=None):
    """out[n,c,p] = alpha*gc[n,c]*Up2(coarse)[n,c,p]
                  + beta*gf[n,c]*(sum_k weight[c,k]*z[n,k,p] + bias[c]);
    out [N, C, 2H, 2W] in z's dtype and memory format."""
    n, c = coarse.shape[:2]
    out = _empty_format(z, (n, c, z.shape[2], z.shape[3]))
    if out.numel() == 0:
        return out
    small = map(_small, (weight, bias, w_coarse, w_fine, gate_coarse, gate_fine))
    kernel, grid, args, kwargs = plan_fwd(coarse, z, *small, eps, out, interpret)
    with device_guard(z):
        kernel[grid](*args, **kwargs)
    return out


def grad_z(grad_out, z, weight, scale, quad, shift, *, interpret=None):
    """grad_z[n,k,p] = sum_c weight[c,k]*scale[n,c]*grad_out[n,c,p] - sum_j quad[k,j]*z[n,j,p]
    + shift[k]; scale / quad / shift optional (None); the result is like z."""
    out = torch.empty_like(z)
    if out.numel() == 0:
        return out
    small = map(_small, (weight, scale, quad, shift))
    kernel, grid, args, kwargs = plan_grad_z(grad_out, z, *small, out, interpret)
    with device_guard(z):
        kernel[grid](*args, **kwargs)
    return out

