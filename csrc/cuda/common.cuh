// Helpers shared by the CUDA ops (up2_fuse.cu, lateral_up2_fuse.cu), and nothing op-specific:
//   * element conversions and G-wide vector access (load_pack / store_pack);
//   * host helpers: argument checks, the 32/64-bit index decision, vector eligibility, grid sizes;
//   * the fixed-order second stage that sums per-unit partials (deterministic reductions).
// Per-element math (bilinear taps, fusion weights) is in litefpn_math.h, shared with the CPU
// kernels. Launch, stream, device guard and __shared__ declarations come from device.cuh, so the
// same device code also builds on the host (tests/cuda_emu) for contract and sanitizer tests.
//
// Includes stay light on purpose (c10/cuda, ATen/core, ATen/ops): ATen/cuda/CUDAContext.h pulls
// cuBLAS/cuSPARSE headers that machines without a full CUDA toolkit lack.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <optional>

#include "cuda/device.cuh"
#include "litefpn_math.h"

namespace litefpn {
namespace cuda {
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

// The machine word of a G-element pack (CUDA's built-in vector types; runtime.h mirrors them
// in the host emulation). Vector stores go through store_word (device.cuh): nvcc splits a plain
// 16-byte store into scalar stores in the 64-bit index instantiations (audit F5).
template <int Bytes>
struct PackWord;
template <>
struct PackWord<16> {
  using type = uint4;
};
template <>
struct PackWord<8> {
  using type = uint2;
};
template <>
struct PackWord<4> {
  using type = unsigned int;
};
template <>
struct PackWord<2> {
  using type = unsigned short;
};

template <int G, typename T, typename index_t>
LITEFPN_HD void store_pack(T* p, index_t stride, bool vec, const acc_of<T> (&in)[G]) {
  if (G > 1 && vec) {
    union {
      Pack<T, G> pk;
      typename PackWord<sizeof(Pack<T, G>)>::type w;
    } u;
#pragma unroll
    for (int e = 0; e < G; ++e) u.pk.v[e] = static_cast<T>(in[e]);
    store_word(reinterpret_cast<typename PackWord<sizeof(Pack<T, G>)>::type*>(p), u.w);
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
// Sum over the 32 lanes in a fixed tree (lane 0 holds the result): same order every run.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Second stage of every reduction: out[r*cols + c] = sum_{k < nchunks} part[r*s_row + c*s_col +
// k*s_chunk], k in increasing order, so the result is bitwise reproducible. A thread per output:
// for many outputs over few partials (gram, up2_fuse's [N, C] sums).
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

// The same sums for few outputs over many partials (bn_silu: C outputs of N * chunks partials
// each, where a thread per output ran 4 x 370 us per training step on an H200 at batch 64): a
// block per output; thread t adds k = t, t + kThreads, ... in order, then the block's threads
// are added in a fixed tree (each warp's, then warp 0 over the warps'): bitwise reproducible,
// though rounded unlike the serial order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sum_partials_wide_kernel(const acc_t* __restrict__ part, acc_t* __restrict__ out,
                             int64_t rows, int64_t cols, int64_t nchunks, int64_t s_row,
                             int64_t s_col, int64_t s_chunk) {
  LITEFPN_SHARED(warp_sums, acc_t[kThreads / kWarp]);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int64_t i = blockIdx.x; i < rows * cols; i += gridDim.x) {
    const acc_t* p = part + (i / cols) * s_row + (i % cols) * s_col;
    acc_t s = 0;
    for (int64_t k = threadIdx.x; k < nchunks; k += kThreads) s += p[k * s_chunk];
    s = warp_sum(s);
    if (lane == 0) warp_sums[warp] = s;
    __syncthreads();
    if (warp == 0) {
      s = warp_sum(lane < kThreads / kWarp ? warp_sums[lane] : acc_t(0));
      if (lane == 0) out[i] = s;
    }
    __syncthreads();  // warp_sums is reused by the next output
  }
}

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
  if (force_int64()) return true;  // device.cuh: constant false on the GPU; a test switch emulated
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

// `t` is a tensor of this backend's device type (CUDA; CPU in the host emulation).
inline void check_on_device(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(on_device(t), op, ": ", name, " must be a ", kDeviceName, " tensor, got ", t.device());
}

// The same CUDA device as `ref` (the dispatcher only guarantees that one argument is on CUDA).
inline void check_device(const char* op, const char* name, const Tensor& t, const Tensor& ref) {
  TORCH_CHECK(on_device(t) && t.device() == ref.device(), op, ": ", name, " must be on ",
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
  check_on_device(op, coarse_name, coarse);
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

// Partials per output from which a block per output (sum_partials_wide_kernel) beats a thread
// per output: one block's threads each get at least half a pass.
constexpr int64_t kWidePartials = kThreads / 2;

// Fixed-order sum of partials (see sum_partials_kernel) on the current stream. The kernel (so
// the rounding) is a function of the shapes only.
template <typename acc_t>
void sum_partials(const Tensor& part, const Tensor& out, int64_t rows, int64_t cols,
                  int64_t nchunks, int64_t s_row, int64_t s_col, int64_t s_chunk) {
  if (rows * cols == 0) return;
  if (nchunks >= kWidePartials) {
    launch<sum_partials_wide_kernel<acc_t>>(grid_for(rows * cols, 1), kThreads,
                                            part.const_data_ptr<acc_t>(),
                                            out.mutable_data_ptr<acc_t>(), rows, cols, nchunks,
                                            s_row, s_col, s_chunk);
    return;
  }
  launch<sum_partials_kernel<acc_t>>(grid_for(rows * cols, kThreads), kThreads,
                                     part.const_data_ptr<acc_t>(), out.mutable_data_ptr<acc_t>(),
                                     rows, cols, nchunks, s_row, s_col, s_chunk);
}

}  // namespace
}  // namespace cuda
}  // namespace litefpn
