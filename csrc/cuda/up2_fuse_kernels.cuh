// litefpn::_up2_fuse_{fwd,bwd,bwd_coarse} on CUDA: kernels, launch plans and the op bodies.
// Compiled by up2_fuse.cu (which registers the ops) and, unchanged, by the host emulation
// (tests/cuda_emu); device.cuh holds the few lines that differ.
//
//   out = ca*Up2(coarse) + cb*fine,  ca = alpha*gate_coarse[n,c],  cb = beta*gate_fine[n,c]
//
// with Up2 = F.interpolate(scale_factor=2, mode="bilinear", align_corners=False), taps from
// litefpn::up2_taps on both axes (all four 2-D taps, combined in eager's order
// wy0*(wx0*v00 + wx1*v01) + wy1*(wx0*v10 + wx1*v11)), and alpha, beta the softplus-normalised
// fusion weights, computed on the device.
//
// Forward paths, chosen by the output's layout (out = empty_like(fine)):
//   plane (W innermost, e.g. contiguous NCHW): a thread writes G consecutive outputs of one fine
//     row; coarse columns come from a small per-thread window, fine / out move as G-wide vectors.
//   nhwc (C innermost, channels_last): a thread writes G consecutive channels of one fine pixel;
//     coarse, fine and out all move as G-wide vectors along C.
// G = 16 bytes' worth of elements where the sizes allow it (else 2 on the plane path, 1 on the
// nhwc path: still coalesced along C); a tensor whose strides or alignment do not allow vectors
// is read element-wise with its own strides, so every layout is correct, and the common ones are
// fast.
//
// The backward is a gather (no atomics, see "up2 backward" below); _up2_fuse_bwd_coarse is its
// coarse half (WITH_FINE = false), used by lateral_up2_fuse's backward.
#pragma once

#include <ATen/ops/empty_like.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cuda/common.cuh"

namespace litefpn {
namespace cuda {
namespace {

template <typename scalar_t>
struct Up2FwdArgs {
  int64_t N = 0, C = 0, H = 0, W = 0;  // coarse sizes; fine and out are [N, C, 2H, 2W]
  View4 coarse, fine, out;
  bool vec_coarse = false, vec_fine = false, vec_out = false;
  Up2Scales<acc_of<scalar_t>> sc;
};

// Plane group g: outputs ox0 .. ox0+G-1 (ox0 = G*k, G even) of fine row oy of plane (n, c).
//
// Horizontal taps (litefpn::up2_taps): ox = 2m+1 reads x[m], x[min(m+1, W-1)]; ox = 2m >= 2
// reads x[m-1], x[m]; ox = 0 reads x[0] (weight 1) and x[min(1, W-1)] (weight 0, as eager: a
// NaN/Inf there reaches out[0]). With base = ox0/2 - 1 and window slot k = column
// clamp(base + k), output e's first tap is slot (e+1)/2 and its second slot (e+1)/2 + 1,
// except e = 0 at ox0 = 0, whose second tap x[min(1, W-1)] is slot 2.
template <int G, typename scalar_t, typename index_t>
LITEFPN_HD void up2_fwd_plane_group(const Up2FwdArgs<scalar_t>& a, index_t g,
                                    acc_of<scalar_t> alpha, acc_of<scalar_t> beta) {
  using acc_t = acc_of<scalar_t>;
  static_assert(G >= 2 && G % 2 == 0, "plane groups hold whole output pairs");
  constexpr int NW = G / 2 + 2;
  const index_t C = a.C, H = a.H, W = a.W, Hf = 2 * H, per_row = 2 * W / G;
  const index_t ox0 = (g % per_row) * G;
  index_t r = g / per_row;
  const index_t oy = r % Hf;
  r /= Hf;
  const index_t c = r % C, n = r / C;

  int64_t y0, y1;
  acc_t wy0, wy1;
  up2_taps<acc_t>(oy, H, y0, y1, wy0, wy1);
  const scalar_t* row0 = at4<const scalar_t>(a.coarse, n, c, static_cast<index_t>(y0), index_t(0));
  const scalar_t* row1 = at4<const scalar_t>(a.coarse, n, c, static_cast<index_t>(y1), index_t(0));
  const index_t csW = static_cast<index_t>(a.coarse.s[3]);
  const index_t base = ox0 / 2 - 1;
  acc_t r0[NW], r1[NW];
#pragma unroll
  for (int k = 0; k < NW; ++k) {
    const index_t x = clamp_idx<index_t>(base + k, W - 1);
    r0[k] = to_acc(row0[x * csW]);
    r1[k] = to_acc(row1[x * csW]);
  }

  acc_t f[G];
  load_pack<G>(at4<const scalar_t>(a.fine, n, c, oy, ox0), static_cast<index_t>(a.fine.s[3]),
               a.vec_fine, f);
  const index_t nc = n * C + c;
  const acc_t ca = a.sc.coarse_scale(alpha, nc), cb = a.sc.fine_scale(beta, nc);
  acc_t o[G];
#pragma unroll
  for (int e = 0; e < G; ++e) {
    int64_t x0, x1;  // only the weights are used; the slots below are these columns
    acc_t wx0, wx1;
    up2_taps<acc_t>(ox0 + e, W, x0, x1, wx0, wx1);
    const int k0 = (e + 1) / 2;  // a compile-time slot once the loop is unrolled
    acc_t a1 = r0[k0 + 1], b1 = r1[k0 + 1];
    if (e == 0 && ox0 == 0) {
      a1 = r0[2];
      b1 = r1[2];
    }
    const acc_t up = wy0 * (wx0 * r0[k0] + wx1 * a1) + wy1 * (wx0 * r1[k0] + wx1 * b1);
    o[e] = ca * up + cb * f[e];
  }
  store_pack<G>(at4<scalar_t>(a.out, n, c, oy, ox0), static_cast<index_t>(a.out.s[3]), a.vec_out,
                o);
}

// NHWC group g: channels c0 .. c0+G-1 of fine pixel (oy, ox) of sample n.
template <int G, typename scalar_t, typename index_t>
LITEFPN_HD void up2_fwd_nhwc_group(const Up2FwdArgs<scalar_t>& a, index_t g,
                                   acc_of<scalar_t> alpha, acc_of<scalar_t> beta) {
  using acc_t = acc_of<scalar_t>;
  const index_t C = a.C, H = a.H, W = a.W, Hf = 2 * H, Wf = 2 * W, CG = C / G;
  const index_t c0 = (g % CG) * G;
  index_t r = g / CG;
  const index_t ox = r % Wf;
  r /= Wf;
  const index_t oy = r % Hf, n = r / Hf;

  int64_t y0, y1, x0, x1;
  acc_t wy0, wy1, wx0, wx1;
  up2_taps<acc_t>(oy, H, y0, y1, wy0, wy1);
  up2_taps<acc_t>(ox, W, x0, x1, wx0, wx1);
  const index_t csC = static_cast<index_t>(a.coarse.s[1]);
  acc_t v00[G], v01[G], v10[G], v11[G], f[G];
  load_pack<G>(at4<const scalar_t>(a.coarse, n, c0, index_t(y0), index_t(x0)), csC, a.vec_coarse, v00);
  load_pack<G>(at4<const scalar_t>(a.coarse, n, c0, index_t(y0), index_t(x1)), csC, a.vec_coarse, v01);
  load_pack<G>(at4<const scalar_t>(a.coarse, n, c0, index_t(y1), index_t(x0)), csC, a.vec_coarse, v10);
  load_pack<G>(at4<const scalar_t>(a.coarse, n, c0, index_t(y1), index_t(x1)), csC, a.vec_coarse, v11);
  load_pack<G>(at4<const scalar_t>(a.fine, n, c0, oy, ox), static_cast<index_t>(a.fine.s[1]),
               a.vec_fine, f);
  const index_t nc0 = n * C + c0;
  acc_t o[G];
#pragma unroll
  for (int e = 0; e < G; ++e) {
    const acc_t up = wy0 * (wx0 * v00[e] + wx1 * v01[e]) + wy1 * (wx0 * v10[e] + wx1 * v11[e]);
    o[e] = a.sc.coarse_scale(alpha, nc0 + e) * up + a.sc.fine_scale(beta, nc0 + e) * f[e];
  }
  store_pack<G>(at4<scalar_t>(a.out, n, c0, oy, ox), static_cast<index_t>(a.out.s[1]), a.vec_out,
                o);
}

template <typename scalar_t, typename index_t, int G, bool NHWC>
__global__ void __launch_bounds__(kThreads)
    up2_fwd_kernel(const Up2FwdArgs<scalar_t> a, const int64_t groups) {
  acc_of<scalar_t> alpha, beta;
  a.sc.weights(alpha, beta);
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups;
       g += int64_t(gridDim.x) * blockDim.x) {
    if constexpr (NHWC) {
      up2_fwd_nhwc_group<G, scalar_t, index_t>(a, static_cast<index_t>(g), alpha, beta);
    } else {
      up2_fwd_plane_group<G, scalar_t, index_t>(a, static_cast<index_t>(g), alpha, beta);
    }
  }
}

// ----------------------------------------------------------------------------- forward plan
void check_common(const char* op, const Tensor& coarse, const Tensor& fine,
                  const std::optional<Tensor>& w_coarse, const std::optional<Tensor>& w_fine,
                  const std::optional<Tensor>& gate_coarse,
                  const std::optional<Tensor>& gate_fine) {
  check_up2_pair(op, "coarse", coarse, "fine", fine);
  check_fusion_params(op, coarse, coarse.size(0), coarse.size(1), w_coarse, w_fine, gate_coarse,
                      gate_fine);
}

// Path and group width of a forward; G elements per thread (16 bytes' worth where possible).
template <typename scalar_t>
struct Up2FwdPlan {
  Up2FwdArgs<scalar_t> a;
  bool nhwc = false;
  int G = 2;
  int64_t groups = 0;
};

template <typename scalar_t>
Up2FwdPlan<scalar_t> plan_up2_fwd(const Tensor& coarse, const Tensor& fine, const Tensor& out,
                                  const std::optional<Tensor>& w_coarse,
                                  const std::optional<Tensor>& w_fine,
                                  const std::optional<Tensor>& gate_coarse,
                                  const std::optional<Tensor>& gate_fine, double eps) {
  constexpr int V = 16 / sizeof(scalar_t);  // elements per 16-byte vector
  Up2FwdPlan<scalar_t> p;
  Up2FwdArgs<scalar_t>& a = p.a;
  a.N = coarse.size(0);
  a.C = coarse.size(1);
  a.H = coarse.size(2);
  a.W = coarse.size(3);
  a.coarse = view4(coarse);
  a.fine = view4(fine);
  a.out = view4(out);
  a.sc = make_scales<acc_of<scalar_t>>(w_coarse, w_fine, gate_coarse, gate_fine, eps);
  // Channels innermost -> nhwc, with 16-byte groups where C allows, else one channel per thread
  // (still coalesced along C; the plane path would walk W with stride C, audit F10a).
  p.nhwc = a.C > 1 && out.stride(1) == 1;
  p.G = p.nhwc ? (a.C % V == 0 ? V : 1) : ((2 * a.W) % V == 0 ? V : 2);
  const int vdim = p.nhwc ? 1 : 3;
  a.vec_coarse = p.nhwc && vec_ok(coarse, vdim, p.G);  // the plane path reads coarse element-wise
  a.vec_fine = vec_ok(fine, vdim, p.G);
  a.vec_out = vec_ok(out, vdim, p.G);
  p.groups = out.numel() / p.G;
  return p;
}

// ============================================================================= up2 backward
// grad_fine = cb*g; grad_coarse = ca*Up2^T(g) as a gather: coarse (i, j) collects the fine rows
// and columns of litefpn::up2_gather_taps (clamp(2i-1), 2i, 2i+1, clamp(2i+2); 1/4, 3/4, 3/4,
// 1/4). Each item owns whole coarse elements and the 2x2 fine block under them (rows 2i, 2i+1 =
// taps 1 and 2), so grad_fine and sum_fine come from the same pass. With need_sums:
//   sum_coarse[n,c] = sum coarse * Up2^T(g),  sum_fine[n,c] = sum g * fine  (unscaled).
// Paths, chosen by the layout of the fine-side output:
//   plane (W innermost): a warp per unit = (n, c, run of coarse rows); an item is GC coarse
//     columns of one row (2*GC fine columns, vector loads along W); warp-shuffle sums.
//   nhwc (C innermost):  a block per unit = (n, run of coarse pixels, channel tile); an item is
//     one coarse pixel x G channels (vector loads along C); shared-memory sums.
// Unit sums go to part_* (indexed by unit; the sums themselves when there is one chunk), and a
// second kernel adds the chunks in order: no atomics, bitwise reproducible.
template <typename scalar_t>
struct Up2BwdArgs {
  using acc_t = acc_of<scalar_t>;
  int64_t N = 0, C = 0, H = 0, W = 0;  // coarse sizes; grad_out is [N, C, 2H, 2W]
  View4 grad_out, coarse, fine, grad_coarse, grad_fine;  // fine-side ones unused without fine
  bool vec_g = false, vec_coarse = false, vec_fine = false, vec_gc = false, vec_gf = false;
  Up2Scales<acc_t> sc;
  bool need_sums = false;
  acc_t* part_coarse = nullptr;  // plane: [N*C][nchunks]; nhwc: [N][nchunks][C]
  acc_t* part_fine = nullptr;
  int64_t chunk = 1, nchunks = 1;  // coarse rows (plane) / coarse pixels (nhwc) per unit
  int ctile = 1, ptile = 1;        // nhwc: channel groups and pixel lanes per block
  int64_t ctiles = 1;              // nhwc: channel tiles
};

// Plane item: coarse row i, columns j0 .. j0+GC-1 of plane (n, c). The fine columns read are
// 2*j0-1 .. 2*j0+2*GC (clamped): the window `win`, whose middle 2*GC are the item's own.
template <int GC, bool WITH_FINE, typename scalar_t, typename index_t>
LITEFPN_HD void up2_bwd_plane_item(const Up2BwdArgs<scalar_t>& a, index_t n, index_t c, index_t i,
                                   index_t j0, acc_of<scalar_t> ca, acc_of<scalar_t> cb,
                                   acc_of<scalar_t>& sum_c, acc_of<scalar_t>& sum_f) {
  using acc_t = acc_of<scalar_t>;
  constexpr int GF = 2 * GC;  // own fine columns
  constexpr int NW = GF + 2;  // + one halo column each side
  const index_t Wf = 2 * static_cast<index_t>(a.W);
  int64_t rows[kGatherTaps], cols[kGatherTaps];
  acc_t wr[kGatherTaps], wc[kGatherTaps];
  up2_gather_taps<acc_t>(i, a.H, rows, wr);
  up2_gather_taps<acc_t>(j0, a.W, cols, wc);  // only the weights: equal for every column
  // Window slot s holds fine column clamp(2*j0 - 1 + s); for coarse column j0+e the taps
  // clamp(2j-1), 2j, 2j+1, clamp(2j+2) are slots 2e, 2e+1, 2e+2, 2e+3.
  const index_t x_lo = clamp_idx<index_t>(2 * j0 - 1, Wf - 1);
  const index_t x_hi = clamp_idx<index_t>(2 * j0 + GF, Wf - 1);
  const index_t gsW = static_cast<index_t>(a.grad_out.s[3]);
  acc_t acc[GC];
#pragma unroll
  for (int e = 0; e < GC; ++e) acc[e] = acc_t(0);
#pragma unroll
  for (int t = 0; t < kGatherTaps; ++t) {
    const index_t y = static_cast<index_t>(rows[t]);
    const scalar_t* grow = at4<const scalar_t>(a.grad_out, n, c, y, index_t(0));
    acc_t win[NW];
    acc_t mid[GF];
    load_pack<GF>(grow + 2 * j0 * gsW, gsW, a.vec_g, mid);
    win[0] = to_acc(grow[x_lo * gsW]);
#pragma unroll
    for (int e = 0; e < GF; ++e) win[1 + e] = mid[e];
    win[NW - 1] = to_acc(grow[x_hi * gsW]);
#pragma unroll
    for (int e = 0; e < GC; ++e) {
      const acc_t h = wc[0] * win[2 * e] + wc[1] * win[2 * e + 1] + wc[2] * win[2 * e + 2] +
                      wc[3] * win[2 * e + 3];
      acc[e] += wr[t] * h;
    }
    if (WITH_FINE && (t == 1 || t == 2)) {  // own fine rows 2i, 2i+1 (never clamped)
      acc_t gf[GF];
#pragma unroll
      for (int e = 0; e < GF; ++e) gf[e] = cb * mid[e];
      store_pack<GF>(at4<scalar_t>(a.grad_fine, n, c, y, 2 * j0),
                     static_cast<index_t>(a.grad_fine.s[3]), a.vec_gf, gf);
      if (a.need_sums) {
        acc_t f[GF];
        load_pack<GF>(at4<const scalar_t>(a.fine, n, c, y, 2 * j0),
                      static_cast<index_t>(a.fine.s[3]), a.vec_fine, f);
#pragma unroll
        for (int e = 0; e < GF; ++e) sum_f += mid[e] * f[e];
      }
    }
  }
  acc_t gc[GC];
#pragma unroll
  for (int e = 0; e < GC; ++e) gc[e] = ca * acc[e];
  store_pack<GC>(at4<scalar_t>(a.grad_coarse, n, c, i, j0),
                 static_cast<index_t>(a.grad_coarse.s[3]), a.vec_gc, gc);
  if (a.need_sums) {
    acc_t x[GC];
    load_pack<GC>(at4<const scalar_t>(a.coarse, n, c, i, j0), static_cast<index_t>(a.coarse.s[3]),
                  a.vec_coarse, x);
#pragma unroll
    for (int e = 0; e < GC; ++e) sum_c += x[e] * acc[e];
  }
}

// NHWC item: coarse pixel (i, j), channels c0 .. c0+G-1 of sample n; 4x4 gathered fine pixels,
// of which the middle 2x2 (taps 1, 2 on both axes) are the item's own.
template <int G, bool WITH_FINE, typename scalar_t, typename index_t>
LITEFPN_HD void up2_bwd_nhwc_item(const Up2BwdArgs<scalar_t>& a, index_t n, index_t i, index_t j,
                                  index_t c0, acc_of<scalar_t> alpha, acc_of<scalar_t> beta,
                                  acc_of<scalar_t> (&sum_c)[G], acc_of<scalar_t> (&sum_f)[G]) {
  using acc_t = acc_of<scalar_t>;
  int64_t rows[kGatherTaps], cols[kGatherTaps];
  acc_t wr[kGatherTaps], wc[kGatherTaps];
  up2_gather_taps<acc_t>(i, a.H, rows, wr);
  up2_gather_taps<acc_t>(j, a.W, cols, wc);
  // the per-channel scales are read where used (L1 hits), not held in 2*G registers (F8)
  const index_t nc0 = n * static_cast<index_t>(a.C) + c0;
  const index_t gsC = static_cast<index_t>(a.grad_out.s[1]);
  acc_t acc[G];
#pragma unroll
  for (int e = 0; e < G; ++e) acc[e] = acc_t(0);
#pragma unroll
  for (int t = 0; t < kGatherTaps; ++t) {
    const index_t y = static_cast<index_t>(rows[t]);
    acc_t h[G];
#pragma unroll
    for (int e = 0; e < G; ++e) h[e] = acc_t(0);
#pragma unroll
    for (int u = 0; u < kGatherTaps; ++u) {
      const index_t x = static_cast<index_t>(cols[u]);
      acc_t v[G];
      load_pack<G>(at4<const scalar_t>(a.grad_out, n, c0, y, x), gsC, a.vec_g, v);
#pragma unroll
      for (int e = 0; e < G; ++e) h[e] += wc[u] * v[e];
      if (WITH_FINE && (t == 1 || t == 2) && (u == 1 || u == 2)) {  // own fine pixel
        acc_t gf[G];
#pragma unroll
        for (int e = 0; e < G; ++e) gf[e] = a.sc.fine_scale(beta, nc0 + e) * v[e];
        store_pack<G>(at4<scalar_t>(a.grad_fine, n, c0, y, x),
                      static_cast<index_t>(a.grad_fine.s[1]), a.vec_gf, gf);
        if (a.need_sums) {
          acc_t f[G];
          load_pack<G>(at4<const scalar_t>(a.fine, n, c0, y, x), static_cast<index_t>(a.fine.s[1]),
                       a.vec_fine, f);
#pragma unroll
          for (int e = 0; e < G; ++e) sum_f[e] += v[e] * f[e];
        }
      }
    }
#pragma unroll
    for (int e = 0; e < G; ++e) acc[e] += wr[t] * h[e];
  }
  acc_t gc[G];
#pragma unroll
  for (int e = 0; e < G; ++e) gc[e] = a.sc.coarse_scale(alpha, nc0 + e) * acc[e];
  store_pack<G>(at4<scalar_t>(a.grad_coarse, n, c0, i, j), static_cast<index_t>(a.grad_coarse.s[1]),
                a.vec_gc, gc);
  if (a.need_sums) {
    acc_t x[G];
    load_pack<G>(at4<const scalar_t>(a.coarse, n, c0, i, j), static_cast<index_t>(a.coarse.s[1]),
                 a.vec_coarse, x);
#pragma unroll
    for (int e = 0; e < G; ++e) sum_c[e] += x[e] * acc[e];
  }
}

// Plane unit u = (n*C + c)*nchunks + chunk: a run of `chunk` coarse rows of plane (n, c), one
// warp; lane `lane` takes items lane, lane+32, ... in order and adds to sum_c / sum_f.
template <int GC, bool WITH_FINE, typename scalar_t, typename index_t>
LITEFPN_HD void up2_bwd_plane_unit(const Up2BwdArgs<scalar_t>& a, int64_t u, int lane,
                                   acc_of<scalar_t> alpha, acc_of<scalar_t> beta,
                                   acc_of<scalar_t>& sum_c, acc_of<scalar_t>& sum_f) {
  using acc_t = acc_of<scalar_t>;
  const index_t C = static_cast<index_t>(a.C), H = static_cast<index_t>(a.H);
  const index_t per_row = static_cast<index_t>(a.W / GC), rows = static_cast<index_t>(a.chunk);
  const index_t nc = static_cast<index_t>(u / a.nchunks);
  const index_t chunk = static_cast<index_t>(u % a.nchunks);
  const index_t n = nc / C, c = nc % C;
  const index_t i_begin = chunk * rows;
  const index_t i_end = i_begin + rows < H ? i_begin + rows : H;
  const index_t items = (i_end - i_begin) * per_row;
  const acc_t ca = a.sc.coarse_scale(alpha, nc);
  const acc_t cb = WITH_FINE ? a.sc.fine_scale(beta, nc) : acc_t(0);
  for (index_t q = lane; q < items; q += kWarp)
    up2_bwd_plane_item<GC, WITH_FINE, scalar_t, index_t>(a, n, c, i_begin + q / per_row,
                                                         (q % per_row) * GC, ca, cb, sum_c, sum_f);
}

// NHWC unit u = (n*nchunks + chunk)*ctiles + ct: coarse pixels [chunk*a.chunk, +a.chunk) of
// sample n, channel groups [ct*ctile, +ctile). Thread (pixel lane pl, channel group cgl) takes
// pixels pl, pl+ptile, ... in order and adds to its G channels' sums.
struct NhwcUnit {
  int64_t n, chunk, ct;
};

LITEFPN_HD NhwcUnit nhwc_unit(int64_t u, int64_t nchunks, int64_t ctiles) {
  const int64_t rest = u / ctiles;
  return {rest / nchunks, rest % nchunks, u % ctiles};
}

template <int G, bool WITH_FINE, typename scalar_t, typename index_t>
LITEFPN_HD void up2_bwd_nhwc_thread(const Up2BwdArgs<scalar_t>& a, const NhwcUnit& un, int pl,
                                    int cgl, acc_of<scalar_t> alpha, acc_of<scalar_t> beta,
                                    acc_of<scalar_t> (&sum_c)[G], acc_of<scalar_t> (&sum_f)[G]) {
  const index_t W = static_cast<index_t>(a.W), HW = static_cast<index_t>(a.H) * W;
  const index_t cg = static_cast<index_t>(un.ct) * a.ctile + cgl;
  if (pl >= a.ptile || cg >= static_cast<index_t>(a.C / G)) return;
  const index_t q_begin = static_cast<index_t>(un.chunk * a.chunk);
  const index_t q_end = q_begin + a.chunk < HW ? q_begin + static_cast<index_t>(a.chunk) : HW;
  for (index_t q = q_begin + pl; q < q_end; q += a.ptile)
    up2_bwd_nhwc_item<G, WITH_FINE, scalar_t, index_t>(a, static_cast<index_t>(un.n), q / W, q % W,
                                                       cg * G, alpha, beta, sum_c, sum_f);
}

// Index of channel ch of nhwc unit `un` in the partials ([N][nchunks][C]).
LITEFPN_HD int64_t nhwc_part_index(int64_t nchunks, int64_t C, const NhwcUnit& un, int64_t ch) {
  return (un.n * nchunks + un.chunk) * C + ch;
}

template <typename scalar_t, typename index_t, int GC, bool WITH_FINE>
__global__ void __launch_bounds__(kThreads)
    up2_bwd_plane_kernel(const Up2BwdArgs<scalar_t> a, const int64_t units) {
  using acc_t = acc_of<scalar_t>;
  acc_t alpha, beta;
  a.sc.weights(alpha, beta);
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_block = blockDim.x / kWarp;
  // u is uniform across the warp, so every lane reaches warp_sum.
  for (int64_t u = blockIdx.x * warps_per_block + threadIdx.x / kWarp; u < units;
       u += int64_t(gridDim.x) * warps_per_block) {
    acc_t sum_c = 0, sum_f = 0;
    up2_bwd_plane_unit<GC, WITH_FINE, scalar_t, index_t>(a, u, lane, alpha, beta, sum_c, sum_f);
    if (a.need_sums) {
      sum_c = warp_sum(sum_c);
      if (WITH_FINE) sum_f = warp_sum(sum_f);
      if (lane == 0) {
        a.part_coarse[u] = sum_c;
        if (WITH_FINE) a.part_fine[u] = sum_f;
      }
    }
  }
}

// A block per nhwc unit; the threads' sums are combined across pixel lanes in shared memory, in
// lane order (fixed).
// (No minimum-blocks bound: __launch_bounds__(256, 3), i.e. <= 80 registers for 37.5%, spills
// 12-328 bytes in the G = V instantiations with nvcc 13.0; see tests/gpu/static_resources.py.)
template <typename scalar_t, typename index_t, int G, bool WITH_FINE>
__global__ void __launch_bounds__(kThreads)
    up2_bwd_nhwc_kernel(const Up2BwdArgs<scalar_t> a, const int64_t units) {
  using acc_t = acc_of<scalar_t>;
  LITEFPN_SHARED(red, acc_t[2 * kThreads * G]);  // [coarse | fine][pixel lane][channel in tile]
  acc_t alpha, beta;
  a.sc.weights(alpha, beta);
  const int Pt = a.ptile, slots = a.ctile * G;
  const int cgl = threadIdx.x % a.ctile, pl = threadIdx.x / a.ctile;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {  // uniform across the block
    const NhwcUnit un = nhwc_unit(u, a.nchunks, a.ctiles);
    acc_t sum_c[G], sum_f[G];
#pragma unroll
    for (int e = 0; e < G; ++e) sum_c[e] = sum_f[e] = acc_t(0);
    up2_bwd_nhwc_thread<G, WITH_FINE, scalar_t, index_t>(a, un, pl, cgl, alpha, beta, sum_c, sum_f);
    if (!a.need_sums) continue;  // uniform
    if (pl < Pt) {
#pragma unroll
      for (int e = 0; e < G; ++e) {
        red[pl * slots + cgl * G + e] = sum_c[e];
        red[(Pt + pl) * slots + cgl * G + e] = sum_f[e];
      }
    }
    __syncthreads();
    for (int r = threadIdx.x; r < (WITH_FINE ? 2 : 1) * slots; r += blockDim.x) {
      const int s = r / slots, ce = r % slots;
      const int64_t ch = un.ct * slots + ce;
      if (ch < a.C) {
        acc_t tot = 0;
        for (int p = 0; p < Pt; ++p) tot += red[(s * Pt + p) * slots + ce];
        (s == 0 ? a.part_coarse : a.part_fine)[nhwc_part_index(a.nchunks, a.C, un, ch)] = tot;
      }
    }
    __syncthreads();  // `red` is rewritten by the next unit
  }
}

// ----------------------------------------------------------------------------- up2 bwd host
// Tensors of one up2 backward. Without `fine` (WITH_FINE = false) only grad_coarse / sum_coarse.
struct Up2BwdTensors {
  Tensor grad_out, coarse, fine, grad_coarse, grad_fine, sum_coarse, sum_fine;
  std::optional<Tensor> w_coarse, w_fine, gate_coarse, gate_fine;
  double eps = 0;
  bool need_sums = false;
};

// Path, group widths and units of an up2 backward; partial sums of unit chunks live at
// part[row*s_row + col*s_col + chunk*s_chunk] for (row, col) = (n, c).
template <typename scalar_t>
struct Up2BwdPlan {
  Up2BwdArgs<scalar_t> a;  // part_* left null
  bool nhwc = false;
  int GC = 1;  // coarse-side group width (plane path); nhwc: G = 16 bytes of elements, or 1
  int64_t units = 0;
  int64_t s_row = 0, s_col = 0, s_chunk = 0;
};

template <typename scalar_t, bool WITH_FINE>
Up2BwdPlan<scalar_t> plan_up2_bwd(const Up2BwdTensors& t) {
  using acc_t = acc_of<scalar_t>;
  constexpr int V = 16 / sizeof(scalar_t);  // elements per 16-byte vector
  const int64_t N = t.coarse.size(0), C = t.coarse.size(1), H = t.coarse.size(2),
                W = t.coarse.size(3);
  Up2BwdPlan<scalar_t> p;
  Up2BwdArgs<scalar_t>& a = p.a;
  a.N = N;
  a.C = C;
  a.H = H;
  a.W = W;
  a.grad_out = view4(t.grad_out);
  a.coarse = view4(t.coarse);
  a.grad_coarse = view4(t.grad_coarse);
  if (WITH_FINE) {
    a.fine = view4(t.fine);
    a.grad_fine = view4(t.grad_fine);
  }
  a.sc = make_scales<acc_t>(t.w_coarse, t.w_fine, t.gate_coarse, t.gate_fine, t.eps);
  a.need_sums = t.need_sums;
  // The output whose layout sets the path: channels innermost -> nhwc, else plane.
  const Tensor& ref = WITH_FINE ? t.grad_fine : t.grad_out;
  // (nhwc with one channel per thread when C is not a multiple of V: coalesced along C, F10a)
  p.nhwc = C > 1 && ref.stride(1) == 1;
  p.GC = p.nhwc ? (C % V == 0 ? V : 1) : (W % (V / 2) == 0 ? V / 2 : 1);
  const int GF = p.nhwc ? p.GC : 2 * p.GC;  // group width on the fine side
  const int vdim = p.nhwc ? 1 : 3;
  a.vec_g = vec_ok(t.grad_out, vdim, GF);
  a.vec_coarse = vec_ok(t.coarse, vdim, p.GC);
  a.vec_gc = vec_ok(t.grad_coarse, vdim, p.GC);
  if (WITH_FINE) {
    a.vec_fine = vec_ok(t.fine, vdim, GF);
    a.vec_gf = vec_ok(t.grad_fine, vdim, GF);
  }
  if (p.nhwc) {
    const int64_t CG = C / p.GC;
    a.ctile = static_cast<int>(CG < kWarp ? CG : kWarp);
    a.ptile = kThreads / a.ctile;
    a.ctiles = ceil_div(CG, a.ctile);
    a.chunk = int64_t(a.ptile) * 4;  // ~4 coarse pixels per thread
    a.nchunks = ceil_div(H * W, a.chunk);
    p.units = N * a.nchunks * a.ctiles;
    p.s_row = a.nchunks * C;  // [N][nchunks][C]
    p.s_col = 1;
    p.s_chunk = C;
  } else {
    constexpr int64_t kItemsPerWarp = 4 * kWarp;  // ~4 items per lane
    const int64_t per_row = W / p.GC;
    a.chunk = std::min<int64_t>(std::max<int64_t>(ceil_div(kItemsPerWarp, per_row), 1), H);
    a.nchunks = ceil_div(H, a.chunk);
    p.units = N * C * a.nchunks;
    p.s_row = C * a.nchunks;  // [N][C][nchunks]
    p.s_col = a.nchunks;
    p.s_chunk = 1;
  }
  return p;
}

// Fills t.grad_coarse (+ t.grad_fine) and, with need_sums, t.sum_coarse (+ t.sum_fine), [N, C].
// Shapes and devices are checked by the caller; runs on the current stream.
template <bool WITH_FINE>
void up2_bwd_launch(const Up2BwdTensors& t) {
  if (t.grad_coarse.numel() == 0) return;
  const bool use64 = any_needs_int64({&t.grad_out, &t.coarse, &t.fine, &t.grad_coarse,
                                      &t.grad_fine});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.coarse.scalar_type(), "up2_bwd", [&] {
    using acc_t = acc_of<scalar_t>;
    Up2BwdPlan<scalar_t> p = plan_up2_bwd<scalar_t, WITH_FINE>(t);
    // Per-unit partials; with one chunk per (n, c) they are the sums themselves.
    Tensor part_c, part_f;
    if (t.need_sums) {
      if (p.a.nchunks == 1) {
        part_c = t.sum_coarse;
        part_f = t.sum_fine;
      } else {
        part_c = at::empty({t.sum_coarse.numel() * p.a.nchunks}, t.sum_coarse.options());
        if (WITH_FINE) part_f = at::empty_like(part_c);
      }
      p.a.part_coarse = part_c.mutable_data_ptr<acc_t>();
      if (WITH_FINE) p.a.part_fine = part_f.mutable_data_ptr<acc_t>();
    }
    dispatch_index(use64, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      constexpr int V = 16 / sizeof(scalar_t);
      constexpr int GCV = V / 2 > 1 ? V / 2 : 1;
      if (p.nhwc && p.GC == V) {
        launch<up2_bwd_nhwc_kernel<scalar_t, index_t, V, WITH_FINE>>(grid_for(p.units, 1), kThreads,
                                                                     p.a, p.units);
      } else if (p.nhwc) {
        launch<up2_bwd_nhwc_kernel<scalar_t, index_t, 1, WITH_FINE>>(grid_for(p.units, 1), kThreads,
                                                                     p.a, p.units);
      } else if (p.GC == GCV) {
        launch<up2_bwd_plane_kernel<scalar_t, index_t, GCV, WITH_FINE>>(
            grid_for(p.units, kThreads / kWarp), kThreads, p.a, p.units);
      } else {
        launch<up2_bwd_plane_kernel<scalar_t, index_t, 1, WITH_FINE>>(
            grid_for(p.units, kThreads / kWarp), kThreads, p.a, p.units);
      }
    });
    if (t.need_sums && p.a.nchunks > 1) {
      const int64_t N = p.a.N, C = p.a.C, K = p.a.nchunks;
      sum_partials<acc_t>(part_c, t.sum_coarse, N, C, K, p.s_row, p.s_col, p.s_chunk);
      if (WITH_FINE) sum_partials<acc_t>(part_f, t.sum_fine, N, C, K, p.s_row, p.s_col, p.s_chunk);
    }
  });
}

// ============================================================================= ops
Tensor up2_fuse_fwd_cuda(const Tensor& coarse, const Tensor& fine,
                         const std::optional<Tensor>& w_coarse,
                         const std::optional<Tensor>& w_fine,
                         const std::optional<Tensor>& gate_coarse,
                         const std::optional<Tensor>& gate_fine, double eps) {
  constexpr const char* op = "_up2_fuse_fwd";
  check_common(op, coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine);
  const DeviceGuard guard(fine.device());
  Tensor out = at::empty_like(fine);
  if (out.numel() == 0) return out;
  const bool use64 = any_needs_int64({&coarse, &fine, &out});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fine.scalar_type(), op, [&] {
    const Up2FwdPlan<scalar_t> p =
        plan_up2_fwd<scalar_t>(coarse, fine, out, w_coarse, w_fine, gate_coarse, gate_fine, eps);
    const unsigned int blocks = grid_for(p.groups, kThreads);
    dispatch_index(use64, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      constexpr int V = 16 / sizeof(scalar_t);
      if (p.nhwc && p.G == V) {
        launch<up2_fwd_kernel<scalar_t, index_t, V, true>>(blocks, kThreads, p.a, p.groups);
      } else if (p.nhwc) {
        launch<up2_fwd_kernel<scalar_t, index_t, 1, true>>(blocks, kThreads, p.a, p.groups);
      } else if (p.G == V) {
        launch<up2_fwd_kernel<scalar_t, index_t, V, false>>(blocks, kThreads, p.a, p.groups);
      } else {
        launch<up2_fwd_kernel<scalar_t, index_t, 2, false>>(blocks, kThreads, p.a, p.groups);
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> up2_fuse_bwd_cuda(
    const Tensor& grad_out, const Tensor& coarse, const Tensor& fine,
    const std::optional<Tensor>& w_coarse, const std::optional<Tensor>& w_fine,
    const std::optional<Tensor>& gate_coarse, const std::optional<Tensor>& gate_fine, double eps,
    bool need_sums) {
  constexpr const char* op = "_up2_fuse_bwd";
  check_common(op, coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine);
  check_device(op, "grad_out", grad_out, coarse);
  TORCH_CHECK(grad_out.sizes() == fine.sizes(), op, ": grad_out must have fine's shape ",
              fine.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == fine.scalar_type(), op,
              ": grad_out must have fine's dtype ", fine.scalar_type(), ", got ",
              grad_out.scalar_type());
  const DeviceGuard guard(fine.device());
  const int64_t N = coarse.size(0), C = coarse.size(1);
  const std::vector<int64_t> sum_shape =
      need_sums ? std::vector<int64_t>{N, C} : std::vector<int64_t>{0};
  Up2BwdTensors t;
  t.grad_out = grad_out;
  t.coarse = coarse;
  t.fine = fine;
  t.grad_coarse = at::empty_like(coarse);
  t.grad_fine = at::empty_like(fine);
  t.sum_coarse = at::empty(sum_shape, fine.options().dtype(acc_scalar_type(fine.scalar_type())));
  t.sum_fine = at::empty_like(t.sum_coarse);
  t.w_coarse = w_coarse;
  t.w_fine = w_fine;
  t.gate_coarse = gate_coarse;
  t.gate_fine = gate_fine;
  t.eps = eps;
  t.need_sums = need_sums;
  if (fine.numel() == 0) {  // nothing to gather: zero gradients and sums
    t.grad_coarse.zero_();
    t.grad_fine.zero_();
    t.sum_coarse.zero_();
    t.sum_fine.zero_();
  } else {
    up2_bwd_launch</*WITH_FINE=*/true>(t);
  }
  return {t.grad_coarse, t.grad_fine, t.sum_coarse, t.sum_fine};
}

std::tuple<Tensor, Tensor> up2_fuse_bwd_coarse_cuda(const Tensor& grad_out, const Tensor& coarse,
                                                    const std::optional<Tensor>& w_coarse,
                                                    const std::optional<Tensor>& w_fine,
                                                    const std::optional<Tensor>& gate_coarse, double eps,
                                                    bool need_sum) {
  constexpr const char* op = "_up2_fuse_bwd_coarse";
  check_up2_pair(op, "coarse", coarse, "grad_out", grad_out);
  check_fusion_params(op, coarse, coarse.size(0), coarse.size(1), w_coarse, w_fine, gate_coarse,
                      std::nullopt);
  const DeviceGuard guard(coarse.device());
  const std::vector<int64_t> sum_shape =
      need_sum ? std::vector<int64_t>{coarse.size(0), coarse.size(1)} : std::vector<int64_t>{0};
  Up2BwdTensors t;
  t.grad_out = grad_out;
  t.coarse = coarse;
  t.grad_coarse = at::empty_like(coarse);
  t.sum_coarse = at::empty(sum_shape, coarse.options().dtype(acc_scalar_type(coarse.scalar_type())));
  t.w_coarse = w_coarse;
  t.w_fine = w_fine;
  t.gate_coarse = gate_coarse;
  t.eps = eps;
  t.need_sums = need_sum;
  if (coarse.numel() == 0) {
    t.sum_coarse.zero_();
  } else {
    up2_bwd_launch</*WITH_FINE=*/false>(t);
  }
  return {t.grad_coarse, t.sum_coarse};
}

}  // namespace
}  // namespace cuda
}  // namespace litefpn
