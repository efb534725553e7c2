// litefpn::_bn_silu_{stats,fwd,bwd_sums,bwd} on CUDA: kernels, launch plans and op bodies of the
// fused training-mode BatchNorm2d + SiLU (schemas and contracts in csrc/ops.cpp; the CPU
// kernels, csrc/cpu/bn_silu*, follow the same contract). Compiled by bn_silu.cu (which registers
// the ops) and, unchanged, by the host emulation (tests/cuda_emu); device.cuh holds the few
// lines that differ.
//
// Per element of channel c, all in acc_t (float; double for double):
//   a = x*scale[c] + shift[c]
//   fwd:      y = a / (1 + exp(-a))
//   bwd:      sg = 1/(1 + exp(-a)), dz = g*sg*(1 + a*(1 - sg)), grad_x = dz*k_dz + x*k_x + k_0
//   stats:    s1 += x - center[c],  s2 += (x - center[c])^2         (pilot-centred sums)
//   bwd_sums: s1 += dz,             s2 += dz*(x - center[c])
//
// Elementwise ops (fwd, bwd) follow the output's layout (y / grad_x: channels_last iff x is
// channels_last and not contiguous): nhwc = a thread owns G consecutive channels of one pixel,
// plane = G consecutive positions of one row; G = 16 bytes' worth where C (nhwc) or W (plane)
// allows it, else 1; tensors whose strides or alignment do not allow vectors (vec_ok), grad_out
// expanded with zero strides included, are read element-wise with their own strides.
//
// Sums ops (stats, bwd_sums) follow x's layout, in two fixed-order stages (no atomics, bitwise
// reproducible): a block per unit writes one partial per channel, then sum_partials adds a
// channel's K partials in unit order.
//   plane (W innermost): unit = (n, c, run of positions); thread t takes groups t, t+256, ... in
//     order; the block's 256 sums are added in a fixed tree.
//   nhwc (C innermost): unit = (n, run of pixels, channel tile), threads = pixel lanes x channel
//     groups; lane sums are added in lane order, as in up2_fuse's nhwc backward.
// Partials: part[s][c][k], s in {s1, s2}, k = n*nchunks + chunk (K = N*nchunks per channel).
#pragma once

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <tuple>

#include "cuda/common.cuh"

namespace litefpn {
namespace cuda {
namespace {

enum BnOp : int { kBnStats = 0, kBnFwd = 1, kBnBwdSums = 2, kBnBwd = 3 };

template <typename scalar_t>
struct BnArgs {
  using acc_t = acc_of<scalar_t>;
  int64_t N = 0, C = 0, H = 0, W = 0;
  View4 x, g, out;  // g: grad_out (bwd ops); out: y / grad_x (elementwise ops)
  bool vec_x = false, vec_g = false, vec_out = false;
  const acc_t* scale = nullptr;  // [C] each; null where the op has none
  const acc_t* shift = nullptr;
  const acc_t* center = nullptr;
  const acc_t* k_dz = nullptr;
  const acc_t* k_x = nullptr;
  const acc_t* k_0 = nullptr;
  acc_t* part = nullptr;                   // sums: [2][C][K]
  int64_t chunk = 1, nchunks = 1, K = 1;   // positions (plane) / pixels (nhwc) per unit
  int ctile = 1, ptile = 1;                // nhwc sums: channel groups and pixel lanes per block
  int64_t ctiles = 1;
};

template <typename acc_t>
LITEFPN_HD acc_t bn_silu_of(acc_t a) {
  return a / (acc_t(1) + ::exp(-a));
}

template <typename acc_t>
LITEFPN_HD acc_t bn_dz_of(acc_t a, acc_t g) {
  const acc_t sg = acc_t(1) / (acc_t(1) + ::exp(-a));
  return g * sg * (acc_t(1) + a * (acc_t(1) - sg));
}

// ============================================================================= elementwise
// Group g: channels c0 .. c0+G-1 of pixel (n, h, w0) (NHWC), or positions w0 .. w0+G-1 of row
// (n, c0, h) (plane).
template <int OP, int G, bool NHWC, typename scalar_t, typename index_t>
LITEFPN_HD void bn_ew_group(const BnArgs<scalar_t>& a, index_t g) {
  using acc_t = acc_of<scalar_t>;
  const index_t C = static_cast<index_t>(a.C), H = static_cast<index_t>(a.H),
                W = static_cast<index_t>(a.W);
  index_t n, c0, h, w0;
  if (NHWC) {
    const index_t CG = C / G;
    c0 = (g % CG) * G;
    index_t r = g / CG;
    w0 = r % W;
    r /= W;
    h = r % H;
    n = r / H;
  } else {
    const index_t WG = W / G;
    w0 = (g % WG) * G;
    index_t r = g / WG;
    h = r % H;
    r /= H;
    c0 = r % C;
    n = r / C;
  }
  constexpr int dim = NHWC ? 1 : 3;  // the group's dimension
  acc_t xv[G], gv[G], o[G];
  load_pack<G>(at4<const scalar_t>(a.x, n, c0, h, w0), static_cast<index_t>(a.x.s[dim]), a.vec_x, xv);
  if (OP == kBnBwd)
    load_pack<G>(at4<const scalar_t>(a.g, n, c0, h, w0), static_cast<index_t>(a.g.s[dim]), a.vec_g,
                 gv);
#pragma unroll
  for (int e = 0; e < G; ++e) {
    const index_t c = NHWC ? c0 + e : c0;
    const acc_t av = xv[e] * a.scale[c] + a.shift[c];
    if (OP == kBnFwd) {
      o[e] = bn_silu_of(av);
    } else {
      o[e] = bn_dz_of(av, gv[e]) * a.k_dz[c] + xv[e] * a.k_x[c] + a.k_0[c];
    }
  }
  store_pack<G>(at4<scalar_t>(a.out, n, c0, h, w0), static_cast<index_t>(a.out.s[dim]), a.vec_out, o);
}

template <typename scalar_t, typename index_t, int OP, int G, bool NHWC>
__global__ void __launch_bounds__(kThreads)
    bn_ew_kernel(const BnArgs<scalar_t> a, const int64_t groups) {
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups;
       g += int64_t(gridDim.x) * blockDim.x)
    bn_ew_group<OP, G, NHWC, scalar_t, index_t>(a, static_cast<index_t>(g));
}

// ============================================================================= sums
// s1 += t1, s2 += t2 for G elements of channel(s) c (NHWC: c + e) at (n, h, w).
template <int OP, int G, bool NHWC, typename scalar_t, typename index_t>
LITEFPN_HD void bn_sums_add(const BnArgs<scalar_t>& a, index_t n, index_t c, index_t h, index_t w,
                            acc_of<scalar_t> (&s1)[G], acc_of<scalar_t> (&s2)[G]) {
  using acc_t = acc_of<scalar_t>;
  constexpr int dim = NHWC ? 1 : 3;
  acc_t xv[G], gv[G];
  load_pack<G>(at4<const scalar_t>(a.x, n, c, h, w), static_cast<index_t>(a.x.s[dim]), a.vec_x, xv);
  if (OP == kBnBwdSums)
    load_pack<G>(at4<const scalar_t>(a.g, n, c, h, w), static_cast<index_t>(a.g.s[dim]), a.vec_g, gv);
#pragma unroll
  for (int e = 0; e < G; ++e) {
    const index_t ce = NHWC ? c + e : c;
    const acc_t d = xv[e] - a.center[ce];
    if (OP == kBnStats) {
      s1[e] += d;
      s2[e] += d * d;
    } else {
      const acc_t dz = bn_dz_of(xv[e] * a.scale[ce] + a.shift[ce], gv[e]);
      s1[e] += dz;
      s2[e] += dz * d;
    }
  }
}

// Plane unit u = (n*C + c)*nchunks + chunk: positions [chunk*a.chunk, +a.chunk) of plane (n, c).
template <typename scalar_t, typename index_t, int OP, int G>
__global__ void __launch_bounds__(kThreads)
    bn_sums_plane_kernel(const BnArgs<scalar_t> a, const int64_t units) {
  using acc_t = acc_of<scalar_t>;
  LITEFPN_SHARED(red, acc_t[2 * kThreads]);  // [s1 | s2][thread]
  const int tid = threadIdx.x;
  const index_t W = static_cast<index_t>(a.W), HW = static_cast<index_t>(a.H) * W;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {  // uniform across the block
    const int64_t chunk = u % a.nchunks, nc = u / a.nchunks, n = nc / a.C, c = nc % a.C;
    const index_t p_begin = static_cast<index_t>(chunk * a.chunk);
    const index_t p_end = p_begin + a.chunk < HW ? p_begin + static_cast<index_t>(a.chunk) : HW;
    acc_t s1[G], s2[G];
#pragma unroll
    for (int e = 0; e < G; ++e) s1[e] = s2[e] = acc_t(0);
    // G | W, so a group never crosses a row
    for (index_t p = p_begin + tid * G; p < p_end; p += kThreads * G) {
      const index_t h = p / W;
      bn_sums_add<OP, G, false, scalar_t, index_t>(a, static_cast<index_t>(n),
                                                   static_cast<index_t>(c), h, p - h * W, s1, s2);
    }
    acc_t t1 = 0, t2 = 0;
#pragma unroll
    for (int e = 0; e < G; ++e) {
      t1 += s1[e];
      t2 += s2[e];
    }
    red[tid] = t1;
    red[kThreads + tid] = t2;
    __syncthreads();
    for (int off = kThreads / 2; off > 0; off /= 2) {  // fixed tree
      if (tid < off) {
        red[tid] += red[tid + off];
        red[kThreads + tid] += red[kThreads + tid + off];
      }
      __syncthreads();
    }
    if (tid == 0) {
      const int64_t k = n * a.nchunks + chunk;
      a.part[c * a.K + k] = red[0];
      a.part[(a.C + c) * a.K + k] = red[kThreads];
    }
    __syncthreads();  // `red` is rewritten by the next unit
  }
}

// NHWC unit u = (n*nchunks + chunk)*ctiles + ct: pixels [chunk*a.chunk, +a.chunk) of sample n,
// channel groups [ct*ctile, +ctile). Thread (pixel lane pl, channel group cgl) takes pixels pl,
// pl + ptile, ... in order; lane sums are then added in lane order.
template <typename scalar_t, typename index_t, int OP, int G>
__global__ void __launch_bounds__(kThreads)
    bn_sums_nhwc_kernel(const BnArgs<scalar_t> a, const int64_t units) {
  using acc_t = acc_of<scalar_t>;
  LITEFPN_SHARED(red, acc_t[2 * kThreads * G]);  // [s1 | s2][pixel lane][channel in tile]
  const int Pt = a.ptile, slots = a.ctile * G;
  const int cgl = threadIdx.x % a.ctile, pl = threadIdx.x / a.ctile;
  const index_t W = static_cast<index_t>(a.W), HW = static_cast<index_t>(a.H) * W;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {  // uniform across the block
    const int64_t ct = u % a.ctiles, rest = u / a.ctiles, chunk = rest % a.nchunks,
                  n = rest / a.nchunks;
    acc_t s1[G], s2[G];
#pragma unroll
    for (int e = 0; e < G; ++e) s1[e] = s2[e] = acc_t(0);
    const int64_t cg = ct * a.ctile + cgl;
    if (pl < Pt && cg < a.C / G) {
      const index_t q_begin = static_cast<index_t>(chunk * a.chunk);
      const index_t q_end = q_begin + a.chunk < HW ? q_begin + static_cast<index_t>(a.chunk) : HW;
      for (index_t q = q_begin + pl; q < q_end; q += Pt) {
        const index_t h = q / W;
        bn_sums_add<OP, G, true, scalar_t, index_t>(a, static_cast<index_t>(n),
                                                    static_cast<index_t>(cg * G), h, q - h * W, s1,
                                                    s2);
      }
    }
    if (pl < Pt) {
#pragma unroll
      for (int e = 0; e < G; ++e) {
        red[pl * slots + cgl * G + e] = s1[e];
        red[(Pt + pl) * slots + cgl * G + e] = s2[e];
      }
    }
    __syncthreads();
    for (int r = threadIdx.x; r < 2 * slots; r += blockDim.x) {
      const int s = r / slots, ce = r % slots;
      const int64_t ch = ct * slots + ce;
      if (ch < a.C) {
        acc_t tot = 0;
        for (int p = 0; p < Pt; ++p) tot += red[(s * Pt + p) * slots + ce];
        a.part[(s * a.C + ch) * a.K + n * a.nchunks + chunk] = tot;
      }
    }
    __syncthreads();  // `red` is rewritten by the next unit
  }
}

// ============================================================================= host
inline void bn_check_x(const char* op, const Tensor& x) {
  check_4d(op, "x", x);
  check_on_device(op, "x", x);
}

inline void bn_check_grad_out(const char* op, const Tensor& g, const Tensor& x) {
  check_device(op, "grad_out", g, x);
  TORCH_CHECK(g.sizes() == x.sizes(), op, ": grad_out must have x's shape ", x.sizes(), ", got ",
              g.sizes());
  TORCH_CHECK(g.scalar_type() == x.scalar_type(), op, ": grad_out must have x's dtype ",
              x.scalar_type(), ", got ", g.scalar_type());
}

inline void bn_check_vec(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  check_small(op, name, t, x, {x.size(1)}, acc_scalar_type(x.scalar_type()));
}

// The output's memory format: channels_last when x is (and is not also contiguous).
inline at::MemoryFormat bn_output_format(const Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous()
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

inline bool bn_empty_work(const Tensor& x) {
  return x.size(0) * x.size(2) * x.size(3) == 0 || x.size(1) == 0;
}

// Path and group width: nhwc when `ref` (the output, or x for the sums) has unit channel
// stride; G = 16 bytes' worth when C (nhwc) / W (plane) is a multiple of it, else 1.
struct BnPath {
  bool nhwc = false;
  int G = 1;
};

template <typename scalar_t>
BnPath bn_path(const Tensor& ref) {
  constexpr int V = 16 / sizeof(scalar_t);
  BnPath p;
  p.nhwc = ref.size(1) > 1 && ref.stride(1) == 1;
  p.G = (p.nhwc ? ref.size(1) : ref.size(3)) % V == 0 ? V : 1;
  return p;
}

template <typename scalar_t>
BnArgs<scalar_t> bn_args(const Tensor& x, const Tensor* g, const Tensor* out, const BnPath& path) {
  BnArgs<scalar_t> a;
  a.N = x.size(0);
  a.C = x.size(1);
  a.H = x.size(2);
  a.W = x.size(3);
  const int dim = path.nhwc ? 1 : 3;
  a.x = view4(x);
  a.vec_x = vec_ok(x, dim, path.G);
  if (g != nullptr) {
    a.g = view4(*g);
    a.vec_g = vec_ok(*g, dim, path.G);
  }
  if (out != nullptr) {
    a.out = view4(*out);
    a.vec_out = vec_ok(*out, dim, path.G);
  }
  return a;
}

// Elementwise op OP (kBnFwd / kBnBwd) into `out`.
template <int OP, typename scalar_t>
void bn_ew_launch(BnArgs<scalar_t> a, const BnPath& path, int64_t numel, bool use64) {
  constexpr int V = 16 / sizeof(scalar_t);
  const int64_t groups = numel / path.G;
  const unsigned int blocks = grid_for(groups, kThreads);
  dispatch_index(use64, [&](auto index_tag) {
    using index_t = decltype(index_tag);
    if (path.nhwc && path.G == V) {
      launch<bn_ew_kernel<scalar_t, index_t, OP, V, true>>(blocks, kThreads, a, groups);
    } else if (path.nhwc) {
      launch<bn_ew_kernel<scalar_t, index_t, OP, 1, true>>(blocks, kThreads, a, groups);
    } else if (path.G == V) {
      launch<bn_ew_kernel<scalar_t, index_t, OP, V, false>>(blocks, kThreads, a, groups);
    } else {
      launch<bn_ew_kernel<scalar_t, index_t, OP, 1, false>>(blocks, kThreads, a, groups);
    }
  });
}

// Units of a sums op on `path` (fills a.chunk, nchunks, K, ctile, ptile, ctiles) -> units.
template <typename scalar_t>
int64_t bn_sums_plan(BnArgs<scalar_t>& a, const BnPath& path) {
  const int64_t HW = a.H * a.W;
  if (path.nhwc) {
    const int64_t CG = a.C / path.G;
    a.ctile = static_cast<int>(CG < kWarp ? CG : kWarp);
    a.ptile = kThreads / a.ctile;
    a.ctiles = ceil_div(CG, a.ctile);
    a.chunk = int64_t(a.ptile) * 8;  // ~8 pixels per thread
  } else {
    a.chunk = int64_t(kThreads) * path.G * 8;  // ~8 groups per thread; a multiple of G
  }
  a.nchunks = ceil_div(HW, a.chunk);
  a.K = a.N * a.nchunks;
  return path.nhwc ? a.N * a.nchunks * a.ctiles : a.N * a.C * a.nchunks;
}

// Sums op OP (kBnStats / kBnBwdSums) -> (s1, s2), [C] acc.
template <int OP, typename scalar_t>
std::tuple<Tensor, Tensor> bn_sums_run(BnArgs<scalar_t> a, const BnPath& path, const Tensor& x,
                                       bool use64) {
  using acc_t = acc_of<scalar_t>;
  constexpr int V = 16 / sizeof(scalar_t);
  const auto opts = x.options().dtype(acc_scalar_type(x.scalar_type()));
  const int64_t units = bn_sums_plan(a, path);
  const int64_t C = a.C, K = a.K;
  Tensor part = at::empty({2 * C * K}, opts);
  a.part = part.mutable_data_ptr<acc_t>();
  dispatch_index(use64, [&](auto index_tag) {
    using index_t = decltype(index_tag);
    const unsigned int blocks = grid_for(units, 1);
    if (path.nhwc && path.G == V) {
      launch<bn_sums_nhwc_kernel<scalar_t, index_t, OP, V>>(blocks, kThreads, a, units);
    } else if (path.nhwc) {
      launch<bn_sums_nhwc_kernel<scalar_t, index_t, OP, 1>>(blocks, kThreads, a, units);
    } else if (path.G == V) {
      launch<bn_sums_plane_kernel<scalar_t, index_t, OP, V>>(blocks, kThreads, a, units);
    } else {
      launch<bn_sums_plane_kernel<scalar_t, index_t, OP, 1>>(blocks, kThreads, a, units);
    }
  });
  Tensor s1 = at::empty({C}, opts), s2 = at::empty({C}, opts);
  sum_partials<acc_t>(part, s1, 1, C, K, 0, K, 1);
  sum_partials<acc_t>(part.narrow(0, C * K, C * K), s2, 1, C, K, 0, K, 1);
  return {s1, s2};
}

std::tuple<Tensor, Tensor> bn_zero_sums(const Tensor& x) {
  const auto opts = x.options().dtype(acc_scalar_type(x.scalar_type()));
  return {at::zeros({x.size(1)}, opts), at::zeros({x.size(1)}, opts)};
}

// ============================================================================= ops
std::tuple<Tensor, Tensor> bn_silu_stats_cuda(const Tensor& x, const Tensor& center) {
  constexpr const char* op = "_bn_silu_stats";
  bn_check_x(op, x);
  bn_check_vec(op, "center", center, x);
  const DeviceGuard guard(x.device());
  if (bn_empty_work(x)) return bn_zero_sums(x);
  const bool use64 = any_needs_int64({&x});
  std::tuple<Tensor, Tensor> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    const BnPath path = bn_path<scalar_t>(x);
    BnArgs<scalar_t> a = bn_args<scalar_t>(x, nullptr, nullptr, path);
    a.center = center.const_data_ptr<acc_of<scalar_t>>();
    r = bn_sums_run<kBnStats, scalar_t>(a, path, x, use64);
  });
  return r;
}

Tensor bn_silu_fwd_cuda(const Tensor& x, const Tensor& scale, const Tensor& shift) {
  constexpr const char* op = "_bn_silu_fwd";
  bn_check_x(op, x);
  bn_check_vec(op, "scale", scale, x);
  bn_check_vec(op, "shift", shift, x);
  const DeviceGuard guard(x.device());
  Tensor out = at::empty(x.sizes(), x.options().memory_format(bn_output_format(x)));
  if (out.numel() == 0) return out;
  const bool use64 = any_needs_int64({&x, &out});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = acc_of<scalar_t>;
    const BnPath path = bn_path<scalar_t>(out);
    BnArgs<scalar_t> a = bn_args<scalar_t>(x, nullptr, &out, path);
    a.scale = scale.const_data_ptr<acc_t>();
    a.shift = shift.const_data_ptr<acc_t>();
    bn_ew_launch<kBnFwd, scalar_t>(a, path, out.numel(), use64);
  });
  return out;
}

std::tuple<Tensor, Tensor> bn_silu_bwd_sums_cuda(const Tensor& grad_out, const Tensor& x,
                                                 const Tensor& scale, const Tensor& shift,
                                                 const Tensor& center) {
  constexpr const char* op = "_bn_silu_bwd_sums";
  bn_check_x(op, x);
  bn_check_grad_out(op, grad_out, x);
  bn_check_vec(op, "scale", scale, x);
  bn_check_vec(op, "shift", shift, x);
  bn_check_vec(op, "center", center, x);
  const DeviceGuard guard(x.device());
  if (bn_empty_work(x)) return bn_zero_sums(x);
  const bool use64 = any_needs_int64({&x, &grad_out});
  std::tuple<Tensor, Tensor> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = acc_of<scalar_t>;
    const BnPath path = bn_path<scalar_t>(x);
    BnArgs<scalar_t> a = bn_args<scalar_t>(x, &grad_out, nullptr, path);
    a.scale = scale.const_data_ptr<acc_t>();
    a.shift = shift.const_data_ptr<acc_t>();
    a.center = center.const_data_ptr<acc_t>();
    r = bn_sums_run<kBnBwdSums, scalar_t>(a, path, x, use64);
  });
  return r;
}

Tensor bn_silu_bwd_cuda(const Tensor& grad_out, const Tensor& x, const Tensor& scale,
                        const Tensor& shift, const Tensor& k_dz, const Tensor& k_x,
                        const Tensor& k_0) {
  constexpr const char* op = "_bn_silu_bwd";
  bn_check_x(op, x);
  bn_check_grad_out(op, grad_out, x);
  bn_check_vec(op, "scale", scale, x);
  bn_check_vec(op, "shift", shift, x);
  bn_check_vec(op, "k_dz", k_dz, x);
  bn_check_vec(op, "k_x", k_x, x);
  bn_check_vec(op, "k_0", k_0, x);
  const DeviceGuard guard(x.device());
  Tensor out = at::empty(x.sizes(), x.options().memory_format(bn_output_format(x)));
  if (out.numel() == 0) return out;
  const bool use64 = any_needs_int64({&x, &grad_out, &out});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = acc_of<scalar_t>;
    const BnPath path = bn_path<scalar_t>(out);
    BnArgs<scalar_t> a = bn_args<scalar_t>(x, &grad_out, &out, path);
    a.scale = scale.const_data_ptr<acc_t>();
    a.shift = shift.const_data_ptr<acc_t>();
    a.k_dz = k_dz.const_data_ptr<acc_t>();
    a.k_x = k_x.const_data_ptr<acc_t>();
    a.k_0 = k_0.const_data_ptr<acc_t>();
    bn_ew_launch<kBnBwd, scalar_t>(a, path, out.numel(), use64);
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace litefpn
