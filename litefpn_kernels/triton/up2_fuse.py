"""Triton kernels of `up2_fuse`: out = alpha*gc*Up2(coarse) + beta*gf*fine, and its backward.

Same contract as the compiled `_up2_fuse_fwd` / `_up2_fuse_bwd` / `_up2_fuse_bwd_coarse`
(csrc/ops.cpp), and the same entry-point names (`fwd`, `bwd`, `bwd_coarse`); called through
`litefpn_kernels.ops` (registered in `backends/triton_kernels.py`), which hands over the fusion
weights and gates contiguous and in the accumulation dtype.

Design (one launch forward; backward one launch, plus one tiny one for the sums):

* A program owns a [BLOCK_X fine columns, BLOCK_C channels] column strip of one sample and a
  block of ROWS coarse rows (the 2*ROWS fine rows under them), and walks down the rows with a
  rolling window, so every input row is read once per program (plus a one-row halo).
  The tile orientation is picked from the layout: channels_last puts BLOCK_C (up to 128)
  channels on the contiguous axis and few pixels on the other, NCHW puts up to 128 fine
  columns on the contiguous axis and a few channel planes on the other; Triton's coalescing
  then vectorises the fine loads/stores along whichever axis has stride 1 (strides are kernel
  arguments, a unit stride is specialised by the JIT). Any other strides run the same code.
* Forward: each coarse row is upsampled along x once (two taps per fine column, clamped at the
  borders), then fine rows 2i and 2i+1 blend rows (i-1, i) and (i, i+1) of that window.
* Backward: each fine row of grad_out is read once for grad_fine (= beta*gf*g, and the
  sum_fine product with `fine`) and once more, gathered, for Up2^T along x (four taps per
  coarse column, L1 hits); coarse row i then blends fine rows clamp(2i-1), 2i, 2i+1,
  clamp(2i+2) of the window. No atomics: every output element has one writer.
* Sums (need_sums): each program reduces its tile products in registers and writes one partial
  per (n, c) to a [2, P, N*C] buffer (P = programs per sample, derived from the shapes only);
  a second kernel sums the P partials in order: bitwise deterministic run to run.
"""
import torch
import triton
import triton.language as tl

from ._common import (acc_tl_dtype, device_guard, fusion_coefs, gather4, interpreter_plan,
                      needs_int64, next_pow2, split_eps, streaming_warps, up2_gather_taps,
                      up2_taps)

__all__ = ["fwd", "bwd", "bwd_coarse"]


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _up2_fuse_fwd_kernel(
        coarse_ptr, fine_ptr, out_ptr, wc_ptr, wf_ptr, gc_ptr, gf_ptr, eps_hi, eps_lo,
        C, H, W, ROWS,
        s_cn, s_cc, s_ch, s_cw,
        s_fn, s_fc, s_fh, s_fw,
        s_on, s_oc, s_oh, s_ow,
        HAS_W: tl.constexpr, HAS_GC: tl.constexpr, HAS_GF: tl.constexpr,
        ACC: tl.constexpr, I64: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr):
    # program -> (sample n, block of ROWS coarse rows, strip of BLOCK_X fine columns, channels)
    pid = tl.program_id(0)
    n_xb = tl.cdiv(2 * W, BLOCK_X)
    n_rb = tl.cdiv(H, ROWS)
    xb = pid % n_xb
    rb = (pid // n_xb) % n_rb
    n = pid // (n_xb * n_rb)
    x = xb * BLOCK_X + tl.arange(0, BLOCK_X)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mask = (x < 2 * W)[:, None] & c_mask[None, :]

    # coefficients A = alpha*gc[n, c], B = beta*gf[n, c] (vectors over the channel block)
    coef_c, coef_f = fusion_coefs(wc_ptr, wf_ptr, gc_ptr, gf_ptr, eps_hi, eps_lo, n, C, c, c_mask,
                                  HAS_W, HAS_GC, HAS_GF, BLOCK_C, ACC)
    coef_c = coef_c[None, :]
    coef_f = coef_f[None, :]

    x0, x1, wx0, wx1 = up2_taps(x, W)
    wx0 = wx0[:, None]
    wx1 = wx1[:, None]
    if I64:
        n = n.to(tl.int64)
        x = x.to(tl.int64)
        x0 = x0.to(tl.int64)
        x1 = x1.to(tl.int64)
        c = c.to(tl.int64)
    # per-tile offsets (rows are added per step)
    c_base = coarse_ptr + n * s_cn
    c_off0 = x0[:, None] * s_cw + c[None, :] * s_cc
    c_off1 = x1[:, None] * s_cw + c[None, :] * s_cc
    f_base = fine_ptr + n * s_fn
    f_off = x[:, None] * s_fw + c[None, :] * s_fc
    o_base = out_ptr + n * s_on
    o_off = x[:, None] * s_ow + c[None, :] * s_oc

    i_lo = rb * ROWS
    i_hi = tl.minimum(i_lo + ROWS, H)
    # rolling window of x-upsampled coarse rows: u_prev = row i-1 (clamped), u_cur = row i
    r = tl.maximum(i_lo - 1, 0)
    if I64:
        r = r.to(tl.int64)
    u_prev = (wx0 * tl.load(c_base + r * s_ch + c_off0, mask=mask, other=0.0).to(ACC)
              + wx1 * tl.load(c_base + r * s_ch + c_off1, mask=mask, other=0.0).to(ACC))
    r = i_lo
    if I64:
        r = r.to(tl.int64)
    u_cur = (wx0 * tl.load(c_base + r * s_ch + c_off0, mask=mask, other=0.0).to(ACC)
             + wx1 * tl.load(c_base + r * s_ch + c_off1, mask=mask, other=0.0).to(ACC))
    for i in range(i_lo, i_hi):
        r = tl.minimum(i + 1, H - 1)
        if I64:
            r = r.to(tl.int64)
        u_next = (wx0 * tl.load(c_base + r * s_ch + c_off0, mask=mask, other=0.0).to(ACC)
                  + wx1 * tl.load(c_base + r * s_ch + c_off1, mask=mask, other=0.0).to(ACC))
        y = 2 * i
        if I64:
            y = y.to(tl.int64)
        # fine row 2i: .25*row(i-1) + .75*row(i); row 0: row(0) + 0*row(1), eager's taps
        fv = tl.load(f_base + y * s_fh + f_off, mask=mask, other=0.0).to(ACC)
        up = tl.where(i == 0, u_cur + 0.0 * u_next, 0.25 * u_prev + 0.75 * u_cur)
        res = coef_c * up + coef_f * fv
        tl.store(o_base + y * s_oh + o_off, res.to(out_ptr.dtype.element_ty), mask=mask)
        # fine row 2i+1: .75*row(i) + .25*row(i+1)
        fv = tl.load(f_base + (y + 1) * s_fh + f_off, mask=mask, other=0.0).to(ACC)
        res = coef_c * (0.75 * u_cur + 0.25 * u_next) + coef_f * fv
        tl.store(o_base + (y + 1) * s_oh + o_off, res.to(out_ptr.dtype.element_ty), mask=mask)
        u_prev = u_cur
        u_cur = u_next


@triton.jit
def _bwd_fine_row(g_row, f_row, gf_row, g_off, f_off, gf_off, mask, coef_f,
                  t_off0, t_off1, t_off2, t_off3, t_mask, owned,
                  NEED_SUMS: tl.constexpr, WITH_FINE: tl.constexpr, ACC: tl.constexpr):
    """One fine row of grad_out: grad_fine and the g*fine products if this program owns the row
    (`owned`; only WITH_FINE), and the row gathered along x onto the coarse columns (Up2^T
    along x)."""
    h = gather4(g_row, t_off0, t_off1, t_off2, t_off3, t_mask, ACC)
    prod = h  # placeholder when WITH_FINE is off (never used then)
    if WITH_FINE:
        m = mask & owned
        g = tl.load(g_row + g_off, mask=m, other=0.0).to(ACC)
        tl.store(gf_row + gf_off, (coef_f * g).to(gf_row.dtype.element_ty), mask=m)
        prod = g
        if NEED_SUMS:
            prod = g * tl.load(f_row + f_off, mask=m, other=0.0).to(ACC)
    return h, prod


@triton.jit
def _up2_fuse_bwd_kernel(
        g_ptr, coarse_ptr, fine_ptr, gcoarse_ptr, gfine_ptr, part_ptr,
        wc_ptr, wf_ptr, gc_ptr, gf_ptr, eps_hi, eps_lo,
        N, C, H, W, ROWS,
        s_gn, s_gc, s_gh, s_gw,
        s_cn, s_cc, s_ch, s_cw,
        s_fn, s_fc, s_fh, s_fw,
        s_an, s_ac, s_ah, s_aw,
        s_bn, s_bc, s_bh, s_bw,
        NEED_SUMS: tl.constexpr, WITH_FINE: tl.constexpr, HAS_W: tl.constexpr,
        HAS_GC: tl.constexpr, HAS_GF: tl.constexpr, ACC: tl.constexpr, I64: tl.constexpr,
        BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr):
    # strides: g = grad_out, c = coarse, f = fine, a = grad_coarse, b = grad_fine.
    # WITH_FINE=False is the coarse half only (lateral's `bwd_coarse`): fine, grad_fine and their
    # strides are then unused, and the partials buffer is [1, P, N*C] (sum_coarse only).
    BLOCK_J: tl.constexpr = BLOCK_X // 2
    pid = tl.program_id(0)
    n_xb = tl.cdiv(2 * W, BLOCK_X)
    n_rb = tl.cdiv(H, ROWS)
    xb = pid % n_xb
    rb = (pid // n_xb) % n_rb
    n = pid // (n_xb * n_rb)
    part_idx = pid % (n_xb * n_rb)  # this program's slot p among the P = n_xb * n_rb partials
    x = xb * BLOCK_X + tl.arange(0, BLOCK_X)  # fine columns owned (grad_fine)
    j = xb * BLOCK_J + tl.arange(0, BLOCK_J)  # coarse columns owned (grad_coarse): x // 2
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mask = (x < 2 * W)[:, None] & c_mask[None, :]
    mask_j = (j < W)[:, None] & c_mask[None, :]

    coef_c, coef_f = fusion_coefs(wc_ptr, wf_ptr, gc_ptr, gf_ptr, eps_hi, eps_lo, n, C, c, c_mask,
                                  HAS_W, HAS_GC, HAS_GF, BLOCK_C, ACC)
    coef_c = coef_c[None, :]
    coef_f = coef_f[None, :]

    t0, t1, t2, t3 = up2_gather_taps(j, W)
    if I64:
        n = n.to(tl.int64)
        x = x.to(tl.int64)
        j = j.to(tl.int64)
        t0 = t0.to(tl.int64)
        t1 = t1.to(tl.int64)
        t2 = t2.to(tl.int64)
        t3 = t3.to(tl.int64)
        c = c.to(tl.int64)
    g_base = g_ptr + n * s_gn
    g_off = x[:, None] * s_gw + c[None, :] * s_gc
    g_t0 = t0[:, None] * s_gw + c[None, :] * s_gc
    g_t1 = t1[:, None] * s_gw + c[None, :] * s_gc
    g_t2 = t2[:, None] * s_gw + c[None, :] * s_gc
    g_t3 = t3[:, None] * s_gw + c[None, :] * s_gc
    f_base = fine_ptr + n * s_fn
    f_off = x[:, None] * s_fw + c[None, :] * s_fc
    b_base = gfine_ptr + n * s_bn
    b_off = x[:, None] * s_bw + c[None, :] * s_bc
    c_base = coarse_ptr + n * s_cn
    c_off = j[:, None] * s_cw + c[None, :] * s_cc
    a_base = gcoarse_ptr + n * s_an
    a_off = j[:, None] * s_aw + c[None, :] * s_ac

    i_lo = rb * ROWS
    i_hi = tl.minimum(i_lo + ROWS, H)
    sum_f = tl.zeros([BLOCK_X, BLOCK_C], ACC)
    sum_c = tl.zeros([BLOCK_J, BLOCK_C], ACC)
    # rolling window over fine rows, gathered along x: h_m1 = row 2i-1 (clamped), h_0 = row 2i.
    # The halo row 2*i_lo - 1 belongs to the previous row block (or duplicates row 0).
    y = tl.maximum(2 * i_lo - 1, 0)
    if I64:
        y = y.to(tl.int64)
    h_m1, prod = _bwd_fine_row(g_base + y * s_gh, f_base + y * s_fh, b_base + y * s_bh,
                               g_off, f_off, b_off, mask, coef_f,
                               g_t0, g_t1, g_t2, g_t3, mask_j, False, NEED_SUMS, WITH_FINE, ACC)
    y = 2 * i_lo
    if I64:
        y = y.to(tl.int64)
    h_0, prod = _bwd_fine_row(g_base + y * s_gh, f_base + y * s_fh, b_base + y * s_bh,
                              g_off, f_off, b_off, mask, coef_f,
                              g_t0, g_t1, g_t2, g_t3, mask_j, True, NEED_SUMS, WITH_FINE, ACC)
    if NEED_SUMS and WITH_FINE:
        sum_f += prod
    for i in range(i_lo, i_hi):
        # row 2i+1: always owned; row 2i+2 (clamped): owned by the next coarse row if that is in
        # this block (at i = H-1 the clamp repeats row 2H-1, which is then not owned)
        y = 2 * i + 1
        if I64:
            y = y.to(tl.int64)
        h_p1, prod = _bwd_fine_row(g_base + y * s_gh, f_base + y * s_fh, b_base + y * s_bh,
                                   g_off, f_off, b_off, mask, coef_f,
                                   g_t0, g_t1, g_t2, g_t3, mask_j, True, NEED_SUMS, WITH_FINE, ACC)
        if NEED_SUMS and WITH_FINE:
            sum_f += prod
        y = tl.minimum(2 * i + 2, 2 * H - 1)
        if I64:
            y = y.to(tl.int64)
        h_p2, prod = _bwd_fine_row(g_base + y * s_gh, f_base + y * s_fh, b_base + y * s_bh,
                                   g_off, f_off, b_off, mask, coef_f,
                                   g_t0, g_t1, g_t2, g_t3, mask_j, i + 1 < i_hi, NEED_SUMS,
                                   WITH_FINE, ACC)
        if NEED_SUMS and WITH_FINE:
            sum_f += prod
        # coarse row i: Up2^T(g) = .25*row(2i-1) + .75*row(2i) + .75*row(2i+1) + .25*row(2i+2)
        up_t = 0.25 * (h_m1 + h_p2) + 0.75 * (h_0 + h_p1)
        ri = i
        if I64:
            ri = ri.to(tl.int64)
        tl.store(a_base + ri * s_ah + a_off, (coef_c * up_t).to(gcoarse_ptr.dtype.element_ty),
                 mask=mask_j)
        if NEED_SUMS:
            sum_c += up_t * tl.load(c_base + ri * s_ch + c_off, mask=mask_j, other=0.0).to(ACC)
        h_m1 = h_p1
        h_0 = h_p2

    if NEED_SUMS:
        # stage one of the (n, c) reductions: one partial per program (a fixed-order in-register
        # tree), stored to partials[k, part_idx, n*C + c] of the [2, P, N*C] buffer ([1, P, N*C]
        # without WITH_FINE)
        p_off = part_idx * (N * C) + n * C + c
        tl.store(part_ptr + p_off, tl.sum(sum_c, axis=0), mask=c_mask)
        if WITH_FINE:
            tl.store(part_ptr + (n_xb * n_rb) * (N * C) + p_off, tl.sum(sum_f, axis=0),
                     mask=c_mask)


@triton.jit
def _sum_partials_kernel(part_ptr, sum_c_ptr, sum_f_ptr, NC, P, HAS_F: tl.constexpr,
                         BLOCK: tl.constexpr, I64: tl.constexpr):
    """Stage two: sum_k[nc] = sum over p = 0..P-1, in order, of partials[k, p, nc], for the
    [2, P, NC] buffer (k = 0 -> sum_c, 1 -> sum_f), or with HAS_F=False the [1, P, NC] (or
    [P, NC]) buffer into sum_c only (sum_f_ptr unused). Also the gram's second stage."""
    nc = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = nc < NC
    f_off = P * NC
    if I64:
        nc = nc.to(tl.int64)
        f_off = tl.cast(P, tl.int64) * NC
    acc_c = tl.load(part_ptr + nc, mask=m, other=0.0)
    acc_f = acc_c
    if HAS_F:
        acc_f = tl.load(part_ptr + f_off + nc, mask=m, other=0.0)
    for p in range(1, P):
        off = p * NC
        if I64:
            off = tl.cast(p, tl.int64) * NC
        acc_c += tl.load(part_ptr + off + nc, mask=m, other=0.0)
        if HAS_F:
            acc_f += tl.load(part_ptr + f_off + off + nc, mask=m, other=0.0)
    tl.store(sum_c_ptr + nc, acc_c, mask=m)
    if HAS_F:
        tl.store(sum_f_ptr + nc, acc_f, mask=m)


# ----------------------------------------------------------------------------- launch planning
#: fine elements of one [BLOCK_X, BLOCK_C] tile, and programs wanted per launch (GPU).
_TILE_ELEMS = 2048
_TARGET_PROGRAMS = 8192
#: interpreter: one program per sample and channel block keeps the (per-op) overhead low.
_INTERP_TILE_ELEMS = 1 << 16


def _channels_inner(fine):
    """True when channels, not columns, are the faster axis of `fine` (channels_last)."""
    return fine.shape[1] > 1 and fine.stride(1) < fine.stride(3)  # fine has >= 2 columns


def _tiling(coarse, fine, interpret):
    """(BLOCK_X, BLOCK_C, ROWS, grid) from the shapes and the layout of `fine` only (never
    timing), so the backward's partial-sum blocking is a function of the problem: deterministic.
    The backward tiles by grad_out (its streaming input), and so must its partials buffer."""
    n, c, h, w = coarse.shape
    fx, cc = next_pow2(2 * w), next_pow2(c)
    tile = _INTERP_TILE_ELEMS if interpret else _TILE_ELEMS
    if _channels_inner(fine):
        block_c = min(cc, 128)
        block_x = max(2, min(fx, tile // block_c))
    else:
        block_x = max(2, min(fx, 128 if not interpret else tile))
        block_c = max(1, min(cc, tile // block_x))
    cols = n * triton.cdiv(2 * w, block_x) * triton.cdiv(c, block_c)
    if interpret:
        rows = h
    else:
        # enough programs to fill the GPU, and as many rows per program as that allows (the
        # one-row halo per row block is then a small overhead)
        rows = max(1, min(h, triton.cdiv(h * cols, _TARGET_PROGRAMS)))
    grid = (n * triton.cdiv(h, rows) * triton.cdiv(2 * w, block_x), triton.cdiv(c, block_c))
    return block_x, block_c, rows, grid


def _warps(interpret, dtype):
    """GPU: one 16-byte vector of each tile a thread (`streaming_warps`: 8 warps bf16, 16 fp32 /
    fp64). The interpreter ignores num_warps."""
    return 4 if interpret else streaming_warps(_TILE_ELEMS, dtype)


def _strides(t):
    return tuple(t.stride())


def plan_forward(coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, eps, out,
                 interpret=None):
    """(kernel, grid, args, kwargs) of the forward launch; also used by the compile test."""
    interpret = interpreter_plan(fine, interpret)
    n, c, h, w = coarse.shape
    block_x, block_c, rows, grid = _tiling(coarse, fine, interpret)
    dummy = out
    eps_hi, eps_lo = split_eps(eps)
    args = (coarse, fine, out,
            dummy if w_coarse is None else w_coarse, dummy if w_fine is None else w_fine,
            dummy if gate_coarse is None else gate_coarse,
            dummy if gate_fine is None else gate_fine, eps_hi, eps_lo,
            c, h, w, rows, *_strides(coarse), *_strides(fine), *_strides(out))
    kwargs = dict(HAS_W=w_coarse is not None, HAS_GC=gate_coarse is not None,
                  HAS_GF=gate_fine is not None, ACC=acc_tl_dtype(fine.dtype),
                  I64=needs_int64(coarse, fine, out), BLOCK_X=block_x, BLOCK_C=block_c,
                  num_warps=_warps(interpret, fine.dtype))
    return _up2_fuse_fwd_kernel, grid, args, kwargs


def plan_backward(grad_out, coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, eps,
                  need_sums, grad_coarse, grad_fine, partials, interpret=None):
    """(kernel, grid, args, kwargs) of the backward launch; `partials` is the [2, P, N*C]
    buffer from `partials_shape(coarse, grad_out)` (or None without need_sums).

    With fine = grad_fine = None this is the coarse half only (WITH_FINE=False: grad_coarse and
    sum_coarse; `partials` is then [1, P, N*C]), as lateral's `bwd_coarse`."""
    interpret = interpreter_plan(grad_out, interpret)
    with_fine = fine is not None
    n, c, h, w = coarse.shape
    block_x, block_c, rows, grid = _tiling(coarse, grad_out, interpret)
    if partials is not None:
        # the kernel writes partial slot pid % P of this grid: a buffer planned from another
        # tensor's layout would leave slots unwritten or be overrun
        slots = grid[0] // n if n else 0
        if tuple(partials.shape[-2:]) != (slots, n * c):
            raise RuntimeError(f"up2_fuse backward: partials buffer {tuple(partials.shape)} "
                               f"does not match the launch ({slots} slots of {n * c})")
    dummy = grad_coarse
    fine_, grad_fine_ = (fine, grad_fine) if with_fine else (grad_out, grad_out)
    eps_hi, eps_lo = split_eps(eps)
    args = (grad_out, coarse, fine_, grad_coarse, grad_fine_,
            dummy if partials is None else partials,
            dummy if w_coarse is None else w_coarse, dummy if w_fine is None else w_fine,
            dummy if gate_coarse is None else gate_coarse,
            dummy if gate_fine is None else gate_fine, eps_hi, eps_lo,
            n, c, h, w, rows, *_strides(grad_out), *_strides(coarse), *_strides(fine_),
            *_strides(grad_coarse), *_strides(grad_fine_))
    kwargs = dict(NEED_SUMS=bool(need_sums), WITH_FINE=with_fine, HAS_W=w_coarse is not None,
                  HAS_GC=gate_coarse is not None, HAS_GF=with_fine and gate_fine is not None,
                  ACC=acc_tl_dtype(grad_out.dtype),
                  I64=needs_int64(grad_out, coarse, fine, grad_coarse, grad_fine, partials),
                  BLOCK_X=block_x, BLOCK_C=block_c, num_warps=_warps(interpret, grad_out.dtype))
    return _up2_fuse_bwd_kernel, grid, args, kwargs


def partials_shape(coarse, grad_out, interpret=None, with_fine=True):
    """[2, P, N*C] ([1, P, N*C] without with_fine): P = programs per sample of the backward,
    which tiles by grad_out's shape and layout (whatever fine's layout is)."""
    interpret = interpreter_plan(grad_out, interpret)
    n, c, h, w = coarse.shape
    block_x, _, rows, _ = _tiling(coarse, grad_out, interpret)
    return (2 if with_fine else 1, triton.cdiv(h, rows) * triton.cdiv(2 * w, block_x), n * c)


_SUM_BLOCK = 1024
#: programs stage two aims for: each walks its P partials serially, so spread N*C over the SMs
#: (1024-wide blocks gave 8 programs at N*C = 8192: 107 us for 8 MB on an H200, ncu)
_SUM_TARGET_PROGRAMS = 512


def plan_sum_partials(partials, sum_coarse, sum_fine):
    """Stage two over a [2, P, NC] buffer into (sum_coarse, sum_fine), or over a [1, P, NC] /
    [P, NC] buffer into sum_coarse only (sum_fine None). The block size changes no sum: every
    element adds its P partials in order."""
    p, nc = partials.shape[-2:]
    block = max(128, min(_SUM_BLOCK, next_pow2(triton.cdiv(nc, _SUM_TARGET_PROGRAMS))))
    block = min(block, next_pow2(nc))
    has_f = sum_fine is not None
    args = (partials, sum_coarse, sum_fine if has_f else sum_coarse, nc, p)
    return (_sum_partials_kernel, (triton.cdiv(nc, block),), args,
            dict(HAS_F=has_f, BLOCK=block, I64=needs_int64(partials), num_warps=4))


# ----------------------------------------------------------------------------- entry points
def fwd(coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, eps):
    """out = alpha*gc*Up2(coarse) + beta*gf*fine (see module docstring); out like `fine`."""
    out = torch.empty_like(fine)
    kernel, grid, args, kwargs = plan_forward(coarse, fine, w_coarse, w_fine, gate_coarse,
                                              gate_fine, eps, out)
    with device_guard(fine):
        kernel[grid](*args, **kwargs)
    return out


def bwd(grad_out, coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, eps, need_sums):
    """-> (grad_coarse, grad_fine, sum_coarse, sum_fine); sums are [N, C] (or [0]) in the
    accumulation dtype, unweighted and ungated, reduced in a fixed order."""
    acc = torch.float64 if fine.dtype == torch.float64 else torch.float32
    grad_coarse = torch.empty_like(coarse)
    grad_fine = torch.empty_like(fine)
    if need_sums:
        partials = torch.empty(partials_shape(coarse, grad_out), dtype=acc, device=fine.device)
        sum_coarse = torch.empty(coarse.shape[:2], dtype=acc, device=fine.device)
        sum_fine = torch.empty(coarse.shape[:2], dtype=acc, device=fine.device)
    else:
        partials = None
        sum_coarse = torch.empty((0,), dtype=acc, device=fine.device)
        sum_fine = torch.empty((0,), dtype=acc, device=fine.device)
    kernel, grid, args, kwargs = plan_backward(grad_out, coarse, fine, w_coarse, w_fine,
                                               gate_coarse, gate_fine, eps, need_sums,
                                               grad_coarse, grad_fine, partials)
    with device_guard(fine):
        kernel[grid](*args, **kwargs)
        if need_sums:
            kernel, grid, args, kwargs = plan_sum_partials(partials, sum_coarse, sum_fine)
            kernel[grid](*args, **kwargs)
    return grad_coarse, grad_fine, sum_coarse, sum_fine


def bwd_coarse(grad_out, coarse, w_coarse, w_fine, gate_coarse, eps, need_sum):
    """The coarse half of `bwd` (the same kernel, WITH_FINE=False): -> (grad_coarse,
    sum_coarse), grad_coarse = alpha*gc*Up2^T(grad_out), sum_coarse[n, c] = sum_hw
    grad_out*Up2(coarse) ([N, C] in the accumulation dtype; an empty [0] without need_sum)."""
    acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    grad_coarse = torch.empty_like(coarse)
    if need_sum:
        partials = torch.empty(partials_shape(coarse, grad_out, with_fine=False), dtype=acc,
                               device=grad_out.device)
        sum_coarse = torch.empty(coarse.shape[:2], dtype=acc, device=grad_out.device)
    else:
        partials = None
        sum_coarse = torch.empty((0,), dtype=acc, device=grad_out.device)
    if grad_out.numel() == 0:
        return grad_coarse.zero_(), sum_coarse.zero_()
    kernel, grid, args, kwargs = plan_backward(grad_out, coarse, None, w_coarse, w_fine,
                                               gate_coarse, None, eps, need_sum, grad_coarse,
                                               None, partials)
    with device_guard(grad_out):
        kernel[grid](*args, **kwargs)
        if need_sum:
            kernel, grid, args, kwargs = plan_sum_partials(partials, sum_coarse, None)
            kernel[grid](*args, **kwargs)
    return grad_coarse, sum_coarse
