// Shared CUDA machinery of csrc/cuda/*.cu:
//   * element conversions and G-wide vector access (load_pack / store_pack);
//   * host helpers: argument checks, the 32/64-bit index decision, vector eligibility, grid sizes;
//   * the fixed-order second stage that sums per-unit partials (deterministic reductions);
//   * the up2 backward (a gather: no atomics), shared by _up2_fuse_bwd (up2_fuse.cu, WITH_FINE)
//     and _up2_fuse_bwd_coarse (lateral.cu, coarse half only).
// Per-element math (bilinear taps, fusion weights) is in litefpn_math.h, shared with the CPU
// kernels. Per-item device code is __host__ __device__ so that it can be checked on the host.
//
// Includes stay light on purpose (c10/cuda, ATen/core, ATen/ops): ATen/cuda/CUDAContext.h pulls
// cuBLAS/cuSPARSE headers that machines without a full CUDA toolkit lack.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <optional>

#include "litefpn_math.h"

namespace litefpn {
namespace gpu {
namespace {  // internal linkage: every .cu gets its own copy, no cross-TU symbol clashes

constexpr int kThreads = 256;  // threads per block of every kernel here
constexpr int kWarp = 32;

// ----------------------------------------------------------------------------- element access
// Accumulation type: float for float / half / bfloat16, double for double.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_of = typename AccOf<T>::type;

template <typename T>
LITEFPN_HD acc_of<T> to_acc(T v) {
  return static_cast<acc_of<T>>(v);
}

// G consecutive elements in one aligned access (G * sizeof(T) <= 16 bytes).
template <typename T, int G>
struct alignas(sizeof(T) * G) Pack {
  T v[G];
};

// out[e] = p[e * stride], e < G; a single G-wide load when `vec` (the caller guarantees
// stride == 1 and alignment, see vec_ok).
template <int G, typename T, typename index_t>
LITEFPN_HD void load_pack(const T* p, index_t stride, bool vec, acc_of<T> (&out)[G]) {
  if (G > 1 && vec) {
    const Pack<T, G> pk = *reinterpret_cast<const Pack<T, G>*>(p);
#pragma unroll
    for (int e = 0; e < G; ++e) out[e] = to_acc(pk.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < G; ++e) out[e] = to_acc(p[e * stride]);
  }
}

template <int G, typename T, typename index_t>
LITEFPN_HD void store_pack(T* p, index_t stride, bool vec, const acc_of<T> (&in)[G]) {
  if (G > 1 && vec) {
    Pack<T, G> pk;
#pragma unroll
    for (int e = 0; e < G; ++e) pk.v[e] = static_cast<T>(in[e]);
    *reinterpret_cast<Pack<T, G>*>(p) = pk;
  } else {
#pragma unroll
    for (int e = 0; e < G; ++e) p[e * stride] = static_cast<T>(in[e]);
  }
}

// A 4-D tensor as the kernels see it: data pointer and element strides.
struct View4 {
  void* data = nullptr;
  int64_t s[4] = {0, 0, 0, 0};
};

// Element (a, b, c, d). With index_t = int32_t the caller has checked that every offset fits
// (each term is at most the tensor's element span, see needs_int64).
template <typename T, typename index_t>
LITEFPN_HD T* at4(const View4& v, index_t a, index_t b, index_t c, index_t d) {
  return static_cast<T*>(v.data) +
         (a * static_cast<index_t>(v.s[0]) + b * static_cast<index_t>(v.s[1]) +
          c * static_cast<index_t>(v.s[2]) + d * static_cast<index_t>(v.s[3]));
}

template <typename index_t>
LITEFPN_HD index_t clamp_idx(index_t v, index_t hi) {
  return v < 0 ? index_t(0) : (v > hi ? hi : v);
}

// ----------------------------------------------------------------------------- fusion scales
// ca[n,c] = alpha * gate_coarse[n,c], cb[n,c] = beta * gate_fine[n,c]. alpha and beta are
// computed on the device from the raw weights (no host sync); absent weights / gates mean 1.
template <typename acc_t>
struct Up2Scales {
  const acc_t* w_coarse = nullptr;     // [1] raw parameter, or null (alpha = beta = 1)
  const acc_t* w_fine = nullptr;       // [1], given iff w_coarse is
  const acc_t* gate_coarse = nullptr;  // [N, C] contiguous, or null
  const acc_t* gate_fine = nullptr;    // [N, C] contiguous, or null
  acc_t eps = 0;

  LITEFPN_HD void weights(acc_t& alpha, acc_t& beta) const {
    alpha = beta = acc_t(1);
    if (w_coarse != nullptr) ::litefpn::fusion_weights<acc_t>(w_coarse[0], w_fine[0], eps, alpha, beta);
  }
  LITEFPN_HD acc_t coarse_scale(acc_t alpha, int64_t nc) const {
    return gate_coarse != nullptr ? alpha * gate_coarse[nc] : alpha;
  }
  LITEFPN_HD acc_t fine_scale(acc_t beta, int64_t nc) const {
    return gate_fine != nullptr ? beta * gate_fine[nc] : beta;
  }
};

// ----------------------------------------------------------------------------- reductions
#if defined(__CUDACC__)
// Sum over the 32 lanes in a fixed tree (lane 0 holds the result): same order every run.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Second stage of every reduction: out[r*cols + c] = sum_{k < nchunks} part[r*s_row + c*s_col +
// k*s_chunk], k in increasing order, so the result is bitwise reproducible.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const acc_t* __restrict__ part, acc_t* __restrict__ out, int64_t rows,
                        int64_t cols, int64_t nchunks, int64_t s_row, int64_t s_col,
                        int64_t s_chunk) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    const acc_t* p = part + r * s_row + c * s_col;
    acc_t s = 0;
    for (int64_t k = 0; k < nchunks; ++k) s += p[k * s_chunk];
    out[i] = s;
  }
}
#endif

// ----------------------------------------------------------------------------- host helpers
using at::Tensor;

inline at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// 64-bit index math is needed when an offset or a count may reach 2^31: the element span
// (largest offset + 1, zero strides included) or the number of elements.
inline bool needs_int64(const Tensor& t) {
  if (!t.defined() || t.numel() == 0) return false;
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  int64_t span = 1;
  for (int64_t d = 0; d < t.dim(); ++d) span += (t.size(d) - 1) * std::abs(t.stride(d));
  return span > kMax || t.numel() > kMax;
}

inline bool any_needs_int64(std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (t != nullptr && needs_int64(*t)) return true;
  return false;
}

// Calls f(int32_t{}) or f(int64_t{}); f picks index_t = decltype(arg).
template <typename F>
void dispatch_index(bool use64, F&& f) {
  if (use64) {
    f(int64_t{});
  } else {
    f(int32_t{});
  }
}

inline View4 view4(const Tensor& t) {
  View4 v;
  if (!t.defined()) return v;
  v.data = const_cast<void*>(t.const_data_ptr());
  for (int d = 0; d < 4; ++d) v.s[d] = t.stride(d);
  return v;
}

// Whether G-element groups starting at multiples of G along dim `dim` can be accessed as single
// aligned G-wide vectors: unit stride along `dim`, every other stride a multiple of G (so each
// group start is aligned like the base) and a G*elem_size-aligned base pointer.
inline bool vec_ok(const Tensor& t, int dim, int G) {
  if (G <= 1 || !t.defined() || t.stride(dim) != 1 || t.size(dim) % G != 0) return false;
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % (uintptr_t(G) * t.element_size()) != 0)
    return false;
  for (int d = 0; d < t.dim(); ++d)
    if (d != dim && t.size(d) > 1 && t.stride(d) % G != 0) return false;
  return true;
}

// Blocks for a grid-stride loop over `work` items of `per_block` each (capped; loops cover the rest).
inline unsigned int grid_for(int64_t work, int64_t per_block) {
  constexpr int64_t kMaxBlocks = int64_t(1) << 24;
  int64_t b = (work + per_block - 1) / per_block;
  if (b < 1) b = 1;
  return static_cast<unsigned int>(b < kMaxBlocks ? b : kMaxBlocks);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The same CUDA device as `ref` (the dispatcher only guarantees that one argument is on CUDA).
inline void check_device(const char* op, const char* name, const Tensor& t, const Tensor& ref) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), op, ": ", name, " must be on ",
              ref.device(), " like the activations, got ", t.device());
}

inline void check_4d(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be a 4-D [N, C, H, W] tensor, got shape ",
              t.sizes());
  TORCH_CHECK(is_supported_dtype(t.scalar_type()), op, ": ", name, " has unsupported dtype ",
              t.scalar_type(), " (expected float16, bfloat16, float32 or float64)");
}

// `fine` is [N, C, 2H, 2W] for `coarse` [N, C, H, W], same dtype and device.
inline void check_up2_pair(const char* op, const char* coarse_name, const Tensor& coarse,
                           const char* fine_name, const Tensor& fine) {
  check_4d(op, coarse_name, coarse);
  check_4d(op, fine_name, fine);
  TORCH_CHECK(coarse.is_cuda(), op, ": ", coarse_name, " must be a CUDA tensor, got ",
              coarse.device());
  check_device(op, fine_name, fine, coarse);
  TORCH_CHECK(fine.scalar_type() == coarse.scalar_type(), op, ": ", fine_name, " has dtype ",
              fine.scalar_type(), " but ", coarse_name, " has dtype ", coarse.scalar_type());
  TORCH_CHECK(fine.size(0) == coarse.size(0) && fine.size(1) == coarse.size(1) &&
                  fine.size(2) == 2 * coarse.size(2) && fine.size(3) == 2 * coarse.size(3),
              op, ": ", fine_name, " must be [N, C, 2H, 2W] for ", coarse_name,
              " [N, C, H, W]; got ", coarse_name, " ", coarse.sizes(), " and ", fine_name, " ",
              fine.sizes());
}

// A small operand the kernels read as a raw contiguous array of the accumulation dtype.
inline void check_small(const char* op, const char* name, const Tensor& t, const Tensor& ref,
                        at::IntArrayRef shape, at::ScalarType acc) {
  check_device(op, name, t, ref);
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must have the accumulation dtype ", acc,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_fusion_params(const char* op, const Tensor& ref, int64_t N, int64_t C,
                                const std::optional<Tensor>& w_coarse,
                                const std::optional<Tensor>& w_fine,
                                const std::optional<Tensor>& gate_coarse,
                                const std::optional<Tensor>& gate_fine) {
  const at::ScalarType acc = acc_scalar_type(ref.scalar_type());
  TORCH_CHECK(w_coarse.has_value() == w_fine.has_value(), op,
              ": w_coarse and w_fine must be given together or both be None");
  if (w_coarse.has_value()) {
    check_small(op, "w_coarse", *w_coarse, ref, {1}, acc);
    check_small(op, "w_fine", *w_fine, ref, {1}, acc);
  }
  if (gate_coarse.has_value()) check_small(op, "gate_coarse", *gate_coarse, ref, {N, C}, acc);
  if (gate_fine.has_value()) check_small(op, "gate_fine", *gate_fine, ref, {N, C}, acc);
}

template <typename acc_t>
Up2Scales<acc_t> make_scales(const std::optional<Tensor>& w_coarse,
                             const std::optional<Tensor>& w_fine,
                             const std::optional<Tensor>& gate_coarse,
                             const std::optional<Tensor>& gate_fine, double eps) {
  Up2Scales<acc_t> s;
  if (w_coarse.has_value()) {
    s.w_coarse = w_coarse->const_data_ptr<acc_t>();
    s.w_fine = w_fine->const_data_ptr<acc_t>();
  }
  if (gate_coarse.has_value()) s.gate_coarse = gate_coarse->const_data_ptr<acc_t>();
  if (gate_fine.has_value()) s.gate_fine = gate_fine->const_data_ptr<acc_t>();
  s.eps = static_cast<acc_t>(eps);
  return s;
}

#if defined(__CUDACC__)
// Fixed-order sum of partials (see sum_partials_kernel) on the current stream.
template <typename acc_t>
void sum_partials(const Tensor& part, const Tensor& out, int64_t rows, int64_t cols,
                  int64_t nchunks, int64_t s_row, int64_t s_col, int64_t s_chunk) {
  if (rows * cols == 0) return;
  sum_partials_kernel<acc_t><<<grid_for(rows * cols, kThreads), kThreads, 0,
                               c10::cuda::getCurrentCUDAStream()>>>(
      part.const_data_ptr<acc_t>(), out.mutable_data_ptr<acc_t>(), rows, cols, nchunks, s_row,
      s_col, s_chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

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
  const index_t nc0 = n * static_cast<index_t>(a.C) + c0;
  acc_t ca[G], cb[G];
#pragma unroll
  for (int e = 0; e < G; ++e) {
    ca[e] = a.sc.coarse_scale(alpha, nc0 + e);
    cb[e] = WITH_FINE ? a.sc.fine_scale(beta, nc0 + e) : acc_t(0);
  }
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
        for (int e = 0; e < G; ++e) gf[e] = cb[e] * v[e];
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
  for (int e = 0; e < G; ++e) gc[e] = ca[e] * acc[e];
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

#if defined(__CUDACC__)
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
template <typename scalar_t, typename index_t, int G, bool WITH_FINE>
__global__ void __launch_bounds__(kThreads)
    up2_bwd_nhwc_kernel(const Up2BwdArgs<scalar_t> a, const int64_t units) {
  using acc_t = acc_of<scalar_t>;
  __shared__ acc_t red[2 * kThreads * G];  // [coarse | fine][pixel lane][channel in tile]
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
#endif  // __CUDACC__

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
  int GC = 1;  // coarse-side group width (plane path); nhwc uses G = 16 bytes of elements
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
  p.nhwc = C > 1 && ref.stride(1) == 1 && C % V == 0;
  p.GC = p.nhwc ? V : (W % (V / 2) == 0 ? V / 2 : 1);
  const int GF = p.nhwc ? V : 2 * p.GC;  // group width on the fine side
  const int vdim = p.nhwc ? 1 : 3;
  a.vec_g = vec_ok(t.grad_out, vdim, GF);
  a.vec_coarse = vec_ok(t.coarse, vdim, p.GC);
  a.vec_gc = vec_ok(t.grad_coarse, vdim, p.GC);
  if (WITH_FINE) {
    a.vec_fine = vec_ok(t.fine, vdim, GF);
    a.vec_gf = vec_ok(t.grad_fine, vdim, GF);
  }
  if (p.nhwc) {
    const int64_t CG = C / V;
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

#if defined(__CUDACC__)
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
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_index(use64, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      constexpr int V = 16 / sizeof(scalar_t);
      constexpr int GCV = V / 2 > 1 ? V / 2 : 1;
      if (p.nhwc) {
        up2_bwd_nhwc_kernel<scalar_t, index_t, V, WITH_FINE>
            <<<grid_for(p.units, 1), kThreads, 0, stream>>>(p.a, p.units);
      } else if (p.GC == GCV) {
        up2_bwd_plane_kernel<scalar_t, index_t, GCV, WITH_FINE>
            <<<grid_for(p.units, kThreads / kWarp), kThreads, 0, stream>>>(p.a, p.units);
      } else {
        up2_bwd_plane_kernel<scalar_t, index_t, 1, WITH_FINE>
            <<<grid_for(p.units, kThreads / kWarp), kThreads, 0, stream>>>(p.a, p.units);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (t.need_sums && p.a.nchunks > 1) {
      const int64_t N = p.a.N, C = p.a.C, K = p.a.nchunks;
      sum_partials<acc_t>(part_c, t.sum_coarse, N, C, K, p.s_row, p.s_col, p.s_chunk);
      if (WITH_FINE) sum_partials<acc_t>(part_f, t.sum_fine, N, C, K, p.s_row, p.s_col, p.s_chunk);
    }
  });
}
#endif  // __CUDACC__

}  // namespace
}  // namespace gpu
}  // namespace litefpn
