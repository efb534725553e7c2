// Interface between the torch-facing CPU operators of bn_silu (bn_silu.cpp: _bn_silu_stats,
// _bn_silu_fwd, _bn_silu_bwd_sums, _bn_silu_bwd) and their compute kernels (bn_silu_impl.h),
// compiled once per instruction set like up2_fuse's (csrc/cpu/isa/{default,avx2,avx512}.cpp;
// picked with pick_kernel_table of cpu/isa/kernel_tables.h). Plain data only.
//
// x [N, C, H, W] is walked as N*C planes of H*W positions (plane path) or as N images of H*W
// pixels of C channels (nhwc path). The work is split into units fixed by the shape, never by
// the thread count:
//   plane path: unit u = (n * C + c) * nchunks + chunk, `unit_len` positions of one plane;
//   nhwc path:  unit u = n * nchunks + chunk, `unit_len` pixels of image n, all channels.
// A chunk covers the flat positions p = h * W + w in [chunk * unit_len, (chunk+1) * unit_len).
#pragma once

#include <cstdint>

#include "cpu/common/tensor_view.h"  // TensorView4, StorageDType

namespace litefpn {
namespace cpu {

enum BnSiluOp : int { kBnStats = 0, kBnFwd = 1, kBnBwdSums = 2, kBnBwd = 3, kBnNumOps = 4 };

// Positions of one plane per plane-path unit (at most), and elements per nhwc-path unit (aimed
// at; clamped to [kBnNhwcMinPixels, kBnNhwcMaxPixels] pixels).
constexpr int64_t kBnPlaneUnit = int64_t(1) << 15;
constexpr int64_t kBnNhwcUnitElems = int64_t(1) << 16;
constexpr int64_t kBnNhwcMinPixels = 64;
constexpr int64_t kBnNhwcMaxPixels = 1024;
// Elements staged per block (L1-resident buffers): plane path kBnBlock positions; nhwc path
// kBnBlock / C pixels, clamped to [1, kBnBlockMaxPixels].
// Sums are two-level: acc_t partials over one block (fp32 chains of at most kBnBlock / 16
// elements per lane, or kBnBlockMaxPixels pixels per channel), added into double sums of the
// unit. Short fp32 chains matter: centred data (x - center) share the low bits of center, so
// the rounding errors of a long chain add up with a bias instead of cancelling.
constexpr int64_t kBnBlock = 2048;
constexpr int64_t kBnBlockMaxPixels = 256;

struct BnSiluArgs {
  int64_t N, C, H, W;
  // x always; g = grad_out (kBnBwdSums, kBnBwd); out = y (kBnFwd) or grad_x (kBnBwd).
  TensorView4 x, g, out;
  // [C] accumulation-dtype vectors (nullptr where the op has none).
  const void* scale;
  const void* shift;
  const void* center;  // kBnStats, kBnBwdSums
  const void* k_dz;    // kBnBwd
  const void* k_x;
  const void* k_0;
  int64_t unit_len, nchunks;
  // Every tensor involved has stride(2) == W * stride(3) (or H == 1): a chunk may then run
  // across rows as one segment; otherwise segments stop at row ends.
  bool merged;
  // Sums: per-unit partials in double, each written whole by its unit:
  //   plane path: part[u * 2 + {0, 1}]; nhwc path: part[(u * 2 + {0, 1}) * C + c].
  double* part;
};

// Runs units [begin, end) with `scratch` (bn_silu_scratch_bytes, 64-byte aligned).
using BnSiluFn = void (*)(const BnSiluArgs& args, int64_t begin, int64_t end, void* scratch);

struct BnSiluKernelTable {
  const char* isa;
  BnSiluFn plane[kBnNumOps][kNumStorageDTypes];
  BnSiluFn nhwc[kBnNumOps][kNumStorageDTypes];
};

inline int64_t bn_round16(int64_t n) { return (n + 15) & ~int64_t(15); }

// Pixels per nhwc block.
inline int64_t bn_block_pixels(int64_t C) {
  const int64_t p = kBnBlock / (C > 0 ? C : 1);
  return p < 1 ? 1 : (p > kBnBlockMaxPixels ? kBnBlockMaxPixels : p);
}

// Scratch of one task: four acc_t staging buffers (x, grad_out, a / dz, out) of one block each,
// then (nhwc) the two acc_t per-channel sums of the current block and the two double
// per-channel sums of the current unit. Every segment is a multiple of 64 bytes.
inline int64_t bn_silu_buf_elems(bool nhwc, int64_t C) {
  return bn_round16(nhwc ? bn_block_pixels(C) * C : kBnBlock);
}
inline int64_t bn_silu_scratch_bytes(bool nhwc, int64_t C, int64_t acc_size) {
  const int64_t bufs = 4 * bn_silu_buf_elems(nhwc, C) * acc_size;
  return bufs + (nhwc ? 2 * bn_round16(C) * (acc_size + int64_t(sizeof(double))) : 0);
}

}  // namespace cpu
}  // namespace litefpn
