// Interface between the torch-facing CPU operators of lateral_up2_fuse (lateral_up2_fuse.cpp)
// and their compute kernels (lateral_up2_fuse_impl.h), compiled once per instruction set like
// up2_fuse's (csrc/cpu/isa/{default,avx2,avx512}.cpp). Plain data only.
//
// All three kernels are small-K GEMMs built on one register-blocked micro-kernel (see
// lateral_up2_fuse_impl.h); the work is split into units fixed by the shape (never by the
// thread count): unit u = n * nchunks + chunk, a chunk being `rows_per_chunk` rows (coarse rows for the forward,
// fine rows for gram and grad_z).
#pragma once

#include <cstdint>

#include "cpu/common/tensor_view.h"

namespace litefpn {
namespace cpu {

// Register tile of the micro-kernel: kLatMR broadcast rows x kLatNV vectors (32 bytes: 8 floats
// or 4 doubles; 64 bytes in the AVX-512 build). Padded widths below are multiples of one vector.
constexpr int kLatMR = 6;
constexpr int kLatNV = 2;
// Pixels per panel (one run of a fine row) staged in the scratch buffers; even.
constexpr int64_t kLatPanel = 128;

inline int64_t lat_round(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// gram[n,i,j] = sum_hw (a-ac)(b-bc), colsum[n,i] = sum_hw (a-ac); a [N,Ca,H,W], b [N,Cb,H,W].
struct LatGramArgs {
  int64_t N, Ca, Cb, H, W;  // H, W: the (common) spatial size of a and b
  TensorView4 a, b;
  const void* a_center;  // [Ca] acc_t or nullptr
  const void* b_center;  // [Cb] acc_t or nullptr
  bool same;             // a, b: the same view with the same centre (one staged copy serves both)
  int64_t cbp;           // row width of a gram partial: round(Cb, lanes)
  int64_t rows_per_chunk, nchunks;
  void* part;            // [N * nchunks][Ca * cbp + Ca] acc_t partials (gram rows, then the
                         // column sums), each written whole by its unit
};

// out = ca*Up2(coarse) + cb*(weight z + bias); coarse [N,C,H,W], z [N,Cin,2H,2W], out [N,C,2H,2W].
struct LatFwdArgs {
  int64_t N, C, Cin, H, W;  // coarse sizes
  TensorView4 coarse, z, out;
  const void* weight;  // plane: [C][Cin] row-major; nhwc: [Cin][cpad] transposed, zero padded
  const void* bias;    // [cpad], zero padded
  const void* ca;      // [N][cpad] alpha*gate_coarse, zero padded
  const void* cb;      // [N][cpad] beta*gate_fine, zero padded
  int64_t cpad;        // round(C, lanes)
  int64_t rows_per_chunk, nchunks;  // coarse rows per unit
};

// grad_z[n,k,p] = sum_c weight[c,k] scale[n,c] g[n,c,p] - sum_j quad[k,j] z[n,j,p] + shift[k].
struct LatGradZArgs {
  int64_t N, C, Cin, H, W;  // fine sizes of g [N,C,H,W] and z, out [N,Cin,H,W]
  TensorView4 g, z, out;
  const void* weight;    // [C][Cin] row-major
  const void* scale;     // [N][C] or nullptr (1)
  const void* quad_neg;  // plane: -quad [Cin][Cin] (k, j); nhwc: -quad^T [Cin (j)][kpad]; or nullptr
  const void* shift;     // [kpad] zero padded, or nullptr
  int64_t kpad;          // round(Cin, lanes)
  int64_t rows_per_chunk, nchunks;  // fine rows per unit
};

using LatGramFn = void (*)(const LatGramArgs&, int64_t begin, int64_t end, void* scratch);
using LatFwdFn = void (*)(const LatFwdArgs&, int64_t begin, int64_t end, void* scratch);
using LatGradZFn = void (*)(const LatGradZArgs&, int64_t begin, int64_t end, void* scratch);

struct LatKernelTable {
  const char* isa;
  int vec_bytes;  // of the micro-kernel's vectors: lanes = vec_bytes / sizeof(acc_t)
  LatGramFn gram[kNumStorageDTypes];
  LatFwdFn fwd_plane[kNumStorageDTypes];
  LatFwdFn fwd_nhwc[kNumStorageDTypes];
  LatGradZFn grad_z_plane[kNumStorageDTypes];
  LatGradZFn grad_z_nhwc[kNumStorageDTypes];
};

// Scratch of one task in acc_t elements (lanes: of the table's vectors, for acc_t). Each kernel carves
// it into the buffers listed in lateral_up2_fuse_impl.h, every one rounded up to 16 elements.
inline int64_t lat_seg(int64_t n) { return (n + 15) & ~int64_t(15); }

// Row stride of a staged broadcast operand with rows of n elements (lat_stage in
// lateral_up2_fuse_impl.h): round(n, 16) + 16, an odd number of 64-byte lines for float (rows
// 2^k bytes apart would alias in the cache sets); and the size of such a staging of an R x K block.
inline int64_t lat_stage_ld(int64_t n) { return (n + 15) / 16 * 16 + 16; }
inline int64_t lat_stage_elems(int64_t R, int64_t K) {
  const int64_t a = lat_stage_ld(R) * K, b = lat_stage_ld(K) * R;
  return a > b ? a : b;
}

inline int64_t lat_gram_scratch(const LatGramArgs& a, int64_t lanes) {
  (void)lanes;
  // staged b panel [pb][cbp], staged a panel, column sums of a panel [Ca]
  return lat_seg(kLatPanel * a.cbp) + lat_seg(lat_stage_elems(a.Ca, kLatPanel)) +
         lat_seg(a.Ca);
}

inline int64_t lat_fwd_scratch(const LatFwdArgs& a, int64_t lanes) {
  const int64_t pb = kLatPanel, pbl = lat_round(pb, lanes * kLatNV);
  const int64_t wc = pb / 2 + 2;  // coarse columns of one panel (with the clamped neighbours)
  // plane: z panel [Cin][pbl], U rows [MR][pbl], vp and 2 coarse runs [wc], out rows [C][pbl]
  const int64_t plane = lat_seg(a.Cin * pbl) + lat_seg(kLatMR * pbl) + 3 * lat_seg(wc) +
                        lat_seg(a.C * pbl);
  // nhwc: v [wc][cpad], 2 coarse pixels [C], staged z panel, out [pb][C]
  const int64_t nhwc = lat_seg(wc * a.cpad) + 2 * lat_seg(a.C) +
                       lat_seg(lat_stage_elems(pb, a.Cin)) + lat_seg(pb * a.cpad);
  return plane > nhwc ? plane : nhwc;
}

inline int64_t lat_grad_z_scratch(const LatGradZArgs& a, int64_t lanes) {
  const int64_t pb = kLatPanel, pbl = lat_round(pb, lanes * kLatNV), pbm = lat_round(pb, kLatMR);
  const int64_t w = lat_seg(a.C * (a.kpad > a.Cin ? a.kpad : a.Cin));  // per-n weights
  // plane: g panel [C][pbl], z panel [Cin][pbl], out rows [Cin][pbl]
  const int64_t plane = lat_seg(a.C * pbl) + lat_seg(a.Cin * pbl) + lat_seg(pbl * a.kpad);
  // nhwc: staged g and z panels, out [pbm][Cin]
  const int64_t nhwc = lat_seg(lat_stage_elems(pb, a.C)) + lat_seg(lat_stage_elems(pb, a.Cin)) +
                       lat_seg(pbm * a.kpad);
  return w + (plane > nhwc ? plane : nhwc);
}

}  // namespace cpu
}  // namespace litefpn
