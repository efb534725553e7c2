"""Triton kernels of `bn_silu`: the four `_bn_silu_*` contracts of csrc/ops.cpp (`stats`, `fwd`,
`bwd_sums`, `bwd`), called through litefpn_kernels.ops.bn_silu (registered in
backends/triton_kernels.py), which folds BatchNorm into per-channel scale / shift and computes
the backward's k_dz / k_x / k_0 from the sums returned here.

Per element of channel c (all in ACC: fp32, fp64 for fp64 x):
    a = x*scale[c] + shift[c];  fwd: y = a / (1 + exp(-a))           (eager's silu formula)
    bwd: sg = 1 / (1 + exp(-a)), dz = g*sg*(1 + a*(1 - sg));  grad_x = dz*k_dz + x*k_x + k_0
    stats: s1 = sum (x - center), s2 = sum (x - center)^2;  bwd_sums: s1 = sum dz,
    s2 = sum dz*(x - center)
The BN output a is recomputed from x wherever it is needed, never stored.

Design. A program owns one sample n, a block of BLOCK_C channels and a chunk of CHUNK pixels
(flattened p = y*W + x) and walks the chunk in [BLOCK_P, BLOCK_C] tiles. The tile shape follows
the layout the op walks (x for the sums, the output for fwd / bwd, as the CPU kernels do):
channels_last puts up to 128 channels on the contiguous axis and a few pixels on the other, NCHW
up to 1024 pixels of a plane on the contiguous axis and a few channels on the other; Triton's
coalescing vectorises along whichever axis has unit stride (a unit stride is specialised by the
JIT). Any other strides (grad_out's zero strides of `.sum()` included) run the same code; pixel
offsets are p*s_w when the plane is "flat" (s_h == W*s_w), else from divmod(p, W).

Sums without atomics, bitwise deterministic: each program reduces its tile products in registers
(a fixed tree) into one partial per channel, written to slot n*chunks + chunk of a [2, C, S]
buffer; `_bn_sum_slots_kernel` then reduces each channel's S slots in a fixed order. The plan
(tiles, chunks, S) is a function of the shapes and the layout only.
"""
import torch
import triton
import triton.language as tl

from ._common import (acc_tl_dtype, device_guard, interpreter_plan, needs_int64, next_pow2,
                      streaming_warps)

__all__ = ["stats", "fwd", "bwd_sums", "bwd"]

# op codes of the one streaming kernel (constexpr: each compiles to its own specialisation)
OP_STATS, OP_FWD, OP_BWD_SUMS, OP_BWD = 0, 1, 2, 3


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _bn_silu_kernel(
        x_ptr, g_ptr, out_ptr, part_ptr, scale_ptr, shift_ptr, center_ptr, kdz_ptr, kx_ptr,
        k0_ptr,
        C, W, HW, CHUNK, N_CHUNKS, S,
        s_xn, s_xc, s_xh, s_xw,
        s_gn, s_gc, s_gh, s_gw,
        s_on, s_oc, s_oh, s_ow,
        OP: tl.constexpr, FLAT: tl.constexpr, ACC: tl.constexpr, I64: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # OP: 0 stats, 1 fwd, 2 bwd_sums, 3 bwd (module docstring). Unused pointers are dummies.
    SUMS: tl.constexpr = OP == 0 or OP == 2
    pid = tl.program_id(0)
    chunk = pid % N_CHUNKS
    n = pid // N_CHUNKS
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    # per-channel constants (masked channels: 0, and masked lanes are zeroed before any sum)
    if OP != 0:
        scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0).to(ACC)[None, :]
        shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0).to(ACC)[None, :]
    if SUMS:
        cen = tl.load(center_ptr + c, mask=c_mask, other=0.0).to(ACC)[None, :]
        acc1 = tl.zeros([BLOCK_P, BLOCK_C], ACC)
        acc2 = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    if OP == 3:
        k_dz = tl.load(kdz_ptr + c, mask=c_mask, other=0.0).to(ACC)[None, :]
        k_x = tl.load(kx_ptr + c, mask=c_mask, other=0.0).to(ACC)[None, :]
        k_0 = tl.load(k0_ptr + c, mask=c_mask, other=0.0).to(ACC)[None, :]
    slot = n * N_CHUNKS + chunk
    if I64:
        n = n.to(tl.int64)
        c = c.to(tl.int64)
    x_base = x_ptr + n * s_xn + c[None, :] * s_xc
    g_base = g_ptr + n * s_gn + c[None, :] * s_gc
    o_base = out_ptr + n * s_on + c[None, :] * s_oc
    p_lo = chunk * CHUNK
    p_hi = tl.minimum(p_lo + CHUNK, HW)
    for p0 in range(0, CHUNK, BLOCK_P):  # scalar bounds (the interpreter wants no tensors)
        p = p_lo + p0 + tl.arange(0, BLOCK_P)
        p_mask = p < p_hi
        if I64:
            p = p.to(tl.int64)
        mask = p_mask[:, None] & c_mask[None, :]
        if FLAT:
            x_pix = p * s_xw
            g_pix = p * s_gw
            o_pix = p * s_ow
        else:
            py = p // W
            px = p % W
            x_pix = py * s_xh + px * s_xw
            g_pix = py * s_gh + px * s_gw
            o_pix = py * s_oh + px * s_ow
        x = tl.load(x_base + x_pix[:, None], mask=mask, other=0.0).to(ACC)
        if OP == 0:
            d = tl.where(mask, x - cen, 0.0)
            acc1 += d
            acc2 += d * d
        else:
            a = x * scale + shift
            if OP == 1:
                # eager's formula, so NaN / +-Inf follow IEEE as eager's (silu(-inf) = NaN)
                y = a / (1.0 + tl.exp(-a))
                tl.store(o_base + o_pix[:, None], y.to(out_ptr.dtype.element_ty), mask=mask)
            else:
                g = tl.load(g_base + g_pix[:, None], mask=mask, other=0.0).to(ACC)
                sg = 1.0 / (1.0 + tl.exp(-a))
                dz = g * sg * (1.0 + a * (1.0 - sg))
                if OP == 2:
                    dz = tl.where(mask, dz, 0.0)
                    acc1 += dz
                    acc2 += dz * tl.where(mask, x - cen, 0.0)
                else:
                    gx = dz * k_dz + x * k_x + k_0
                    tl.store(o_base + o_pix[:, None], gx.to(out_ptr.dtype.element_ty),
                             mask=mask)
    if SUMS:
        # stage one: this program's partial per channel -> part[k, c, slot] of [2, C, S]
        if I64:
            slot = slot.to(tl.int64)
        off = c * S + slot
        tl.store(part_ptr + off, tl.sum(acc1, axis=0), mask=c_mask)
        tl.store(part_ptr + C * S + off, tl.sum(acc2, axis=0), mask=c_mask)


@triton.jit
def _bn_sum_slots_kernel(part_ptr, out_ptr, S, BLOCK_S: tl.constexpr, I64: tl.constexpr):
    """Stage two: out[r] = sum over s of part[r, s] for the rows r = (k, c) of the [2*C, S]
    buffer, one program per row: lane-wise partials over the slots in order, then a fixed tree.
    """
    r = tl.program_id(0)
    if I64:
        r = r.to(tl.int64)
    base = part_ptr + r * S
    acc = tl.zeros([BLOCK_S], part_ptr.dtype.element_ty)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        acc += tl.load(base + s, mask=s < S, other=0.0)
    tl.store(out_ptr + r, tl.sum(acc, axis=0))


# ----------------------------------------------------------------------------- launch planning
#: GPU: elements of one [BLOCK_P, BLOCK_C] tile (one 16-byte vector a thread: 8 warps bf16, 16
#: fp32 / fp64, `streaming_warps`) and programs wanted per launch (H100/H200: 132 SMs x ~16
#: resident programs, several waves).
_TILE_ELEMS = 2048
_TARGET_PROGRAMS = 8192
#: the sums ops want fewer, longer programs (still 2-3 waves): each ends with a cross-warp
#: reduction of its tile and 2 x BLOCK_C partial stores, which at 4 tiles a program (8192
#: programs, B=64, 1/4 level) held the stats pass to 17% of DRAM bandwidth on an H200 (ncu; the
#: elementwise pass over the same tiles: 75%)
_SUMS_TARGET_PROGRAMS = 2048
_MAX_C_INNER = 128   # channels_last: channels per tile (the whole C = 128 of the neck)
_MAX_P_INNER = 1024  # NCHW: pixels per tile row
_SLOT_BLOCK = 1024   # stage two: slots a program adds per step
#: interpreter: few big tiles and one chunk per (sample, channel block).
_INTERP_TILE_ELEMS = 1 << 16


def _channels_inner(t):
    """The nhwc walk (channels on the contiguous axis): unit channel stride and C > 1, as the
    CPU kernels decide."""
    return t.shape[1] > 1 and t.stride(1) == 1


def _flat(*tensors):
    """Every tensor has flat pixel strides (s_h == W*s_w, or H <= 1)."""
    return all(t.shape[2] <= 1 or t.stride(2) == t.shape[3] * t.stride(3) for t in tensors)


def tiling(x, walk, interpret=None, sums=False):
    """(BLOCK_P, BLOCK_C, CHUNK, N_CHUNKS, grid) of a launch over x ([N, C, H, W]) walked in the
    layout of `walk` (x for the sums, the output otherwise); shapes, layout and `sums` only."""
    n, c, h, w = x.shape
    hw = h * w
    interp = interpreter_plan(x, interpret)
    tile = _INTERP_TILE_ELEMS if interp else _TILE_ELEMS
    cc, pp = next_pow2(c), next_pow2(hw)
    if _channels_inner(walk):
        block_c = min(cc, _MAX_C_INNER if not interp else tile)
        block_p = max(1, min(pp, tile // block_c))
    else:
        block_p = min(pp, _MAX_P_INNER if not interp else tile)
        block_c = max(1, min(cc, tile // block_p))
    c_blocks = triton.cdiv(c, block_c)
    if interp:
        chunks = 1
    else:
        # enough programs to fill the GPU; each walks at least one tile
        target = _SUMS_TARGET_PROGRAMS if sums else _TARGET_PROGRAMS
        chunks = max(1, min(triton.cdiv(hw, block_p),
                            triton.cdiv(target, max(1, n * c_blocks))))
    chunk = triton.cdiv(triton.cdiv(max(hw, 1), chunks), block_p) * block_p
    chunks = triton.cdiv(max(hw, 1), chunk)
    return block_p, block_c, chunk, chunks, (n * chunks, c_blocks)


def slots(x, interpret=None):
    """S, the partial sums per channel of the sums ops (which walk x in x's layout)."""
    return x.shape[0] * tiling(x, x, interpret, sums=True)[3]


def plan(op, x, g=None, out=None, part=None, scale=None, shift=None, center=None, k_dz=None,
         k_x=None, k_0=None, interpret=None):
    """(kernel, grid, args, kwargs) of one streaming launch; op in OP_*; `part` is the
    [2, C, slots(x)] buffer of the sums ops. Also used by the compile and resource tests."""
    sums = op in (OP_STATS, OP_BWD_SUMS)
    walk = x if sums else out
    n, c, h, w = x.shape
    block_p, block_c, chunk, chunks, grid = tiling(x, walk, interpret, sums=sums)
    if sums and tuple(part.shape) != (2, c, n * chunks):
        raise RuntimeError(f"bn_silu: partials buffer {tuple(part.shape)} does not match the "
                           f"launch ({n * chunks} slots of {c} channels)")
    g_, o_ = (x if g is None else g), (x if out is None else out)
    vec = next(v for v in (scale, center) if v is not None)
    dummy = lambda t: vec if t is None else t  # noqa: E731
    args = (x, g_, o_, dummy(part), dummy(scale), dummy(shift), dummy(center), dummy(k_dz),
            dummy(k_x), dummy(k_0), c, w, h * w, chunk, chunks, n * chunks,
            *x.stride(), *g_.stride(), *o_.stride())
    kwargs = dict(OP=op, FLAT=_flat(x, g_, o_), ACC=acc_tl_dtype(x.dtype),
                  I64=needs_int64(x, g, out, part), BLOCK_P=block_p, BLOCK_C=block_c,
                  num_warps=streaming_warps(block_p * block_c, x.dtype))
    return _bn_silu_kernel, grid, args, kwargs


def plan_sum_slots(part, out):
    """Stage two over the [2, C, S] buffer into out ([2, C])."""
    rows, s = part.shape[0] * part.shape[1], part.shape[2]
    block = min(_SLOT_BLOCK, next_pow2(s))
    return (_bn_sum_slots_kernel, (rows,), (part, out, s),
            dict(BLOCK_S=block, I64=needs_int64(part), num_warps=4))


# ----------------------------------------------------------------------------- entry points
def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _empty_work(x):
    return x.shape[0] * x.shape[2] * x.shape[3] == 0 or x.shape[1] == 0


def _output(x):
    """Like the CPU's: channels_last when x is (and not contiguous), else contiguous."""
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.empty(x.shape, dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if cl else torch.contiguous_format)


def _sums(op, x, interpret, **vecs):
    acc, c = _acc(x), x.shape[1]
    if _empty_work(x):
        return (torch.zeros((c,), dtype=acc, device=x.device),
                torch.zeros((c,), dtype=acc, device=x.device))
    part = torch.empty((2, c, slots(x, interpret)), dtype=acc, device=x.device)
    res = torch.empty((2, c), dtype=acc, device=x.device)
    with device_guard(x):
        kernel, grid, args, kwargs = plan(op, x, part=part, interpret=interpret, **vecs)
        kernel[grid](*args, **kwargs)
        kernel, grid, args, kwargs = plan_sum_slots(part, res)
        kernel[grid](*args, **kwargs)
    # two tensors, not two views of one buffer: the ops return them, and custom ops' outputs
    # may not alias each other
    return res[0].clone(), res[1].clone()


def _elementwise(op, x, interpret, **tensors):
    out = _output(x)
    if _empty_work(x):
        return out
    kernel, grid, args, kwargs = plan(op, x, out=out, interpret=interpret, **tensors)
    with device_guard(x):
        kernel[grid](*args, **kwargs)
    return out


def stats(x, center, *, interpret=None):
    """-> (s1, s2): sum (x - center[c]), sum (x - center[c])^2 per channel ([C], acc dtype)."""
    return _sums(OP_STATS, x, interpret, center=center)


def fwd(x, scale, shift, *, interpret=None):
    """y = silu(x*scale[c] + shift[c]) in x's dtype (format: `_output`)."""
    return _elementwise(OP_FWD, x, interpret, scale=scale, shift=shift)


def bwd_sums(grad_out, x, scale, shift, center, *, interpret=None):
    """-> (s1, s2): sum dz, sum dz*(x - center[c]) per channel ([C], acc dtype)."""
    return _sums(OP_BWD_SUMS, x, interpret, g=grad_out, scale=scale, shift=shift, center=center)


def bwd(grad_out, x, scale, shift, k_dz, k_x, k_0, *, interpret=None):
    """grad_x = dz*k_dz[c] + x*k_x[c] + k_0[c], like `fwd`'s output."""
    return _elementwise(OP_BWD, x, interpret, g=grad_out, scale=scale, shift=shift, k_dz=k_dz,
                        k_x=k_x, k_0=k_0)
