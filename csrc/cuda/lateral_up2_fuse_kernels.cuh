// litefpn::_lateral_{gram,up2_fuse_fwd,grad_z} on CUDA: kernels, launch plans and op bodies of
// one lateral_up2_fuse level (schemas in csrc/ops.cpp; the Python op composes them, BatchNorm
// statistics included). Compiled by lateral_up2_fuse.cu (which registers the ops) and, unchanged,
// by the host emulation (tests/cuda_emu); device.cuh holds the few lines that differ.
//   _lateral_gram          gram[n,i,j] = sum_p (a-ac[i])(b-bc[j]), colsum[n,i] = sum_p (a-ac[i])
//   _lateral_up2_fuse_fwd  out = ca*Up2(coarse) + cb*(weight.z + bias)    (y = weight.z never stored)
//   _lateral_grad_z        grad_z = sum_c weight[c,k]*scale[n,c]*g[n,c] - quad.z + shift
// (Its backward's coarse half, _up2_fuse_bwd_coarse, belongs to up2_fuse: up2_fuse_kernels.cuh.)
//
// The three GEMM-shaped ops are small-K channel mixes over pixels (K = C_in or C: 32..256), done
// with one SIMT tiling: 256 threads as a 16x16 grid, each owning a TM x 4 (or TM x TM) register
// tile; kBK-deep slices of both operands are staged (converted to the accumulation type) in
// shared memory. Accumulation is in fp32 (fp64 for fp64), in a fixed order:
//   * channel mix (fwd, grad_z): out tile [BM channels x 64 pixels] of sample n; the epilogue
//     stages the tile in shared memory, then reads what it needs (coarse taps, bias, gates /
//     shift) and writes `out` in its memory format, consecutive threads owning consecutive
//     16-byte groups along whichever of channel / pixel is unit-stride in `out`.
//   * gram: tile [BMA x BMB] of sample n over one chunk of kGramChunk pixels (a's own gram: the
//     tiles on and above the diagonal, mirrored); per-chunk partials are summed in chunk order
//     by a second kernel: bitwise deterministic, no atomics.
// Activations are read through their strides (NCHW, channels_last or anything else), loading
// along whichever of channel / pixel is unit-stride; nothing is copied to a contiguous layout.
#pragma once

#include <ATen/ops/empty_like.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cuda/common.cuh"

namespace litefpn {
namespace cuda {
namespace {


constexpr int kBK = 16;             // reduction slice staged in shared memory
constexpr int kBN = 64;             // pixel tile of the channel mix
constexpr int kPad = 4;             // shared rows padded: fewer bank conflicts, rows stay 16B-aligned
constexpr int kTile = 16;           // the 16 x 16 thread grid
constexpr int64_t kGramChunk = 512; // pixels per gram partial (multiple of kBK)
static_assert(kTile * kTile == kThreads, "one thread per cell of the 16x16 grid");
static_assert(kGramChunk % kBK == 0, "gram chunks are whole slices");

// ============================================================================= channel mix
// out[n, m, p] = sum over segments of sum_k A[m, k] * B[n, k, p], then an epilogue.
template <typename acc_t>
struct MixSegment {
  const acc_t* A = nullptr;  // A[m, k] = A[m*a_sm + k*a_sk] (weights: small, fp32/fp64)
  int64_t a_sm = 0, a_sk = 0;
  const acc_t* scale = nullptr;  // [N, K] per-sample factor on A's columns, or null
  acc_t coef = 1;
  int64_t K = 0;
  View4 B;                   // activations [N, K, Hp, Wp]
  bool b_ch_contig = false;  // B's channel stride is 1: load along k (else along pixels)
};

template <typename acc_t>
struct MixArgs {
  int64_t N = 0, M = 0, Hp = 0, Wp = 0;  // output [N, M, Hp, Wp]
  int64_t mtiles = 0, ptiles = 0;
  MixSegment<acc_t> seg[2];
  int nseg = 1;
  bool m_fast = false;  // out's channel stride is 1: threads run along m for coalesced stores
};

template <int BM, typename acc_t>
struct MixSmem {
  alignas(16) acc_t A[kBK][BM + kPad];   // [k][m]
  alignas(16) acc_t B[kBK][kBN + kPad];  // [k][pixel]
};

// The finished output tile, staged for the epilogue in the operands' storage (free once the
// last slice's barrier has passed): [pixel][m] when out's channels are unit-stride, else
// [m][pixel], so each thread's group of consecutive outputs is contiguous here too.
template <int BM>
constexpr int mix_out_elems() {
  return kBN * (BM + kPad) > BM * (kBN + kPad) ? kBN * (BM + kPad) : BM * (kBN + kPad);
}
template <int BM, typename acc_t>
union MixShared {
  MixSmem<BM, acc_t> op;
  alignas(16) acc_t out[mix_out_elems<BM>()];
};

template <int BM>
LITEFPN_HD int mix_out_index(bool m_fast, int mm, int pp) {
  return m_fast ? pp * (BM + kPad) + mm : mm * (kBN + kPad) + pp;
}

// Stores o[0, cnt) at out(n, m + e, p) (along_m) or out(n, m, p + e): one V-wide vector when the
// group is whole and `vec` (vec_ok along the fast dimension, so a pixel group never crosses a
// row), else element by element with out's strides.
template <int V, typename scalar_t, typename index_t>
LITEFPN_HD void mix_store_group(const View4& out, index_t Wp, index_t n, index_t m, index_t p,
                                bool along_m, int cnt, bool vec, const acc_of<scalar_t> (&o)[V]) {
  if (cnt == V && vec) {
    const index_t y = p / Wp, x = p - y * Wp;
    store_pack<V>(at4<scalar_t>(out, n, m, y, x), index_t(1), true, o);
    return;
  }
#pragma unroll
  for (int e = 0; e < V; ++e) {
    if (e >= cnt) break;
    const index_t pe = along_m ? p : p + e, y = pe / Wp, x = pe - y * Wp;
    *at4<scalar_t>(out, n, along_m ? m + e : m, y, x) = static_cast<scalar_t>(o[e]);
  }
}

// Register tile of thread tid: rows tm*TM .. +TM-1 (channels), columns tn*4 .. +3 (pixels).
LITEFPN_HD void mix_roles(bool m_fast, int tid, int& tm, int& tn) {
  const int tx = tid % kTile, ty = tid / kTile;
  tm = m_fast ? tx : ty;
  tn = m_fast ? ty : tx;
}

// The kBLoads elements (kk, pp) of the B slice a thread loads: consecutive threads take
// consecutive channels when those are unit-stride, else consecutive pixels.
constexpr int kBLoads = kBK * kBN / kThreads;
LITEFPN_HD void mix_b_slot(bool ch_contig, int tid, int r, int& kk, int& pp) {
  if (ch_contig) {
    kk = tid % kBK;
    pp = tid / kBK + (kThreads / kBK) * r;
  } else {
    pp = tid % kBN;
    kk = tid / kBN + (kThreads / kBN) * r;
  }
}

// Offsets (without the channel term) of the pixels this thread loads; fixed for a tile.
template <typename acc_t, typename index_t>
LITEFPN_HD void mix_b_offsets(const MixSegment<acc_t>& s, const MixArgs<acc_t>& a, index_t n,
                              index_t p0, int tid, index_t (&off)[kBLoads], bool (&ok)[kBLoads]) {
  const index_t Wp = a.Wp, P = static_cast<index_t>(a.Hp) * Wp;
#pragma unroll
  for (int r = 0; r < kBLoads; ++r) {
    int kk, pp;
    mix_b_slot(s.b_ch_contig, tid, r, kk, pp);
    const index_t p = p0 + pp;
    ok[r] = p < P;
    const index_t y = ok[r] ? p / Wp : 0, x = ok[r] ? p - y * Wp : 0;
    off[r] = n * static_cast<index_t>(s.B.s[0]) + y * static_cast<index_t>(s.B.s[2]) +
             x * static_cast<index_t>(s.B.s[3]);
  }
}

template <typename scalar_t, typename index_t>
LITEFPN_HD void mix_load_b(const MixSegment<acc_of<scalar_t>>& s, index_t k0, int tid,
                           const index_t (&off)[kBLoads], const bool (&ok)[kBLoads],
                           acc_of<scalar_t> (*Bs)[kBN + kPad]) {
  const scalar_t* X = static_cast<const scalar_t*>(s.B.data);
  const index_t sC = static_cast<index_t>(s.B.s[1]);
#pragma unroll
  for (int r = 0; r < kBLoads; ++r) {
    int kk, pp;
    mix_b_slot(s.b_ch_contig, tid, r, kk, pp);
    const index_t k = k0 + kk;
    Bs[kk][pp] = ok[r] && k < s.K ? to_acc(X[off[r] + k * sC]) : acc_of<scalar_t>(0);
  }
}

template <int BM, typename acc_t, typename index_t>
LITEFPN_HD void mix_load_a(const MixSegment<acc_t>& s, int64_t M, index_t n, index_t m0,
                           index_t k0, int tid, acc_t (*As)[BM + kPad]) {
  for (int l = tid; l < BM * kBK; l += kThreads) {
    const int mm = l % BM, kk = l / BM;
    const int64_t m = int64_t(m0) + mm, k = int64_t(k0) + kk;
    acc_t v = 0;
    if (m < M && k < s.K) {
      v = s.A[m * s.a_sm + k * s.a_sk] * s.coef;
      if (s.scale != nullptr) v *= s.scale[int64_t(n) * s.K + k];
    }
    As[kk][mm] = v;
  }
}

template <int BM, typename acc_t>
LITEFPN_HD void mix_compute(int tm, int tn, const acc_t (*As)[BM + kPad],
                            const acc_t (*Bs)[kBN + kPad], acc_t (&acc)[BM / kTile][4]) {
  constexpr int TM = BM / kTile;
#pragma unroll
  for (int kk = 0; kk < kBK; ++kk) {
    acc_t av[TM], bv[4];
#pragma unroll
    for (int i = 0; i < TM; ++i) av[i] = As[kk][tm * TM + i];
#pragma unroll
    for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tn * 4 + j];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
  }
}

// out = ca*Up2(coarse) + cb*(y + bias): the lateral_up2_fuse epilogue.
template <typename scalar_t>
struct FuseEpilogue {
  using acc_t = acc_of<scalar_t>;
  View4 coarse, out;
  int64_t C = 0, H = 0, W = 0;  // coarse sizes; out is [N, C, 2H, 2W]
  const acc_t* bias = nullptr;  // [C]
  Up2Scales<acc_t> sc;

  LITEFPN_HD void weights(acc_t& alpha, acc_t& beta) const { sc.weights(alpha, beta); }

  bool vec_out = false;     // out: V-wide vectors along its unit-stride dim (channel or W)
  bool vec_coarse = false;  // coarse: V-wide vectors along C (used when out is channels-fast)

  // Group of up to V consecutive outputs (see mix_epilogue): y = the channel mix there.
  template <int V, typename index_t>
  LITEFPN_HD void store_group(acc_t alpha, acc_t beta, index_t n, index_t m, index_t p,
                              bool along_m, int cnt, const acc_t (&y)[V]) const {
    const index_t Cc = C, Hc = H, Wc = W, Wf = 2 * Wc;
    acc_t o[V];
    if (along_m) {  // one pixel, channels m .. m+cnt-1: coarse taps as vectors along C
      const index_t oy = p / Wf, ox = p - oy * Wf;
      int64_t y0, y1, x0, x1;
      acc_t wy0, wy1, wx0, wx1;
      up2_taps<acc_t>(oy, Hc, y0, y1, wy0, wy1);
      up2_taps<acc_t>(ox, Wc, x0, x1, wx0, wx1);
      const index_t csC = static_cast<index_t>(coarse.s[1]);
      // one coarse row at a time (two V-wide taps live, not four: register pressure), in
      // eager's order wy0*(wx0*v00 + wx1*v01) + wy1*(wx0*v10 + wx1*v11)
      acc_t row[2][V];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const index_t yr = index_t(r == 0 ? y0 : y1);
        acc_t va[V], vb[V];
        if (cnt == V) {
          load_pack<V>(at4<const scalar_t>(coarse, n, m, yr, index_t(x0)), csC, vec_coarse, va);
          load_pack<V>(at4<const scalar_t>(coarse, n, m, yr, index_t(x1)), csC, vec_coarse, vb);
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const index_t me = e < cnt ? m + e : m;  // past C: a valid channel, result unused
            va[e] = to_acc(*at4<const scalar_t>(coarse, n, me, yr, index_t(x0)));
            vb[e] = to_acc(*at4<const scalar_t>(coarse, n, me, yr, index_t(x1)));
          }
        }
#pragma unroll
        for (int e = 0; e < V; ++e) row[r][e] = wx0 * va[e] + wx1 * vb[e];
      }
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const index_t me = e < cnt ? m + e : m, nc = n * Cc + me;
        const acc_t up = wy0 * row[0][e] + wy1 * row[1][e];
        o[e] = sc.coarse_scale(alpha, nc) * up + sc.fine_scale(beta, nc) * (y[e] + bias[me]);
      }
    } else {  // channel m, pixels p .. p+cnt-1: scalar tap gathers (L1 hits), vector store
      const index_t nc = n * Cc + m;
      const acc_t ca = sc.coarse_scale(alpha, nc), cb = sc.fine_scale(beta, nc), b = bias[m];
      const scalar_t* cp = at4<const scalar_t>(coarse, n, m, index_t(0), index_t(0));
      const index_t csH = static_cast<index_t>(coarse.s[2]), csW = static_cast<index_t>(coarse.s[3]);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const index_t pe = e < cnt ? p + e : p, oy = pe / Wf, ox = pe - oy * Wf;
        int64_t y0, y1, x0, x1;
        acc_t wy0, wy1, wx0, wx1;
        up2_taps<acc_t>(oy, Hc, y0, y1, wy0, wy1);
        up2_taps<acc_t>(ox, Wc, x0, x1, wx0, wx1);
        const acc_t up =
            wy0 * (wx0 * to_acc(cp[index_t(y0) * csH + index_t(x0) * csW]) +
                   wx1 * to_acc(cp[index_t(y0) * csH + index_t(x1) * csW])) +
            wy1 * (wx0 * to_acc(cp[index_t(y1) * csH + index_t(x0) * csW]) +
                   wx1 * to_acc(cp[index_t(y1) * csH + index_t(x1) * csW]));
        o[e] = ca * up + cb * (y[e] + b);
      }
    }
    mix_store_group<V, scalar_t, index_t>(out, Wf, n, m, p, along_m, cnt, vec_out, o);
  }
};

// out = y + shift: the grad_z epilogue.
template <typename scalar_t>
struct ShiftEpilogue {
  using acc_t = acc_of<scalar_t>;
  View4 out;                     // [N, M, Hp, Wp]
  int64_t M = 0, Hp = 0, Wp = 0;
  const acc_t* shift = nullptr;  // [M], or null

  LITEFPN_HD void weights(acc_t& alpha, acc_t& beta) const { alpha = beta = acc_t(1); }

  bool vec_out = false;  // out: V-wide vectors along its unit-stride dim

  template <int V, typename index_t>
  LITEFPN_HD void store_group(acc_t, acc_t, index_t n, index_t m, index_t p, bool along_m, int cnt,
                              const acc_t (&y)[V]) const {
    acc_t o[V];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const index_t me = along_m && e < cnt ? m + e : m;
      o[e] = shift != nullptr ? y[e] + shift[me] : y[e];
    }
    mix_store_group<V, scalar_t, index_t>(out, static_cast<index_t>(Wp), n, m, p, along_m, cnt,
                                          vec_out, o);
  }
};

// Tile b = (n*ptiles + pixel tile)*mtiles + channel tile: the channel tiles of one pixel tile
// run side by side and share the activation slice in L2.
struct MixTile {
  int64_t n, m0, p0;
};

template <typename acc_t>
LITEFPN_HD MixTile mix_tile_of(const MixArgs<acc_t>& a, int64_t b, int BM) {
  const int64_t rest = b / a.mtiles;
  return {rest / a.ptiles, (b % a.mtiles) * BM, (rest % a.ptiles) * kBN};
}

// One output tile: acc = sum over segments and kBK slices (fixed order).
template <int BM, typename scalar_t, typename index_t>
__device__ __forceinline__ void mix_tile(const MixArgs<acc_of<scalar_t>>& a, index_t n, index_t m0,
                                         index_t p0, int tid, int tm, int tn,
                                         MixSmem<BM, acc_of<scalar_t>>& sm,
                                         acc_of<scalar_t> (&acc)[BM / kTile][4]) {
#pragma unroll
  for (int i = 0; i < BM / kTile; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0;
#pragma unroll
  for (int si = 0; si < 2; ++si) {
    if (si >= a.nseg) break;
    const MixSegment<acc_of<scalar_t>>& s = a.seg[si];
    index_t off[kBLoads];
    bool ok[kBLoads];
    mix_b_offsets(s, a, n, p0, tid, off, ok);
    for (int64_t k0 = 0; k0 < s.K; k0 += kBK) {
      mix_load_a<BM>(s, a.M, n, m0, static_cast<index_t>(k0), tid, sm.A);
      mix_load_b<scalar_t>(s, static_cast<index_t>(k0), tid, off, ok, sm.B);
      __syncthreads();
      mix_compute<BM>(tm, tn, sm.A, sm.B, acc);
      __syncthreads();  // the next slice overwrites sm
    }
  }
}

// Epilogue of one staged tile (audit F2): consecutive threads take consecutive groups of V =
// 16 bytes' worth of outputs along out's unit-stride dimension (channels when m_fast, else
// pixels), so a warp writes 32 adjacent 16-byte vectors.
template <int BM, typename scalar_t, typename index_t, class Epilogue>
__device__ __forceinline__ void mix_epilogue(const MixArgs<acc_of<scalar_t>>& a, const Epilogue& epi,
                                             acc_of<scalar_t> alpha, acc_of<scalar_t> beta,
                                             index_t n, index_t m0, index_t p0, int tid,
                                             const acc_of<scalar_t>* tile) {
  using acc_t = acc_of<scalar_t>;
  constexpr int V = 16 / sizeof(scalar_t);
  static_assert(BM % V == 0 && kBN % V == 0, "whole groups per tile row");
  const index_t M = static_cast<index_t>(a.M), P = static_cast<index_t>(a.Hp * a.Wp);
  const bool mf = a.m_fast;
  const int per = mf ? BM / V : kBN / V;  // groups along the fast dimension
  for (int q = tid; q < BM * kBN / V; q += kThreads) {
    const int f = (q % per) * V, sl = q / per;
    const int mm = mf ? f : sl, pp = mf ? sl : f;
    const index_t m = m0 + mm, p = p0 + pp;
    if (m >= M || p >= P) continue;
    const index_t rem = mf ? M - m : P - p;
    const int cnt = rem < V ? static_cast<int>(rem) : V;
    acc_t y[V];
#pragma unroll
    for (int e = 0; e < V; ++e) y[e] = tile[mix_out_index<BM>(mf, mm, pp) + e];
    epi.template store_group<V, index_t>(alpha, beta, n, m, p, mf, cnt, y);
  }
}

// A block per output tile (mix_tile_of).
template <typename scalar_t, typename index_t, int BM, class Epilogue>
__global__ void __launch_bounds__(kThreads)
    mix_kernel(const MixArgs<acc_of<scalar_t>> a, const Epilogue epi) {
  using acc_t = acc_of<scalar_t>;
  LITEFPN_SHARED(sm, MixShared<BM, acc_t>);
  const int tid = threadIdx.x;
  int tm, tn;
  mix_roles(a.m_fast, tid, tm, tn);
  acc_t alpha, beta;
  epi.weights(alpha, beta);
  const int64_t tiles = a.N * a.ptiles * a.mtiles;
  for (int64_t b = blockIdx.x; b < tiles; b += gridDim.x) {  // uniform across the block
    const MixTile t = mix_tile_of(a, b, BM);
    const index_t n = static_cast<index_t>(t.n), m0 = static_cast<index_t>(t.m0),
                  p0 = static_cast<index_t>(t.p0);
    acc_t acc[BM / kTile][4];
    mix_tile<BM, scalar_t, index_t>(a, n, m0, p0, tid, tm, tn, sm.op, acc);
    // (mix_tile ends with a barrier: the operand storage is free for the output tile)
#pragma unroll
    for (int i = 0; i < BM / kTile; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        sm.out[mix_out_index<BM>(a.m_fast, tm * (BM / kTile) + i, tn * 4 + j)] = acc[i][j];
    __syncthreads();
    mix_epilogue<BM, scalar_t, index_t>(a, epi, alpha, beta, n, m0, p0, tid, sm.out);
    __syncthreads();  // the next tile's slices overwrite the staged outputs
  }
}

template <typename scalar_t, int BM, class Epilogue>
void mix_launch(const MixArgs<acc_of<scalar_t>>& a, const Epilogue& epi, bool use64) {
  const int64_t tiles = a.N * a.ptiles * a.mtiles;
  if (tiles == 0) return;
  dispatch_index(use64, [&](auto index_tag) {
    using index_t = decltype(index_tag);
    launch<mix_kernel<scalar_t, index_t, BM, Epilogue>>(grid_for(tiles, 1), kThreads, a, epi);
  });
}

// ============================================================================= gram
template <typename acc_t>
struct GramOperand {
  View4 X;                         // [N, C, H, W]
  int64_t C = 0;
  const acc_t* center = nullptr;   // [C], or null (0)
  bool ch_contig = false;          // channel stride 1: load along channels
  bool hw_flat = false;            // pixel p sits at p * stride(3)
};

template <typename acc_t>
struct GramArgs {
  int64_t N = 0, W = 0, HW = 0;
  GramOperand<acc_t> a, b;
  int64_t chunk = 0, nchunks = 0, tiles_a = 0, tiles_b = 0;
  // a's gram with itself (the moments pass: b is a, same centre): symmetric, so only the tile
  // pairs on and above the diagonal run (pairs = T(T+1)/2) and each stores its mirror too
  bool sym = false;
  int64_t pairs = 0;        // tile pairs per (n, chunk)
  acc_t* gram = nullptr;    // [N][nchunks][Ca][Cb] partials (the result when nchunks == 1)
  acc_t* colsum = nullptr;  // [N][nchunks][Ca]
};

// The a tile is BMA channels wide, the b tile BMB: a 32-channel b (z at the finest level) gets a
// 32-wide tile instead of half of a 64-wide one.
template <int BMA, int BMB, typename acc_t>
struct GramSmem {
  alignas(16) acc_t A[kBK][BMA + kPad];  // [pixel][channel of a]
  alignas(16) acc_t B[kBK][BMB + kPad];  // [pixel][channel of b]
};

// S[px][cc] = X[n, c0+cc, p0+px] - center (0 outside the tensor or past p_end).
template <int BM, typename scalar_t, typename index_t>
LITEFPN_HD void gram_load(const GramOperand<acc_of<scalar_t>>& s, int64_t W, index_t n, index_t c0,
                          index_t p0, index_t p_end, int tid, acc_of<scalar_t> (*S)[BM + kPad]) {
  using acc_t = acc_of<scalar_t>;
  const scalar_t* X = static_cast<const scalar_t*>(s.X.data);
  const index_t sN = static_cast<index_t>(s.X.s[0]), sC = static_cast<index_t>(s.X.s[1]),
                sH = static_cast<index_t>(s.X.s[2]), sW = static_cast<index_t>(s.X.s[3]);
  const index_t Wd = W, Cx = s.C;
  for (int l = tid; l < BM * kBK; l += kThreads) {
    int cc, px;
    if (s.ch_contig) {
      cc = l % BM;
      px = l / BM;
    } else {
      px = l % kBK;
      cc = l / kBK;
    }
    const index_t ch = c0 + cc, p = p0 + px;
    acc_t v = 0;
    if (ch < Cx && p < p_end) {
      index_t off;
      if (s.hw_flat) {
        off = p * sW;
      } else {
        const index_t y = p / Wd;
        off = y * sH + (p - y * Wd) * sW;
      }
      v = to_acc(X[n * sN + ch * sC + off]);
      if (s.center != nullptr) v -= s.center[ch];
    }
    S[px][cc] = v;
  }
}

template <int BMA, int BMB, typename acc_t>
LITEFPN_HD void gram_compute(int ti, int tj, const acc_t (*As)[BMA + kPad],
                             const acc_t (*Bs)[BMB + kPad],
                             acc_t (&acc)[BMA / kTile][BMB / kTile]) {
  constexpr int TM = BMA / kTile, TN = BMB / kTile;
#pragma unroll
  for (int k = 0; k < kBK; ++k) {
    acc_t av[TM], bv[TN];
#pragma unroll
    for (int i = 0; i < TM; ++i) av[i] = As[k][ti * TM + i];
#pragma unroll
    for (int j = 0; j < TN; ++j) bv[j] = Bs[k][tj * TN + j];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] += av[i] * bv[j];
  }
}

// Block blk = (n*nchunks + chunk)*pairs + pair: pixels [p_begin, p_end) of sample n, a tile ta,
// b tile tb (pair = ta*tiles_b + tb; symmetric: the pair-th of the (ta, tb >= ta) in row order).
struct GramBlock {
  int64_t n, chunk, ta, tb, p_begin, p_end;
};

template <typename acc_t>
LITEFPN_HD GramBlock gram_block_of(const GramArgs<acc_t>& g, int64_t blk) {
  GramBlock b;
  int64_t pair = blk % g.pairs;
  const int64_t rest = blk / g.pairs;
  if (g.sym) {  // row ta holds tiles_a - ta pairs (a handful: tiles_a <= C/64 + 1)
    b.ta = 0;
    while (pair >= g.tiles_a - b.ta) pair -= g.tiles_a - b.ta++;
    b.tb = b.ta + pair;
  } else {
    b.tb = pair % g.tiles_b;
    b.ta = pair / g.tiles_b;
  }
  b.chunk = rest % g.nchunks;
  b.n = rest / g.nchunks;
  b.p_begin = b.chunk * g.chunk;
  b.p_end = b.p_begin + g.chunk < g.HW ? b.p_begin + g.chunk : g.HW;
  return b;
}

// The block that also sums its a tile's columns: b tile 0, or the diagonal one when symmetric.
template <typename acc_t>
LITEFPN_HD bool gram_sums_columns(const GramArgs<acc_t>& g, const GramBlock& gb) {
  return gb.tb == (g.sym ? gb.ta : 0);
}

// Thread tid's gram cells (and their mirror above the diagonal of a symmetric gram) and, in the
// column-summing block, threads < BMA: one colsum entry.
template <int BMA, int BMB, typename acc_t>
LITEFPN_HD void gram_store(const GramArgs<acc_t>& g, const GramBlock& gb, int tid,
                           const acc_t (&acc)[BMA / kTile][BMB / kTile], acc_t cs) {
  constexpr int TM = BMA / kTile, TN = BMB / kTile;
  const int ti = tid / kTile, tj = tid % kTile;
  const int64_t unit = gb.n * g.nchunks + gb.chunk, Ca = g.a.C, Cb = g.b.C;
  const bool mirror = g.sym && gb.tb != gb.ta;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t r = gb.ta * BMA + ti * TM + i;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t c = gb.tb * BMB + tj * TN + j;
      if (r < Ca && c < Cb) {
        g.gram[(unit * Ca + r) * Cb + c] = acc[i][j];
        // the same products in the same order as cell (c, r) would sum: the same bits
        if (mirror) g.gram[(unit * Ca + c) * Cb + r] = acc[i][j];
      }
    }
  }
  if (gram_sums_columns(g, gb) && tid < BMA && gb.ta * BMA + tid < Ca)
    g.colsum[unit * Ca + gb.ta * BMA + tid] = cs;
}

// A block per (n, chunk, tile pair); see gram_sums_columns for the column sums. A diagonal tile
// of a symmetric gram loads a once and uses it for both operands.
template <typename scalar_t, typename index_t, int BMA, int BMB>
__global__ void __launch_bounds__(kThreads) gram_kernel(const GramArgs<acc_of<scalar_t>> g) {
  using acc_t = acc_of<scalar_t>;
  constexpr int TM = BMA / kTile, TN = BMB / kTile;
  LITEFPN_SHARED(sm, GramSmem<BMA, BMB, acc_t>);
  acc_t(*As)[BMA + kPad] = sm.A;
  acc_t(*Bs)[BMB + kPad] = sm.B;
  const int tid = threadIdx.x, ti = tid / kTile, tj = tid % kTile;
  const int64_t total = g.N * g.nchunks * g.pairs;
  for (int64_t blk = blockIdx.x; blk < total; blk += gridDim.x) {  // uniform across the block
    const GramBlock gb = gram_block_of(g, blk);
    const index_t n = static_cast<index_t>(gb.n);
    const index_t p_end = static_cast<index_t>(gb.p_end);
    const bool sums = gram_sums_columns(g, gb);
    const acc_t(*Bt)[BMB + kPad] = Bs;
    bool load_b = true;
    if constexpr (BMA == BMB) {
      if (g.sym && gb.ta == gb.tb) {
        Bt = As;
        load_b = false;
      }
    }
    acc_t acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = 0;
    acc_t cs = 0;
    for (index_t p0 = static_cast<index_t>(gb.p_begin); p0 < p_end; p0 += kBK) {
      gram_load<BMA, scalar_t, index_t>(g.a, g.W, n, static_cast<index_t>(gb.ta * BMA), p0, p_end, tid, As);
      if (load_b)
        gram_load<BMB, scalar_t, index_t>(g.b, g.W, n, static_cast<index_t>(gb.tb * BMB), p0, p_end, tid, Bs);
      __syncthreads();
      if (sums && tid < BMA) {
#pragma unroll
        for (int k = 0; k < kBK; ++k) cs += As[k][tid];
      }
      gram_compute<BMA, BMB>(ti, tj, As, Bt, acc);
      __syncthreads();  // the next slice overwrites the tiles
    }
    gram_store<BMA, BMB>(g, gb, tid, acc, cs);
  }
}

// ============================================================================= ops
using OptTensor = std::optional<Tensor>;

// ---- plans: kernel arguments from tensors (host only, no launch)
template <typename acc_t>
GramOperand<acc_t> gram_operand(const Tensor& X, const OptTensor& center) {
  GramOperand<acc_t> s;
  s.X = view4(X);
  s.C = X.size(1);
  s.center = center.has_value() ? center->const_data_ptr<acc_t>() : nullptr;
  s.ch_contig = X.size(1) > 1 && X.stride(1) == 1;
  s.hw_flat = X.size(2) == 1 || X.stride(2) == X.size(3) * X.stride(3);
  return s;
}

// Gram arguments without output pointers and the tile widths: b's is 32 when b has at most 32
// channels, a's when both have (else 64).
template <typename acc_t>
GramArgs<acc_t> plan_gram(const Tensor& a, const Tensor& b, const OptTensor& a_center,
                          const OptTensor& b_center, int& BMA, int& BMB) {
  const int64_t Ca = a.size(1), Cb = b.size(1);
  BMB = Cb <= 32 ? 32 : 64;
  BMA = std::max(Ca, Cb) <= 32 ? 32 : 64;
  GramArgs<acc_t> g;
  g.N = a.size(0);
  g.W = a.size(3);
  g.HW = a.size(2) * a.size(3);
  g.a = gram_operand<acc_t>(a, a_center);
  g.b = gram_operand<acc_t>(b, b_center);
  g.chunk = kGramChunk;
  g.nchunks = ceil_div(g.HW, kGramChunk);
  g.tiles_a = ceil_div(Ca, BMA);
  g.tiles_b = std::max<int64_t>(ceil_div(Cb, BMB), 1);  // b tile 0 also yields colsum
  // the same tensor (data, sizes, strides) with the same centre: a's own gram
  g.sym = a.const_data_ptr() == b.const_data_ptr() && a.sizes() == b.sizes() &&
          a.strides() == b.strides() && g.a.center == g.b.center && BMA == BMB;
  g.pairs = g.sym ? g.tiles_a * (g.tiles_a + 1) / 2 : g.tiles_a * g.tiles_b;
  return g;
}

template <typename acc_t>
MixSegment<acc_t> mix_segment(const Tensor& A, int64_t a_sm, int64_t a_sk, const acc_t* scale,
                              acc_t coef, const Tensor& B) {
  MixSegment<acc_t> s;
  s.A = A.const_data_ptr<acc_t>();
  s.a_sm = a_sm;
  s.a_sk = a_sk;
  s.scale = scale;
  s.coef = coef;
  s.K = B.size(1);
  s.B = view4(B);
  s.b_ch_contig = B.size(1) > 1 && B.stride(1) == 1;
  return s;
}

template <typename acc_t>
MixArgs<acc_t> mix_args(const Tensor& out, int BM) {
  MixArgs<acc_t> a;
  a.N = out.size(0);
  a.M = out.size(1);
  a.Hp = out.size(2);
  a.Wp = out.size(3);
  a.mtiles = ceil_div(a.M, BM);
  a.ptiles = ceil_div(a.Hp * a.Wp, kBN);
  a.m_fast = a.M > 1 && out.stride(1) == 1;
  return a;
}

// out = ca*Up2(coarse) + cb*(weight.z + bias); the channel tile is kFuseBM.
constexpr int kFuseBM = 64;

template <typename scalar_t>
std::pair<MixArgs<acc_of<scalar_t>>, FuseEpilogue<scalar_t>> plan_fuse(
    const Tensor& coarse, const Tensor& z, const Tensor& weight, const Tensor& bias,
    const Tensor& out, const OptTensor& w_coarse, const OptTensor& w_fine,
    const OptTensor& gate_coarse, const OptTensor& gate_fine, double eps) {
  using acc_t = acc_of<scalar_t>;
  MixArgs<acc_t> a = mix_args<acc_t>(out, kFuseBM);
  a.seg[0] = mix_segment<acc_t>(weight, /*a_sm=*/z.size(1), /*a_sk=*/1, nullptr, acc_t(1), z);
  a.nseg = 1;
  FuseEpilogue<scalar_t> epi;
  epi.coarse = view4(coarse);
  epi.out = view4(out);
  epi.C = coarse.size(1);
  epi.H = coarse.size(2);
  epi.W = coarse.size(3);
  epi.bias = bias.const_data_ptr<acc_t>();
  epi.sc = make_scales<acc_t>(w_coarse, w_fine, gate_coarse, gate_fine, eps);
  constexpr int V = 16 / sizeof(scalar_t);
  epi.vec_out = vec_ok(out, a.m_fast ? 1 : 3, V);
  epi.vec_coarse = a.m_fast && vec_ok(coarse, 1, V);
  return {a, epi};
}

// grad_z[k] = sum_c weight[c, k]*scale[n, c]*grad_out[c]  -  sum_j quad[k, j]*z[j]  + shift[k];
// the channel tile BM is 32 for C_in <= 32 (the 1/4 level), else 64.
template <typename scalar_t>
std::pair<MixArgs<acc_of<scalar_t>>, ShiftEpilogue<scalar_t>> plan_grad_z(
    const Tensor& grad_out, const Tensor& z, const Tensor& weight, const OptTensor& scale,
    const OptTensor& quad, const OptTensor& shift, const Tensor& grad_z, int& BM) {
  using acc_t = acc_of<scalar_t>;
  const int64_t Cin = z.size(1);
  BM = Cin <= 32 ? 32 : 64;
  MixArgs<acc_t> a = mix_args<acc_t>(grad_z, BM);
  a.seg[0] = mix_segment<acc_t>(weight, /*a_sm=*/1, /*a_sk=*/Cin,
                                scale.has_value() ? scale->const_data_ptr<acc_t>() : nullptr,
                                acc_t(1), grad_out);
  a.nseg = 1;
  if (quad.has_value()) {
    a.seg[1] = mix_segment<acc_t>(*quad, /*a_sm=*/Cin, /*a_sk=*/1, nullptr, acc_t(-1), z);
    a.nseg = 2;
  }
  ShiftEpilogue<scalar_t> epi;
  epi.out = view4(grad_z);
  epi.M = Cin;
  epi.Hp = z.size(2);
  epi.Wp = z.size(3);
  epi.shift = shift.has_value() ? shift->const_data_ptr<acc_t>() : nullptr;
  epi.vec_out = vec_ok(grad_z, a.m_fast ? 1 : 3, 16 / sizeof(scalar_t));
  return {a, epi};
}

std::tuple<Tensor, Tensor> lateral_gram_cuda(const Tensor& a, const Tensor& b,
                                             const OptTensor& a_center, const OptTensor& b_center) {
  constexpr const char* op = "_lateral_gram";
  check_4d(op, "a", a);
  check_4d(op, "b", b);
  check_on_device(op, "a", a);
  check_device(op, "b", b, a);
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), op, ": b has dtype ", b.scalar_type(),
              " but a has dtype ", a.scalar_type());
  TORCH_CHECK(b.size(0) == a.size(0) && b.size(2) == a.size(2) && b.size(3) == a.size(3), op,
              ": a and b must agree in batch and spatial size, got a ", a.sizes(), " and b ",
              b.sizes());
  const int64_t N = a.size(0), Ca = a.size(1), Cb = b.size(1), HW = a.size(2) * a.size(3);
  const at::ScalarType acc = acc_scalar_type(a.scalar_type());
  if (a_center.has_value()) check_small(op, "a_center", *a_center, a, {Ca}, acc);
  if (b_center.has_value()) check_small(op, "b_center", *b_center, a, {Cb}, acc);
  const DeviceGuard guard(a.device());
  const auto opts = a.options().dtype(acc);
  Tensor gram = at::empty({N, Ca, Cb}, opts);
  Tensor colsum = at::empty({N, Ca}, opts);
  if (N == 0 || Ca == 0) return {gram, colsum};
  if (HW == 0) return {gram.zero_(), colsum.zero_()};
  const bool use64 = any_needs_int64({&a, &b});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), op, [&] {
    using acc_t = acc_of<scalar_t>;
    int BMA = 64, BMB = 64;
    GramArgs<acc_t> g = plan_gram<acc_t>(a, b, a_center, b_center, BMA, BMB);
    const int64_t K = g.nchunks;
    // Per-chunk partials, summed in chunk order below; one chunk writes the results directly.
    Tensor gram_part = K > 1 ? at::empty({N * K * Ca * Cb}, opts) : gram;
    Tensor colsum_part = K > 1 ? at::empty({N * K * Ca}, opts) : colsum;
    g.gram = gram_part.mutable_data_ptr<acc_t>();
    g.colsum = colsum_part.mutable_data_ptr<acc_t>();
    const unsigned int blocks = grid_for(N * K * g.pairs, 1);
    dispatch_index(use64, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      if (BMA == 32) {
        launch<gram_kernel<scalar_t, index_t, 32, 32>>(blocks, kThreads, g);
      } else if (BMB == 32) {
        launch<gram_kernel<scalar_t, index_t, 64, 32>>(blocks, kThreads, g);
      } else {
        launch<gram_kernel<scalar_t, index_t, 64, 64>>(blocks, kThreads, g);
      }
    });
    if (K > 1) {
      sum_partials<acc_t>(gram_part, gram, N, Ca * Cb, K, K * Ca * Cb, 1, Ca * Cb);
      sum_partials<acc_t>(colsum_part, colsum, N, Ca, K, K * Ca, 1, Ca);
    }
  });
  return {gram, colsum};
}

Tensor lateral_up2_fuse_fwd_cuda(const Tensor& coarse, const Tensor& z, const Tensor& weight,
                                 const Tensor& bias, const OptTensor& w_coarse,
                                 const OptTensor& w_fine, const OptTensor& gate_coarse,
                                 const OptTensor& gate_fine, double eps) {
  constexpr const char* op = "_lateral_up2_fuse_fwd";
  check_4d(op, "coarse", coarse);
  check_4d(op, "z", z);
  check_on_device(op, "coarse", coarse);
  check_device(op, "z", z, coarse);
  TORCH_CHECK(z.scalar_type() == coarse.scalar_type(), op, ": z has dtype ", z.scalar_type(),
              " but coarse has dtype ", coarse.scalar_type());
  const int64_t N = coarse.size(0), C = coarse.size(1), H = coarse.size(2), W = coarse.size(3);
  const int64_t Cin = z.size(1);
  TORCH_CHECK(z.size(0) == N && z.size(2) == 2 * H && z.size(3) == 2 * W, op,
              ": z must be [N, C_in, 2H, 2W] for coarse [N, C, H, W]; got coarse ",
              coarse.sizes(), " and z ", z.sizes());
  const at::ScalarType acc = acc_scalar_type(z.scalar_type());
  check_small(op, "weight", weight, coarse, {C, Cin}, acc);
  check_small(op, "bias", bias, coarse, {C}, acc);
  check_fusion_params(op, coarse, N, C, w_coarse, w_fine, gate_coarse, gate_fine);
  const DeviceGuard guard(z.device());
  // channels_last exactly when z is densely channels_last (and not also contiguous): the rule
  // of every backend and of the fake kernel (ops.py, _out_like_z)
  const bool z_cl = z.is_contiguous(at::MemoryFormat::ChannelsLast) && !z.is_contiguous();
  Tensor out = at::empty({N, C, 2 * H, 2 * W},
                         z.options().memory_format(z_cl ? at::MemoryFormat::ChannelsLast
                                                        : at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const bool use64 = any_needs_int64({&coarse, &z, &out});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), op, [&] {
    const auto plan = plan_fuse<scalar_t>(coarse, z, weight, bias, out, w_coarse, w_fine,
                                          gate_coarse, gate_fine, eps);
    mix_launch<scalar_t, kFuseBM>(plan.first, plan.second, use64);
  });
  return out;
}

Tensor lateral_grad_z_cuda(const Tensor& grad_out, const Tensor& z, const Tensor& weight,
                           const OptTensor& scale, const OptTensor& quad, const OptTensor& shift) {
  constexpr const char* op = "_lateral_grad_z";
  check_4d(op, "grad_out", grad_out);
  check_4d(op, "z", z);
  check_on_device(op, "z", z);
  check_device(op, "grad_out", grad_out, z);
  TORCH_CHECK(grad_out.scalar_type() == z.scalar_type(), op, ": grad_out has dtype ",
              grad_out.scalar_type(), " but z has dtype ", z.scalar_type());
  const int64_t N = z.size(0), Cin = z.size(1), C = grad_out.size(1);
  TORCH_CHECK(grad_out.size(0) == N && grad_out.size(2) == z.size(2) &&
                  grad_out.size(3) == z.size(3),
              op, ": grad_out must be [N, C, H, W] for z [N, C_in, H, W]; got grad_out ",
              grad_out.sizes(), " and z ", z.sizes());
  const at::ScalarType acc = acc_scalar_type(z.scalar_type());
  check_small(op, "weight", weight, z, {C, Cin}, acc);
  if (scale.has_value()) check_small(op, "scale", *scale, z, {N, C}, acc);
  if (quad.has_value()) check_small(op, "quad", *quad, z, {Cin, Cin}, acc);
  if (shift.has_value()) check_small(op, "shift", *shift, z, {Cin}, acc);
  const DeviceGuard guard(z.device());
  Tensor grad_z = at::empty_like(z);
  if (grad_z.numel() == 0) return grad_z;
  const bool use64 = any_needs_int64({&grad_out, &z, &grad_z});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), op, [&] {
    int BM = 64;
    const auto plan = plan_grad_z<scalar_t>(grad_out, z, weight, scale, quad, shift, grad_z, BM);
    if (BM == 32) {
      mix_launch<scalar_t, 32>(plan.first, plan.second, use64);
    } else {
      mix_launch<scalar_t, 64>(plan.first, plan.second, use64);
    }
  });
  return grad_z;
}

}  // namespace
}  // namespace cuda
}  // namespace litefpn
