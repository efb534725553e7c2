"""The small math of the passes as Triton kernels: the functions of `litefpn_kernels/ops/_steps.py`
(same names, arguments and results), one or two launches each where the PyTorch steps issue a
few to a few dozen small ops, i.e. launches on a GPU.

Why: at small sizes the launches, not the work, set the time of a fused call; on a GPU each
PyTorch op of [C] elements is a kernel launch of a few microseconds. Both GPU backends (`triton`,
and `cuda` where Triton is installed) build their passes with these steps.

What stays a library call: the [C, Cin] x [Cin, Cin] products (torch.mm: cuBLAS on a GPU) and
the matrix-vector product W^T u. Every reduction here runs in a fixed order (loops over the
batch, or over one axis of a tile), so results do not depend on the launch: deterministic.
The sums of the fusion weights' gradients (N*C terms) are taken in float64, as the C++ passes do.
"""
import torch
import triton
import triton.language as tl

from ..ops._steps import weight2d  # noqa: F401  (a view or no-op: part of this module's API)
from ..ops._tensor import to_acc_contiguous
from ._common import acc_tl_dtype, device_guard, fusion_weights, softplus, split_eps

_BLOCK = 256    # [C]- and [N*C]-sized launches: elements per program
_BLOCK_C = 16   # [C, Cin] tiles: channels x
_BLOCK_K = 64   # input channels per program
#: the batch loops take UNROLL samples a step (unrolled: their loads issue together, the adds
#: stay in sample order); one sample a step ran at memory latency, e.g. the gram moments 45 us
#: at N=64 on an H200 (ncu). Likewise the fusion weights' gradient loop over N*C.
_UNROLL = 8


def _launch(kernel, grid, *args, **meta):
    """The one place the steps launch a kernel (tests count the launches here)."""
    kernel[grid](*args, **meta)


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _rsqrt(v, ACC: tl.constexpr):
    """1/sqrt(v) with a correctly rounded sqrt (tl.sqrt is approximate in fp32; sqrt_rn has
    no fp64 form, where tl.sqrt is exact)."""
    if ACC == tl.float64:
        r = 1.0 / tl.sqrt(v)
    else:
        r = 1.0 / tl.sqrt_rn(v)
    return r


@triton.jit
def _bn_fold(w_ptr, b_ptr, mean_ptr, var_ptr, eps_hi, eps_lo, c, mask, ACC: tl.constexpr):
    """(scale, shift, r, mean) of channels c: BN(x) = x*scale + shift, r = 1/sqrt(var + eps)."""
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    mean = tl.load(mean_ptr + c, mask=mask, other=0.0).to(ACC)
    r = _rsqrt(tl.load(var_ptr + c, mask=mask, other=1.0).to(ACC) + eps, ACC)
    scale = tl.load(w_ptr + c, mask=mask, other=0.0).to(ACC) * r
    shift = tl.load(b_ptr + c, mask=mask, other=0.0).to(ACC) - mean * scale
    return scale, shift, r, mean


@triton.jit
def _fine_factor(wc_ptr, wf_ptr, gf_ptr, eps_hi, eps_lo, off, mask, HAS_W: tl.constexpr,
                 HAS_GF: tl.constexpr, BLOCK_SHAPE: tl.constexpr, ACC: tl.constexpr):
    """m = beta*gate_fine[off] (an absent factor is 1) as a BLOCK_SHAPE tile."""
    m = tl.full(BLOCK_SHAPE, 1.0, ACC)
    if HAS_GF:
        m = tl.load(gf_ptr + off, mask=mask, other=0.0).to(ACC)
    if HAS_W:
        _, beta = fusion_weights(wc_ptr, wf_ptr, eps_hi, eps_lo, ACC)
        m = m * beta
    return m


# ----------------------------------------------------------------------------- BatchNorm
@triton.jit
def _pilot_kernel(x_ptr, out_ptr, C, stride_c, BLOCK: tl.constexpr, ACC: tl.constexpr):
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    v = tl.load(x_ptr + c.to(tl.int64) * stride_c, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + c, tl.where(tl.abs(v) < float("inf"), v, 0.0), mask=mask)


def pilot(x, acc):
    out = torch.empty((x.shape[1],), dtype=acc, device=x.device)
    with device_guard(x):
        _launch(_pilot_kernel, (triton.cdiv(x.shape[1], _BLOCK),), x, out, x.shape[1],
                x.stride(1), BLOCK=_BLOCK, ACC=acc_tl_dtype(acc))
    return out


@triton.jit
def _moments_kernel(s1_ptr, s2_ptr, center_ptr, mean_ptr, var_ptr, C, n,
                    BLOCK: tl.constexpr, ACC: tl.constexpr):
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    count = tl.cast(n, ACC)
    d = tl.load(s1_ptr + c, mask=mask, other=0.0) / count
    v = tl.load(s2_ptr + c, mask=mask, other=0.0) / count - d * d
    tl.store(mean_ptr + c, tl.load(center_ptr + c, mask=mask, other=0.0) + d, mask=mask)
    tl.store(var_ptr + c, tl.where(v < 0.0, 0.0, v), mask=mask)  # NaN stays NaN


def moments(s1, s2, center, n):
    mean, var = torch.empty_like(s1), torch.empty_like(s1)
    with device_guard(s1):
        _launch(_moments_kernel, (triton.cdiv(s1.numel(), _BLOCK),), s1, s2, center, mean, var,
                s1.numel(), n, BLOCK=_BLOCK, ACC=acc_tl_dtype(s1.dtype))
    return mean, var


@triton.jit
def _bn_coefs_kernel(w_ptr, b_ptr, mean_ptr, var_ptr, s1_ptr, s2_ptr, scale_ptr, shift_ptr,
                     out3_ptr, out4_ptr, eps_hi, eps_lo, C, n, GRAD: tl.constexpr,
                     TRAINING: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """GRAD: (scale, shift, k_x, k_0) of the grad_x kernel (k_x = k_0 = 0 in eval); else
    (scale, shift, r)."""
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    scale, shift, r, mean = _bn_fold(w_ptr, b_ptr, mean_ptr, var_ptr, eps_hi, eps_lo, c, mask,
                                     ACC)
    tl.store(scale_ptr + c, scale, mask=mask)
    tl.store(shift_ptr + c, shift, mask=mask)
    if GRAD:
        k_x = tl.zeros([BLOCK], ACC)
        k_0 = tl.zeros([BLOCK], ACC)
        if TRAINING:  # grad_x = scale*(dz - s1/n - (x - mean)*r^2*s2/n)
            count = tl.cast(n, ACC)
            k_x = scale * r * r * tl.load(s2_ptr + c, mask=mask, other=0.0) / -count
            k_0 = -mean * k_x - scale * tl.load(s1_ptr + c, mask=mask, other=0.0) / count
        tl.store(out3_ptr + c, k_x, mask=mask)
        tl.store(out4_ptr + c, k_0, mask=mask)
    else:
        tl.store(out3_ptr + c, r, mask=mask)


def _bn_coefs(bn_weight, bn_bias, mean, var, bn_eps, acc, s1=None, s2=None, n=1,
              training=False):
    c = var.shape[0]
    outs = [torch.empty((c,), dtype=acc, device=var.device) for _ in range(4 if s1 is not None
                                                                           else 3)]
    grad = s1 is not None
    with device_guard(var):
        _launch(_bn_coefs_kernel, (triton.cdiv(c, _BLOCK),), bn_weight, bn_bias, mean, var,
                s1 if grad else var, s2 if grad else var, outs[0], outs[1], outs[2],
                outs[3] if grad else outs[2], *split_eps(bn_eps), c, n, GRAD=grad,
                TRAINING=training, BLOCK=_BLOCK, ACC=acc_tl_dtype(acc))
    return tuple(outs)


def bn_affine(bn_weight, bn_bias, mean, var, bn_eps, acc):
    return _bn_coefs(bn_weight, bn_bias, mean, var, bn_eps, acc)


def bn_grad_coefs(bn_weight, bn_bias, mean, var, bn_eps, s1, s2, n, training, acc):
    return _bn_coefs(bn_weight, bn_bias, mean, var, bn_eps, acc, s1=s1, s2=s2, n=n,
                     training=training)


# ----------------------------------------------------------------------------- lateral
@triton.jit
def _gram_moments_kernel(g_ptr, colsum_ptr, center_ptr, mean_ptr, cov_ptr, N, K, n,
                         sg_n, sg_i, sg_j, ss_n, ss_k, BLOCK_I: tl.constexpr,
                         BLOCK_J: tl.constexpr, UNROLL: tl.constexpr, ACC: tl.constexpr):
    """cov[i, j] = sum_b g[b, i, j] / n - d_i d_j, mean = center + d, d = sum_b colsum[b] / n
    (sums over the batch b in order)."""
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    mi, mj = i < K, j < K
    count = tl.cast(n, ACC)
    g = tl.zeros([BLOCK_I, BLOCK_J], ACC)
    di = tl.zeros([BLOCK_I], ACC)
    dj = tl.zeros([BLOCK_J], ACC)
    for b0 in range(0, N, UNROLL):
        for db in tl.static_range(UNROLL):
            b = b0 + db
            g += tl.load(g_ptr + b * sg_n + i[:, None] * sg_i + j[None, :] * sg_j,
                         mask=(mi[:, None] & mj[None, :]) & (b < N), other=0.0)
            di += tl.load(colsum_ptr + b * ss_n + i * ss_k, mask=mi & (b < N), other=0.0)
            dj += tl.load(colsum_ptr + b * ss_n + j * ss_k, mask=mj & (b < N), other=0.0)
    di = di / count
    dj = dj / count
    tl.store(cov_ptr + i[:, None] * K + j[None, :], g / count - di[:, None] * dj[None, :],
             mask=mi[:, None] & mj[None, :])
    if tl.program_id(1) == 0:
        tl.store(mean_ptr + i, tl.load(center_ptr + i, mask=mi, other=0.0) + di, mask=mi)


def gram_moments(g, colsum, center, n):
    k = g.shape[1]
    mean, cov = torch.empty_like(center), g.new_empty((k, k))
    grid = (triton.cdiv(k, _BLOCK_C), triton.cdiv(k, _BLOCK_K))
    with device_guard(g):
        _launch(_gram_moments_kernel, grid, g, colsum, center, mean, cov, g.shape[0], k, n,
                *g.stride(), *colsum.stride(), BLOCK_I=_BLOCK_C, BLOCK_J=_BLOCK_K,
                UNROLL=_UNROLL, ACC=acc_tl_dtype(g.dtype))
    return mean, cov


@triton.jit
def _y_moments_kernel(w_ptr, wcov_ptr, mean_z_ptr, mean_ptr, var_ptr, C, K,
                      BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """mean[c] = sum_k W[c, k] mean_z[k], var[c] = max(sum_k (W cov_z)[c, k] W[c, k], 0)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = c < C
    mean = tl.zeros([BLOCK_C], ACC)
    var = tl.zeros([BLOCK_C], ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mk = k < K
        m2 = mc[:, None] & mk[None, :]
        w = tl.load(w_ptr + c[:, None] * K + k[None, :], mask=m2, other=0.0)
        mean += tl.sum(w * tl.load(mean_z_ptr + k, mask=mk, other=0.0)[None, :], 1)
        var += tl.sum(w * tl.load(wcov_ptr + c[:, None] * K + k[None, :], mask=m2, other=0.0),
                      1)
    tl.store(mean_ptr + c, mean, mask=mc)
    tl.store(var_ptr + c, tl.where(var < 0.0, 0.0, var), mask=mc)


def y_moments(weight, mean_z, cov_z):
    c, k = weight.shape
    wcov = torch.mm(weight, cov_z)
    mean, var = weight.new_empty((c,)), weight.new_empty((c,))
    with device_guard(weight):
        _launch(_y_moments_kernel, (triton.cdiv(c, _BLOCK_C),), weight, wcov, mean_z, mean,
                var, c, k, BLOCK_C=_BLOCK_C, BLOCK_K=_BLOCK_K, ACC=acc_tl_dtype(weight.dtype))
    return mean, var


@triton.jit
def _fold_weight_kernel(w_ptr, bn_w_ptr, bn_b_ptr, mean_ptr, var_ptr, out_w_ptr, shift_ptr,
                        eps_hi, eps_lo, C, K, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                        ACC: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mc = c < C
    m2 = mc[:, None] & (k < K)[None, :]
    scale, shift, _, _ = _bn_fold(bn_w_ptr, bn_b_ptr, mean_ptr, var_ptr, eps_hi, eps_lo, c, mc,
                                  ACC)
    w = tl.load(w_ptr + c[:, None] * K + k[None, :], mask=m2, other=0.0)
    tl.store(out_w_ptr + c[:, None] * K + k[None, :], scale[:, None] * w, mask=m2)
    if tl.program_id(1) == 0:
        tl.store(shift_ptr + c, shift, mask=mc)


def fold_weight(weight, bn_weight, bn_bias, mean, var, bn_eps):
    c, k = weight.shape
    out, shift = torch.empty_like(weight), weight.new_empty((c,))
    grid = (triton.cdiv(c, _BLOCK_C), triton.cdiv(k, _BLOCK_K))
    with device_guard(weight):
        _launch(_fold_weight_kernel, grid, weight, bn_weight, bn_bias, mean, var, out, shift,
                *split_eps(bn_eps), c, k, BLOCK_C=_BLOCK_C, BLOCK_K=_BLOCK_K,
                ACC=acc_tl_dtype(weight.dtype))
    return out, shift


@triton.jit
def _fine_factor_kernel(wc_ptr, wf_ptr, gf_ptr, out_ptr, eps_hi, eps_lo, NC,
                        HAS_W: tl.constexpr, HAS_GF: tl.constexpr, BLOCK: tl.constexpr,
                        ACC: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < NC
    m = _fine_factor(wc_ptr, wf_ptr, gf_ptr, eps_hi, eps_lo, i, mask, HAS_W, HAS_GF, [BLOCK],
                     ACC)
    tl.store(out_ptr + i, m, mask=mask)


def _fusion_args(w_coarse, w_fine, gate_fine, eps, acc, fallback):
    """(w_coarse, w_fine, gate_fine) as kernel pointers (`fallback` where absent), eps halves
    and the HAS_W / HAS_GF flags."""
    wc, wf, gf = (to_acc_contiguous(t, acc) for t in (w_coarse, w_fine, gate_fine))
    pick = lambda t: fallback if t is None else t  # noqa: E731
    return (pick(wc), pick(wf), pick(gf), *split_eps(eps)), dict(
        HAS_W=wc is not None, HAS_GF=gf is not None)


def fine_factor(n, c, w_coarse, w_fine, gate_fine, eps, acc, device):
    out = torch.empty((n, c), dtype=acc, device=device)
    args, flags = _fusion_args(w_coarse, w_fine, gate_fine, eps, acc, out)
    with device_guard(out):
        _launch(_fine_factor_kernel, (triton.cdiv(n * c, _BLOCK),), *args[:3], out, *args[3:],
                n * c, **flags, BLOCK=_BLOCK, ACC=acc_tl_dtype(acc))
    return out


@triton.jit
def _a_sum_kernel(a_ptr, wc_ptr, wf_ptr, gf_ptr, out_ptr, eps_hi, eps_lo, N, C, K,
                  HAS_W: tl.constexpr, HAS_GF: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_K: tl.constexpr, UNROLL: tl.constexpr, ACC: tl.constexpr):
    """a_sum[c, k] = sum_n m[n, c] a_n[n, c, k] (a_n contiguous [N, C, K]; n in order)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mc = c < C
    m2 = mc[:, None] & (k < K)[None, :]
    tile = c[:, None] * K + k[None, :]
    acc = tl.zeros([BLOCK_C, BLOCK_K], ACC)
    for n0 in range(0, N, UNROLL):
        for dn in tl.static_range(UNROLL):
            n = n0 + dn
            m = _fine_factor(wc_ptr, wf_ptr, gf_ptr, eps_hi, eps_lo, n * C + c, mc & (n < N),
                             HAS_W, HAS_GF, [BLOCK_C], ACC)
            acc += m[:, None] * tl.load(a_ptr + n * C * K + tile, mask=m2 & (n < N), other=0.0)
    tl.store(out_ptr + tile, acc, mask=m2)


@triton.jit
def _grad_sums_kernel(a_ptr, s_ptr, a_sum_ptr, w_ptr, zc_ptr, bn_w_ptr, bn_b_ptr, mean_ptr,
                      var_ptr, wc_ptr, wf_ptr, gf_ptr, s_out_ptr, d_gamma_ptr, sum_fine_ptr,
                      eps_hi, eps_lo, f_eps_hi, f_eps_lo, B0, N, C, K, HAS_W: tl.constexpr,
                      HAS_GF: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                      UNROLL: tl.constexpr, ACC: tl.constexpr):
    """Program (b - B0, channel block): for b < N, sum_fine[b, c] = sum_k W'[c, k] a_n[b, c, k]
    + (W' zc + shift)[c] s_n[b, c]; for b == N, s[c] = sum_n m s_n and
    d_gamma[c] = r (sum_k W a_sum + (W zc - mean) s). B0 = N skips the sum_fine programs."""
    b = B0 + tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = c < C
    scale, shift, r, mean = _bn_fold(bn_w_ptr, bn_b_ptr, mean_ptr, var_ptr, eps_hi, eps_lo, c,
                                     mc, ACC)
    rows = a_sum_ptr  # sum_k W[c, k] a_sum[c, k], or of the image's gram a_n[b]
    if b < N:
        rows = a_ptr + b * C * K
    dot = tl.zeros([BLOCK_C], ACC)  # sum_k W[c, k] rows[c, k]
    wz = tl.zeros([BLOCK_C], ACC)   # (W zc)[c]
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mk = k < K
        m2 = mc[:, None] & mk[None, :]
        w = tl.load(w_ptr + c[:, None] * K + k[None, :], mask=m2, other=0.0)
        dot += tl.sum(w * tl.load(rows + c[:, None] * K + k[None, :], mask=m2, other=0.0), 1)
        wz += tl.sum(w * tl.load(zc_ptr + k, mask=mk, other=0.0)[None, :], 1)
    if b < N:
        s_b = tl.load(s_ptr + b * C + c, mask=mc, other=0.0)
        tl.store(sum_fine_ptr + b * C + c, scale * dot + (scale * wz + shift) * s_b, mask=mc)
    else:
        s = tl.zeros([BLOCK_C], ACC)
        for n0 in range(0, N, UNROLL):
            for dn in tl.static_range(UNROLL):
                n = n0 + dn
                mn = mc & (n < N)
                m = _fine_factor(wc_ptr, wf_ptr, gf_ptr, f_eps_hi, f_eps_lo, n * C + c, mn,
                                 HAS_W, HAS_GF, [BLOCK_C], ACC)
                s += m * tl.load(s_ptr + n * C + c, mask=mn, other=0.0)
        tl.store(s_out_ptr + c, s, mask=mc)
        tl.store(d_gamma_ptr + c, r * (dot + (wz - mean) * s), mask=mc)


def lateral_grad_sums(a_n, s_n, weight, bn_weight, bn_bias, mean, var, bn_eps, zc, w_coarse,
                      w_fine, gate_fine, eps, need_sums):
    n, c, k = a_n.shape
    acc, ACC = weight.dtype, acc_tl_dtype(weight.dtype)
    a_n, s_n = a_n.contiguous(), s_n.contiguous()  # the gram's outputs: no copy
    a_sum, s, d_gamma = torch.empty_like(weight), weight.new_empty((c,)), weight.new_empty((c,))
    sum_fine = weight.new_empty((n, c) if need_sums else (0,))
    fusion, flags = _fusion_args(w_coarse, w_fine, gate_fine, eps, acc, s)
    with device_guard(a_n):
        _launch(_a_sum_kernel, (triton.cdiv(c, _BLOCK_C), triton.cdiv(k, _BLOCK_K)), a_n,
                *fusion[:3], a_sum, *fusion[3:], n, c, k, **flags, BLOCK_C=_BLOCK_C,
                BLOCK_K=_BLOCK_K, UNROLL=_UNROLL, ACC=ACC)
        # programs b < N: sum_fine (only with need_sums); program N: s and d_gamma
        first = 0 if need_sums else n
        _launch(_grad_sums_kernel, (n + 1 - first, triton.cdiv(c, _BLOCK_C)), a_n, s_n, a_sum,
                weight, zc, bn_weight, bn_bias, mean, var, *fusion[:3], s, d_gamma,
                sum_fine if need_sums else s, *split_eps(bn_eps), *fusion[3:], first, n, c, k,
                **flags, BLOCK_C=_BLOCK_C, BLOCK_K=_BLOCK_K, UNROLL=_UNROLL, ACC=ACC)
    return a_sum, s, d_gamma, sum_fine


@triton.jit
def _grad_weights_kernel(w_ptr, bn_w_ptr, bn_b_ptr, mean_ptr, var_ptr, zc_ptr, wcov_ptr,
                         delta_ptr, a_sum_ptr, s_ptr, s_all_ptr, d_all_ptr, grad_w_ptr,
                         scaled_w_ptr, v_ptr, u_ptr, eps_hi, eps_lo, frac, count_all, C, K,
                         TRAINING: tl.constexpr, HAS_DELTA: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """The [C, Cin] tile (c, k) of grad_W and W' = diag(gamma r) W; in training also
    V = diag(gamma r^2 d_gamma / count) W (quad = W^T V) and, from the programs of k-block 0,
    u = (V zc) - gamma r s_all / count (shift = W^T u): see `_steps.lateral_grad_weights`."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mc, mk = c < C, k < K
    m2 = mc[:, None] & mk[None, :]
    tile = c[:, None] * K + k[None, :]
    gamma_r, _, r, _ = _bn_fold(bn_w_ptr, bn_b_ptr, mean_ptr, var_ptr, eps_hi, eps_lo, c, mc,
                                ACC)
    w = tl.load(w_ptr + tile, mask=m2, other=0.0)
    tl.store(scaled_w_ptr + tile, gamma_r[:, None] * w, mask=m2)
    a = tl.load(a_sum_ptr + tile, mask=m2, other=0.0)
    s = tl.load(s_ptr + c, mask=mc, other=0.0)
    zc = tl.load(zc_ptr + k, mask=mk, other=0.0)
    if TRAINING:
        frac_ = tl.cast(frac, ACC)
        total = tl.cast(count_all, ACC)
        s_all = tl.load(s_all_ptr + c, mask=mc, other=0.0)
        d_all = tl.load(d_all_ptr + c, mask=mc, other=0.0)
        g = a - (d_all * r * frac_)[:, None] * tl.load(wcov_ptr + tile, mask=m2, other=0.0)
        if HAS_DELTA:  # the group's statistics: this rank's offset of mean_z
            wd = tl.zeros([BLOCK_C], ACC)  # (W delta)[c], over every k
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                mkk = kk < K
                wd += tl.sum(tl.load(w_ptr + c[:, None] * K + kk[None, :],
                                     mask=mc[:, None] & mkk[None, :], other=0.0)
                             * tl.load(delta_ptr + kk, mask=mkk, other=0.0)[None, :], 1)
            delta = tl.load(delta_ptr + k, mask=mk, other=0.0)
            g = g - (s_all * frac_)[:, None] * delta[None, :]
            local_dy = s - frac_ * s_all - frac_ * r * d_all * wd
            g = g + local_dy[:, None] * zc[None, :]
        tl.store(grad_w_ptr + tile, gamma_r[:, None] * g, mask=m2)
        dq = gamma_r * r * d_all / total
        tl.store(v_ptr + tile, dq[:, None] * w, mask=m2)
        if tl.program_id(1) == 0:
            wz = tl.zeros([BLOCK_C], ACC)  # (W zc)[c], over every k
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                mkk = kk < K
                wz += tl.sum(tl.load(w_ptr + c[:, None] * K + kk[None, :],
                                     mask=mc[:, None] & mkk[None, :], other=0.0)
                             * tl.load(zc_ptr + kk, mask=mkk, other=0.0)[None, :], 1)
            tl.store(u_ptr + c, dq * wz - gamma_r * s_all / total, mask=mc)
    else:
        tl.store(grad_w_ptr + tile, gamma_r[:, None] * (a + s[:, None] * zc[None, :]), mask=m2)


def lateral_grad_weights(weight, bn_weight, bn_bias, mean, var, bn_eps, zc, cov_z, delta_z,
                         a_sum, s, s_all, d_gamma_all, frac, count_all, training):
    c, k = weight.shape
    grad_w, scaled_w = torch.empty_like(weight), torch.empty_like(weight)
    v, u = (torch.empty_like(weight), weight.new_empty((c,))) if training else (weight, s)
    wcov = torch.mm(weight, cov_z) if training else weight
    has_delta = training and delta_z.numel() > 0
    grid = (triton.cdiv(c, _BLOCK_C), triton.cdiv(k, _BLOCK_K))
    with device_guard(weight):
        _launch(_grad_weights_kernel, grid, weight, bn_weight, bn_bias, mean, var, zc, wcov,
                delta_z if has_delta else zc, a_sum, s, s_all, d_gamma_all, grad_w, scaled_w, v,
                u, *split_eps(bn_eps), float(frac), float(count_all), c, k, TRAINING=training,
                HAS_DELTA=has_delta, BLOCK_C=_BLOCK_C, BLOCK_K=_BLOCK_K,
                ACC=acc_tl_dtype(weight.dtype))
    if not training:
        return grad_w, scaled_w, None, None
    return grad_w, scaled_w, torch.mm(weight.t(), v), torch.mv(weight.t(), u)


# ----------------------------------------------------------------------------- fusion
@triton.jit
def _fusion_grads_kernel(sc_ptr, sf_ptr, wc_ptr, wf_ptr, gc_ptr, gf_ptr, out_wc_ptr, out_wf_ptr,
                         out_gc_ptr, out_gf_ptr, eps_hi, eps_lo, NC, P, HAS_W: tl.constexpr,
                         HAS_GC: tl.constexpr, HAS_GF: tl.constexpr, NEED_W: tl.constexpr,
                         NEED_GC: tl.constexpr, NEED_GF: tl.constexpr, BLOCK: tl.constexpr,
                         UNROLL: tl.constexpr, ACC: tl.constexpr):
    """Programs 0..P-1: the gates' gradients coef*sum over their block of N*C; program P (with
    NEED_W): t = (sum gc*sum_c, sum gf*sum_f) over every (n, c) in order, in float64, then
    d/dsp = (t D - t.sp) / D^2 and softplus' backward (_fusion.fusion_param_grads)."""
    pid = tl.program_id(0)
    if pid < P:
        alpha = 1.0
        beta = 1.0
        if HAS_W:
            alpha, beta = fusion_weights(wc_ptr, wf_ptr, eps_hi, eps_lo, ACC)
        i = pid * BLOCK + tl.arange(0, BLOCK)
        mask = i < NC
        if NEED_GC:
            tl.store(out_gc_ptr + i, alpha * tl.load(sc_ptr + i, mask=mask, other=0.0),
                     mask=mask)
        if NEED_GF:
            tl.store(out_gf_ptr + i, beta * tl.load(sf_ptr + i, mask=mask, other=0.0),
                     mask=mask)
    elif NEED_W:
        t_c = tl.zeros([BLOCK], tl.float64)
        t_f = tl.zeros([BLOCK], tl.float64)
        for i0 in range(0, NC, BLOCK * UNROLL):
            for di in tl.static_range(UNROLL):  # lane l still adds l, l + BLOCK, ... in order
                i = i0 + di * BLOCK + tl.arange(0, BLOCK)
                mask = i < NC
                vc = tl.load(sc_ptr + i, mask=mask, other=0.0).to(tl.float64)
                vf = tl.load(sf_ptr + i, mask=mask, other=0.0).to(tl.float64)
                if HAS_GC:
                    vc = vc * tl.load(gc_ptr + i, mask=mask, other=0.0).to(tl.float64)
                if HAS_GF:
                    vf = vf * tl.load(gf_ptr + i, mask=mask, other=0.0).to(tl.float64)
                t_c += vc
                t_f += vf
        tc = tl.sum(t_c, 0).to(ACC)
        tf = tl.sum(t_f, 0).to(ACC)
        x_c = tl.load(wc_ptr).to(ACC)
        x_f = tl.load(wf_ptr).to(ACC)
        sp_c = softplus(x_c)
        sp_f = softplus(x_f)
        denom = sp_c + sp_f + (tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC))
        dot = tc * sp_c + tf * sp_f
        inv = 1.0 / (denom * denom)
        d_c = (tc * denom - dot) * inv
        d_f = (tf * denom - dot) * inv
        e_c = tl.exp(tl.minimum(x_c, 20.0))  # softplus' backward (beta 1, threshold 20)
        e_f = tl.exp(tl.minimum(x_f, 20.0))
        tl.store(out_wc_ptr, tl.where(x_c > 20.0, d_c, d_c * e_c / (e_c + 1.0)))
        tl.store(out_wf_ptr, tl.where(x_f > 20.0, d_f, d_f * e_f / (e_f + 1.0)))


def fusion_grads(need, sum_coarse, sum_fine, w_coarse, w_fine, gate_coarse, gate_fine, eps):
    need_wc, need_wf, need_gc, need_gf = need
    # a fresh [0] per gradient not needed: a custom op's outputs may not alias each other
    empty = lambda: sum_coarse.new_empty((0,))  # noqa: E731
    if not any(need):
        return tuple(empty() for _ in range(4))
    acc, nc = sum_coarse.dtype, sum_coarse.numel()
    new = lambda p, shape: sum_coarse.new_empty(shape, dtype=p.dtype)  # noqa: E731
    need_w = need_wc or need_wf  # both weights' gradients come from one program
    grad_wc = new(w_coarse, (1,)) if need_w else None
    grad_wf = new(w_fine, (1,)) if need_w else None
    grad_gc = new(gate_coarse, sum_coarse.shape) if need_gc else None
    grad_gf = new(gate_fine, sum_fine.shape) if need_gf else None
    wc, wf, gc, gf = (to_acc_contiguous(t, acc) for t in (w_coarse, w_fine, gate_coarse,
                                                          gate_fine))
    pick = lambda t: sum_coarse if t is None else t  # noqa: E731
    gate_programs = triton.cdiv(nc, _BLOCK) if need_gc or need_gf else 0
    if gate_programs + int(need_w) > 0:
        with device_guard(sum_coarse):
            _launch(_fusion_grads_kernel, (gate_programs + int(need_w),), sum_coarse, sum_fine,
                    pick(wc), pick(wf), pick(gc), pick(gf), pick(grad_wc), pick(grad_wf),
                    pick(grad_gc), pick(grad_gf), *split_eps(eps), nc, gate_programs,
                    HAS_W=wc is not None, HAS_GC=gc is not None, HAS_GF=gf is not None,
                    NEED_W=need_w, NEED_GC=need_gc, NEED_GF=need_gf, BLOCK=_BLOCK,
                    UNROLL=_UNROLL, ACC=acc_tl_dtype(acc))
    return (grad_wc if need_wc else empty(), grad_wf if need_wf else empty(),
            grad_gc if need_gc else empty(), grad_gf if need_gf else empty())
