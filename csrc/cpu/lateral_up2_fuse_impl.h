// The CPU compute kernels of lateral_up2_fuse: _lateral_gram, _lateral_up2_fuse_fwd and
// _lateral_grad_z (schemas in csrc/ops.cpp). Like up2_fuse_impl.h, this file is included INSIDE a
// per-ISA namespace (csrc/cpu/isa/<isa>.cpp), after common/row_io.h, whose helpers it uses
// (to_acc / put conversions, load_row / store_row / load_prow / store_prow, row_blend2, Lanes /
// reduce_lanes): no #include, no #pragma once, everything static or in that namespace.
//
// One micro-kernel serves every GEMM here:
//     acc[r][v] += S(r, k) * R[k][v*L .. v*L+L)      r < MR, v < NV, k < K
// S is read by scalar broadcasts at any strides (S(r, k) = S[r*sr + k*sk]), R by 32-byte vector
// loads from rows of stride ldr; acc lives in MR*NV vector registers (6 x 2 = 12 of the 16 ymm
// registers with AVX2). The three operators map onto it as
//   gram:        r = channel i of a, k = pixel, R = b panel [pixel][channel j]; acc = gram tile
//   "plane" GEMM (output with unit pixel stride): r = output channel, S = weights,
//                k = input channel, R = input panel [channel][pixels]; acc = out[m][p]
//   "nhwc" GEMM  (output with unit channel stride): r = pixel, S = input [pixel, channel],
//                R = weights [input channel][output channels]; acc = out[p][m]
// Work goes one panel (kLatPanel pixels of one fine row) at a time. R operands are always
// packed per panel (lat_pack: tiles of TW columns, contiguous, zero padded, so vector loads never
// run past a row and rows 32 KiB apart in an NCHW tensor do not fight over the cache sets); S
// operands are read in place when they are acc_t with a friendly stride, else staged (lat_stage:
// conversion from fp16/bf16, centring, other strides). Nothing the size of an activation is
// ever copied, and every stride works.
//
// Arithmetic is in acc_t (float, or double for double storage). The AVX2 build uses FMA
// intrinsics in the micro-kernel; the baseline build multiplies and adds. Reductions (gram) run
// in a fixed order inside a unit, never across units, so results do not depend on the number of
// threads.

// ----------------------------------------------------------------------------- vectors
#if defined(__GNUC__) && !defined(__clang__)
// 32-byte vectors in the baseline build: every function taking them is static and inlined, so
// the ABI note GCC gives about passing them without AVX does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
// LITEFPN_ISA_AVX512 (1 in isa/avx512.cpp): 64-byte vectors (16 floats, 8
// doubles) and AVX-512 intrinsics; else 32-byte vectors (AVX2 intrinsics with LITEFPN_ISA_AVX2,
// plain vector arithmetic in the baseline build). The tile shape and every sum's order are the
// same for every width; the last bits can still differ between builds where the compiler
// contracts an epilogue's a*b + c into an FMA differently (seen in the plane paths).
constexpr int kLatVecBytes = LITEFPN_ISA_AVX512 ? 64 : 32;
template <typename T>
struct LatVec {
  typedef T type __attribute__((vector_size(kLatVecBytes)));
  static constexpr int L = kLatVecBytes / static_cast<int>(sizeof(T));
};

template <typename T>
static inline __attribute__((always_inline)) typename LatVec<T>::type lv_load(const T* p) {
  typename LatVec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
static inline __attribute__((always_inline)) void lv_store(T* p, typename LatVec<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}
// broadcast (vbroadcastss / vbroadcastsd: element-wise construction compiles to inserts) and
// a*b + c (an explicit FMA: one rounding, whatever the compiler's contraction does)
#if LITEFPN_ISA_AVX512
static inline __attribute__((always_inline)) LatVec<float>::type lv_set1_(float s) {
  return _mm512_set1_ps(s);
}
static inline __attribute__((always_inline)) LatVec<double>::type lv_set1_(double s) {
  return _mm512_set1_pd(s);
}
static inline __attribute__((always_inline)) LatVec<float>::type lv_fma(LatVec<float>::type a,
                                                                         LatVec<float>::type b,
                                                                         LatVec<float>::type c) {
  return _mm512_fmadd_ps(a, b, c);
}
static inline __attribute__((always_inline)) LatVec<double>::type lv_fma(LatVec<double>::type a,
                                                                          LatVec<double>::type b,
                                                                          LatVec<double>::type c) {
  return _mm512_fmadd_pd(a, b, c);
}
#elif LITEFPN_ISA_AVX2
static inline __attribute__((always_inline)) LatVec<float>::type lv_set1_(float s) {
  return _mm256_set1_ps(s);
}
static inline __attribute__((always_inline)) LatVec<double>::type lv_set1_(double s) {
  return _mm256_set1_pd(s);
}
static inline __attribute__((always_inline)) LatVec<float>::type lv_fma(LatVec<float>::type a,
                                                                         LatVec<float>::type b,
                                                                         LatVec<float>::type c) {
  return _mm256_fmadd_ps(a, b, c);
}
static inline __attribute__((always_inline)) LatVec<double>::type lv_fma(LatVec<double>::type a,
                                                                          LatVec<double>::type b,
                                                                          LatVec<double>::type c) {
  return _mm256_fmadd_pd(a, b, c);
}
#else
static inline __attribute__((always_inline)) LatVec<float>::type lv_set1_(float s) {
  return LatVec<float>::type{s, s, s, s, s, s, s, s};
}
static inline __attribute__((always_inline)) LatVec<double>::type lv_set1_(double s) {
  return LatVec<double>::type{s, s, s, s};
}
template <typename V>
static inline __attribute__((always_inline)) V lv_fma(V a, V b, V c) {
  return a * b + c;
}
#endif
template <typename T>
static inline __attribute__((always_inline)) typename LatVec<T>::type lv_set1(T s) {
  return lv_set1_(s);
}

template <int V>
using LatInt = std::integral_constant<int, V>;

// Calls f(LatInt<MR>, LatInt<NV>) for 1 <= mr <= kLatMR, 1 <= nv <= kLatNV (edge tiles).
template <typename F>
static inline void lat_tile_dispatch(int mr, int nv, F&& f) {
  static_assert(kLatMR == 6 && kLatNV == 2, "update lat_tile_dispatch");
  switch (mr * 4 + nv) {
    case 1 * 4 + 1: f(LatInt<1>{}, LatInt<1>{}); break;
    case 1 * 4 + 2: f(LatInt<1>{}, LatInt<2>{}); break;
    case 2 * 4 + 1: f(LatInt<2>{}, LatInt<1>{}); break;
    case 2 * 4 + 2: f(LatInt<2>{}, LatInt<2>{}); break;
    case 3 * 4 + 1: f(LatInt<3>{}, LatInt<1>{}); break;
    case 3 * 4 + 2: f(LatInt<3>{}, LatInt<2>{}); break;
    case 4 * 4 + 1: f(LatInt<4>{}, LatInt<1>{}); break;
    case 4 * 4 + 2: f(LatInt<4>{}, LatInt<2>{}); break;
    case 5 * 4 + 1: f(LatInt<5>{}, LatInt<1>{}); break;
    case 5 * 4 + 2: f(LatInt<5>{}, LatInt<2>{}); break;
    case 6 * 4 + 1: f(LatInt<6>{}, LatInt<1>{}); break;
    default: f(LatInt<6>{}, LatInt<2>{}); break;
  }
}

// ----------------------------------------------------------------------------- micro-kernel
template <int MR, int NV, typename T>
struct LatTile {
  using V = typename LatVec<T>::type;
  static constexpr int L = LatVec<T>::L;
  V acc[MR][NV];

  inline __attribute__((always_inline)) void zero() {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = lv_set1<T>(T(0));
  }
  // acc[r][v] = row[r] (a broadcast value per row)
  inline __attribute__((always_inline)) void set_rows(const T* row) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const V b = lv_set1<T>(row[r]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = b;
    }
  }
  // acc[r][v] = col[v*L ..] (the same vector row for every r)
  inline __attribute__((always_inline)) void set_cols(const T* col) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const V c = lv_load(col + v * L);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) acc[r][v] = c;
    }
  }
  // acc += S R over k < K (see the top of the file)
  inline __attribute__((always_inline)) void gemm(const T* __restrict S, int64_t sr, int64_t sk,
                                                  const T* __restrict R, int64_t ldr, int64_t K) {
    V a[MR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) a[r][v] = acc[r][v];
    int64_t off[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) off[r] = r * sr;
    for (int64_t k = 0; k < K; ++k) {
      V w[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) w[v] = lv_load(R + v * L);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const V b = lv_set1<T>(S[off[r]]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) a[r][v] = lv_fma(b, w[v], a[r][v]);
      }
      S += sk;
      R += ldr;
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = a[r][v];
  }
  // D[r*ldd + c] = acc, c < ncols (<= NV*L); D has unit column stride.
  // (Non-temporal stores were tried for the outputs: slower, since the page-fault zeroing of a
  // fresh output leaves its lines in the cache.)
  inline __attribute__((always_inline)) void store(T* D, int64_t ldd, int64_t ncols) const {
    if (ncols >= NV * L) {
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) lv_store(D + r * ldd + v * L, acc[r][v]);
    } else {
      for (int r = 0; r < MR; ++r) {
        T tmp[NV * L];
        for (int v = 0; v < NV; ++v) lv_store(tmp + v * L, acc[r][v]);
        for (int64_t c = 0; c < ncols; ++c) D[r * ldd + c] = tmp[c];
      }
    }
  }
};

// ----------------------------------------------------------------------------- packing
// R operands (vector loads). Stages the R x K block src(r, k) = src[r*s_r + k*s_k] (minus a
// centre per r, if given) as tiles of T rows: dst[(r/T)*K*T + k*T + r%T], rows R..round(R, T)
// zero. TT: T when known at compile time (then full tiles copy with fixed-size loops), else 0.
// The loop order follows the source's contiguity.
template <int TT, typename acc_t, typename scalar_t>
static void lat_pack(acc_t* __restrict dst, int64_t T, const scalar_t* __restrict src, int64_t s_r,
                     int64_t s_k, int64_t R, int64_t K, const acc_t* __restrict center) {
  if (TT > 0) T = TT;
  const int64_t Rp = (R + T - 1) / T * T;
  if (s_r == 1 && s_k != 1) {
    const int64_t Rf = TT > 0 && center == nullptr ? R / T * T : 0;  // fixed-size full tiles
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* s = src + k * s_k;
      for (int64_t r0 = 0; r0 < Rf; r0 += T) {
        acc_t* d = dst + r0 * K + k * T;
        for (int i = 0; i < TT; ++i) d[i] = to_acc(s[r0 + i]);
      }
      for (int64_t r0 = Rf; r0 < R; r0 += T) {
        acc_t* d = dst + r0 * K + k * T;
        const int64_t nr = R - r0 < T ? R - r0 : T;
        if (center) {
          for (int64_t i = 0; i < nr; ++i) d[i] = to_acc(s[r0 + i]) - center[r0 + i];
        } else {
          for (int64_t i = 0; i < nr; ++i) d[i] = to_acc(s[r0 + i]);
        }
      }
    }
  } else if (s_k == 1 && s_r != 1 && Rp == T) {  // a single tile: a transpose, dst[k*T + r]
    transpose_load(dst, T, src, s_r, K, R, center);
  } else {
    for (int64_t r = 0; r < R; ++r) {
      const scalar_t* s = src + r * s_r;
      acc_t* d = dst + (r / T) * K * T + r % T;
      const acc_t c = center ? center[r] : acc_t(0);
      if (s_k == 1) {
        for (int64_t k = 0; k < K; ++k) d[k * T] = to_acc(s[k]) - c;
      } else {
        for (int64_t k = 0; k < K; ++k) d[k * T] = to_acc(s[k * s_k]) - c;
      }
    }
  }
  for (int64_t r = R; r < Rp; ++r) {
    acc_t* d = dst + (r / T) * K * T + r % T;
    for (int64_t k = 0; k < K; ++k) d[k * T] = acc_t(0);
  }
}

// S operands (scalar broadcasts). Stages the R x K block src(r, k) = src[r*s_r + k*s_k] (minus
// a centre per r) as rows along the source's unit-stride dimension, so the copy is contiguous:
//   s_r == 1: dst[k*ld + r], S strides (sr, sk) = (1, ld)
//   else:     dst[r*ld + k], S strides (sr, sk) = (ld, 1)
// ld = lat_stage_ld(n) (lateral_up2_fuse_kernels.h): rows whose starts do not alias in the cache sets;
// lat_stage_elems bounds the size.

template <typename acc_t, typename scalar_t>
static void lat_stage(acc_t* __restrict dst, const scalar_t* __restrict src, int64_t s_r,
                      int64_t s_k, int64_t R, int64_t K, const acc_t* __restrict center,
                      int64_t& sr, int64_t& sk) {
  if (s_r == 1 && s_k != 1) {
    const int64_t ld = lat_stage_ld(R);
    for (int64_t k = 0; k < K; ++k) {
      acc_t* d = dst + k * ld;
      const scalar_t* sp = src + k * s_k;
      if (center) {
        for (int64_t r = 0; r < R; ++r) d[r] = to_acc(sp[r]) - center[r];
      } else {
        load_row(d, sp, R, int64_t(1));
      }
    }
    sr = 1, sk = ld;
  } else {
    const int64_t ld = lat_stage_ld(K);
    for (int64_t r = 0; r < R; ++r) {
      acc_t* d = dst + r * ld;
      load_row(d, src + r * s_r, K, s_k);
      if (center) {
        const acc_t c = center[r];
        for (int64_t k = 0; k < K; ++k) d[k] -= c;
      }
    }
    sr = ld, sk = 1;
  }
}

// Staging buffers carved from one task's scratch, in order.
template <typename acc_t>
struct LatScratch {
  acc_t* p;
  acc_t* take(int64_t n) {
    acc_t* r = p;
    p += lat_seg(n);
    return r;
  }
};

static inline int64_t lat_min(int64_t a, int64_t b) { return a < b ? a : b; }

// ----------------------------------------------------------------------------- gram
// Sum of n contiguous values in a fixed order: lane k takes the elements x with x % L == k, the
// lanes are combined by a fixed pairwise tree (Lanes / reduce_lanes of common/row_io.h).
template <typename T>
static inline T lat_sum_lanes(const T* __restrict x, int64_t n) {
  constexpr int L = Lanes<T>::L;
  T l[L];
  for (int k = 0; k < L; ++k) l[k] = T(0);
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int k = 0; k < L; ++k) l[k] += x[i + k];
  for (int k = 0; i + k < n; ++k) l[k] += x[i + k];
  return reduce_lanes(l);
}

// Unit u = (n, chunk of fine rows) -> part[u] = [Ca][cbp] gram sums, then [Ca] column sums, over
// the unit's pixels, one panel at a time: a panel's products are summed in registers (pixel
// order), its column sums in lanes, then both are added to the unit's fp32/fp64 partial (panel
// order).
template <typename scalar_t>
static void lat_gram(const LatGramArgs& a, int64_t begin, int64_t end, void* scratch) {
  using acc_t = typename Acc<scalar_t>::type;
  using V = typename LatVec<acc_t>::type;
  constexpr int L = LatVec<acc_t>::L;
  constexpr int TW = kLatNV * L;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  const int64_t Ca = a.Ca, Cb = a.Cb, W = a.W, cbp = a.cbp, PB = kLatPanel;
  LatScratch<acc_t> scr{static_cast<acc_t*>(scratch)};
  acc_t* const bt = scr.take(PB * cbp);                 // [pixel][cbp]
  acc_t* const at = scr.take(lat_stage_elems(Ca, PB));  // staged a (lat_stage)
  acc_t* const pcs = scr.take(Ca);                      // column sums of one panel
  const acc_t* const ac = static_cast<const acc_t*>(a.a_center);
  const acc_t* const bc = static_cast<const acc_t*>(a.b_center);
  const int64_t *as = a.a.s, *bs = a.b.s;
  const bool a_direct = kSame && ac == nullptr && !a.same;
  const scalar_t* const adat = static_cast<const scalar_t*>(a.a.data);
  const scalar_t* const bdat = static_cast<const scalar_t*>(a.b.data);
  const int64_t part_elems = Ca * cbp + Ca;

  for (int64_t u = begin; u < end; ++u) {
    const int64_t n = u / a.nchunks, chunk = u % a.nchunks;
    const int64_t yb = chunk * a.rows_per_chunk, ye = lat_min(yb + a.rows_per_chunk, a.H);
    acc_t* const part = static_cast<acc_t*>(a.part) + u * part_elems;
    acc_t* const colsum = part + Ca * cbp;
    for (int64_t i = 0; i < part_elems; ++i) part[i] = acc_t(0);
    for (int64_t y = yb; y < ye; ++y) {
      for (int64_t x0 = 0; x0 < W; x0 += PB) {
        const int64_t np = lat_min(PB, W - x0);
        // b panel -> bt[p][j] = b - b_center, zero up to cbp
        if (cbp > 0)
          lat_pack<0>(bt, cbp, bdat + n * bs[0] + y * bs[2] + x0 * bs[3], bs[1], bs[3], Cb, np,
                      bc);
        const acc_t* S;
        int64_t sr, sk;
        if (a.same) {
          S = bt, sr = 1, sk = cbp;
        } else if (a_direct) {
          S = reinterpret_cast<const acc_t*>(adat + n * as[0] + y * as[2] + x0 * as[3]);
          sr = as[1], sk = as[3];
        } else {
          lat_stage(at, adat + n * as[0] + y * as[2] + x0 * as[3], as[1], as[3], Ca, np, ac, sr,
                    sk);
          S = at;
        }
        for (int64_t i0 = 0; i0 < Ca; i0 += kLatMR) {
          const int mr = static_cast<int>(lat_min(kLatMR, Ca - i0));
          const acc_t* Si = S + i0 * sr;
          for (int64_t j0 = 0; j0 < cbp; j0 += TW) {
            // a's own gram is symmetric (bitwise: each entry is the same products in the same
            // order): tiles wholly below the diagonal are skipped, the combination reads them
            // mirrored (lateral_gram_cpu)
            if (a.same && j0 + TW <= i0) continue;
            const int nv = static_cast<int>(lat_min(kLatNV, (cbp - j0) / L));
            lat_tile_dispatch(mr, nv, [&](auto MRc, auto NVc) {
              constexpr int MR = decltype(MRc)::value, NV = decltype(NVc)::value;
              LatTile<MR, NV, acc_t> t;
              t.zero();
              t.gemm(Si, sr, sk, bt + j0, cbp, np);
              for (int r = 0; r < MR; ++r) {
                acc_t* prow = part + (i0 + r) * cbp + j0;
                for (int v = 0; v < NV; ++v)
                  lv_store(prow + v * L, V(lv_load(prow + v * L) + t.acc[r][v]));
              }
            });
          }
          // column sums of these rows while they are in L1 (rows with unit pixel stride)
          if (sk == 1)
            for (int r = 0; r < mr; ++r) pcs[i0 + r] = lat_sum_lanes(Si + r * sr, np);
        }
        if (sk != 1) {  // pixel rows: sums over the pixels, channel by channel
          for (int64_t i = 0; i < Ca; ++i) pcs[i] = acc_t(0);
          for (int64_t p = 0; p < np; ++p) {
            const acc_t* row = S + p * sk;
            if (sr == 1) {
              for (int64_t i = 0; i < Ca; ++i) pcs[i] += row[i];
            } else {
              for (int64_t i = 0; i < Ca; ++i) pcs[i] += row[i * sr];
            }
          }
        }
        for (int64_t i = 0; i < Ca; ++i) colsum[i] += pcs[i];
      }
    }
  }
}

// ----------------------------------------------------------------------------- forward
// Horizontal 2x of a padded coarse run vp[k] = v[clamp(jb-1+k)], k < nc+2, to fine columns
// x0 + [0, 2nc) (x0 = 2jb): the taps of litefpn::up2_taps; x = 0 has its own (1, 0).
template <typename T>
static inline void lat_row_up2(T* __restrict o, const T* __restrict vp, int64_t nc, int64_t x0,
                               int64_t Wc) {
  int64_t e0, e1, o0, o1, z0, z1;
  T we0, we1, wo0, wo1, wz0, wz1;
  ::litefpn::up2_taps<T>(2, Wc, e0, e1, we0, we1);
  ::litefpn::up2_taps<T>(1, Wc, o0, o1, wo0, wo1);
  ::litefpn::up2_taps<T>(0, Wc, z0, z1, wz0, wz1);
  for (int64_t j = 0; j < nc; ++j) {
    o[2 * j] = we0 * vp[j] + we1 * vp[j + 1];
    o[2 * j + 1] = wo0 * vp[j + 1] + wo1 * vp[j + 2];
  }
  if (x0 == 0) o[0] = wz0 * vp[1 + z0] + wz1 * vp[1 + z1];
}

// The coarse columns of a panel: jb-1 .. jb+nc, clamped to [0, W).
static inline int64_t lat_ccol(int64_t jb, int64_t k, int64_t W) {
  const int64_t j = jb - 1 + k;
  return j < 0 ? 0 : (j >= W ? W - 1 : j);
}

// Plane path (out has unit pixel stride): unit = (n, chunk of coarse rows); per fine row y and
// panel: z panel packed as [pixel tile][Cin][TW]; then for each block of MR output channels the
// rows U = ca*Up2(coarse) (vertical blend, horizontal 2x) and the tiles
// out = U + cb*(W z + bias), written straight to out (or to a staging row block).
template <typename scalar_t>
static void lat_fwd_plane(const LatFwdArgs& a, int64_t begin, int64_t end, void* scratch) {
  using acc_t = typename Acc<scalar_t>::type;
  using V = typename LatVec<acc_t>::type;
  constexpr int L = LatVec<acc_t>::L;
  constexpr int TW = kLatNV * L;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  const int64_t C = a.C, Cin = a.Cin, H = a.H, W = a.W, W2 = 2 * W, PB = kLatPanel;
  const int64_t pbl = lat_round(PB, TW), wc = PB / 2 + 2;
  LatScratch<acc_t> scr{static_cast<acc_t*>(scratch)};
  acc_t* const zp = scr.take(Cin * pbl);
  acc_t* const ub = scr.take(kLatMR * pbl);
  acc_t* const vp = scr.take(wc);
  acc_t* const cr0 = scr.take(wc);
  acc_t* const cr1 = scr.take(wc);
  acc_t* const ob = scr.take(C * pbl);
  const scalar_t* const cdat = static_cast<const scalar_t*>(a.coarse.data);
  const scalar_t* const zdat = static_cast<const scalar_t*>(a.z.data);
  scalar_t* const odat = static_cast<scalar_t*>(a.out.data);
  const int64_t *cs = a.coarse.s, *zs = a.z.s, *os = a.out.s;
  const bool o_direct = kSame && os[3] == 1;
  const bool c_direct = kSame && cs[3] == 1;
  const acc_t* const Wt = static_cast<const acc_t*>(a.weight);
  const acc_t* const bias = static_cast<const acc_t*>(a.bias);

  for (int64_t u = begin; u < end; ++u) {
    const int64_t n = u / a.nchunks, chunk = u % a.nchunks;
    const int64_t ib = chunk * a.rows_per_chunk, ie = lat_min(ib + a.rows_per_chunk, H);
    const acc_t* const CA = static_cast<const acc_t*>(a.ca) + n * a.cpad;
    const acc_t* const CB = static_cast<const acc_t*>(a.cb) + n * a.cpad;
    for (int64_t y = 2 * ib; y < 2 * ie; ++y) {
      int64_t i0, i1;
      acc_t w0, w1;
      ::litefpn::up2_taps<acc_t>(y, H, i0, i1, w0, w1);
      for (int64_t x0 = 0; x0 < W2; x0 += PB) {
        const int64_t np = lat_min(PB, W2 - x0), jb = x0 / 2, nc = np / 2;
        const int64_t npt = lat_round(np, L);  // pixels computed (full vectors)
        lat_pack<TW>(zp, TW, zdat + n * zs[0] + y * zs[2] + x0 * zs[3], zs[3], zs[1], np, Cin,
                     static_cast<const acc_t*>(nullptr));
        for (int64_t c0 = 0; c0 < C; c0 += kLatMR) {
          const int mr = static_cast<int>(lat_min(kLatMR, C - c0));
          // U rows of channels c0 .. c0+mr
          for (int r = 0; r < mr; ++r) {
            const int64_t c = c0 + r;
            const scalar_t* base = cdat + n * cs[0] + c * cs[1];
            const acc_t ca = CA[c];
            const acc_t a0 = ca * w0, a1 = ca * w1;
            const int64_t jl = lat_ccol(jb, 0, W), jr = lat_ccol(jb, nc + 1, W);
            if (i1 + 1 < H) {  // the coarse row the next fine rows read first (NCHW: no HW prefetch)
              const char* pf = reinterpret_cast<const char*>(base + (i1 + 1) * cs[2] + jb * cs[3]);
              const int64_t bytes = nc * cs[3] * int64_t(sizeof(scalar_t));
              for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(pf + o);
            }
            if (c_direct) {
              const acc_t* r0 = reinterpret_cast<const acc_t*>(base + i0 * cs[2]);
              const acc_t* r1 = reinterpret_cast<const acc_t*>(base + i1 * cs[2]);
              // vp[1 .. nc] = columns jb .. jb+nc-1 (in range); the two ends clamped
              row_blend2(vp + 1, r0 + jb, r1 + jb, a0, a1, nc);
              vp[0] = a0 * r0[jl] + a1 * r1[jl];
              vp[nc + 1] = a0 * r0[jr] + a1 * r1[jr];
            } else {
              const scalar_t* r0 = base + i0 * cs[2];
              const scalar_t* r1 = base + i1 * cs[2];
              cr0[0] = to_acc(r0[jl * cs[3]]);
              cr1[0] = to_acc(r1[jl * cs[3]]);
              load_row(cr0 + 1, r0 + jb * cs[3], nc, cs[3]);
              load_row(cr1 + 1, r1 + jb * cs[3], nc, cs[3]);
              cr0[nc + 1] = to_acc(r0[jr * cs[3]]);
              cr1[nc + 1] = to_acc(r1[jr * cs[3]]);
              row_blend2(vp, cr0, cr1, a0, a1, nc + 2);
            }
            acc_t* urow = ub + r * pbl;
            lat_row_up2(urow, vp, nc, x0, W);
            for (int64_t p = np; p < npt; ++p) urow[p] = acc_t(0);
          }
          acc_t* D;
          int64_t ldd;
          if (o_direct) {
            D = reinterpret_cast<acc_t*>(odat + n * os[0] + c0 * os[1] + y * os[2] + x0);
            ldd = os[1];
          } else {
            D = ob + c0 * pbl;
            ldd = pbl;
          }
          for (int64_t p0 = 0; p0 < np; p0 += TW) {
            const int nv = static_cast<int>(lat_min(kLatNV, (npt - p0) / L));
            lat_tile_dispatch(mr, nv, [&](auto MRc, auto NVc) {
              constexpr int MR = decltype(MRc)::value, NV = decltype(NVc)::value;
              LatTile<MR, NV, acc_t> t;
              t.set_rows(bias + c0);
              t.gemm(Wt + c0 * Cin, Cin, 1, zp + p0 * Cin, TW, Cin);
              for (int r = 0; r < MR; ++r) {
                const V cb = lv_set1<acc_t>(CB[c0 + r]);
                for (int v = 0; v < NV; ++v)
                  t.acc[r][v] = lv_fma(cb, t.acc[r][v], lv_load(ub + r * pbl + p0 + v * L));
              }
              t.store(D + p0, ldd, np - p0);
            });
          }
        }
        if (!o_direct) {
          for (int64_t c = 0; c < C; ++c)
            store_row(odat + n * os[0] + c * os[1] + y * os[2] + x0 * os[3], ob + c * pbl, np,
                      os[3]);
        }
      }
    }
  }
}

// nhwc path (out has unit channel stride): per fine row y and panel: v = ca*vertical blend of the
// coarse pixels [wc][cpad]; z (the broadcast operand) read in place when it is acc_t with unit
// channel stride, else staged (lat_stage); tiles of MR pixels x TW channels start from the
// horizontal 2x of v and add cb*(W z + bias).
template <typename scalar_t>
static void lat_fwd_nhwc(const LatFwdArgs& a, int64_t begin, int64_t end, void* scratch) {
  using acc_t = typename Acc<scalar_t>::type;
  using V = typename LatVec<acc_t>::type;
  constexpr int L = LatVec<acc_t>::L;
  constexpr int TW = kLatNV * L;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  const int64_t C = a.C, Cin = a.Cin, H = a.H, W = a.W, W2 = 2 * W, PB = kLatPanel;
  const int64_t cpad = a.cpad, wc = PB / 2 + 2;
  LatScratch<acc_t> scr{static_cast<acc_t*>(scratch)};
  acc_t* const vb = scr.take(wc * cpad);
  acc_t* const px0 = scr.take(C);
  acc_t* const px1 = scr.take(C);
  acc_t* const zp = scr.take(lat_stage_elems(PB, Cin));  // staged z (lat_stage)
  acc_t* const ob = scr.take(PB * cpad);
  const scalar_t* const cdat = static_cast<const scalar_t*>(a.coarse.data);
  const scalar_t* const zdat = static_cast<const scalar_t*>(a.z.data);
  scalar_t* const odat = static_cast<scalar_t*>(a.out.data);
  const int64_t *cs = a.coarse.s, *zs = a.z.s, *os = a.out.s;
  const bool o_direct = kSame && os[1] == 1;
  const bool c_direct = kSame && cs[1] == 1;
  const acc_t* const WT = static_cast<const acc_t*>(a.weight);
  const acc_t* const bias = static_cast<const acc_t*>(a.bias);
  // taps along x: fine column x reads v rows k0 = j0 - (jb-1), k1 = j1 - (jb-1)

  for (int64_t u = begin; u < end; ++u) {
    const int64_t n = u / a.nchunks, chunk = u % a.nchunks;
    const int64_t ib = chunk * a.rows_per_chunk, ie = lat_min(ib + a.rows_per_chunk, H);
    const acc_t* const CA = static_cast<const acc_t*>(a.ca) + n * cpad;
    const acc_t* const CB = static_cast<const acc_t*>(a.cb) + n * cpad;
    for (int64_t y = 2 * ib; y < 2 * ie; ++y) {
      int64_t i0, i1;
      acc_t w0, w1;
      ::litefpn::up2_taps<acc_t>(y, H, i0, i1, w0, w1);
      for (int64_t x0 = 0; x0 < W2; x0 += PB) {
        const int64_t np = lat_min(PB, W2 - x0), jb = x0 / 2, nc = np / 2;
        for (int64_t k = 0; k < nc + 2; ++k) {
          const int64_t j = lat_ccol(jb, k, W);
          const scalar_t* p0 = cdat + n * cs[0] + i0 * cs[2] + j * cs[3];
          const scalar_t* p1 = cdat + n * cs[0] + i1 * cs[2] + j * cs[3];
          const acc_t* q0;
          const acc_t* q1;
          if (c_direct) {
            q0 = reinterpret_cast<const acc_t*>(p0);
            q1 = reinterpret_cast<const acc_t*>(p1);
          } else {
            load_row(px0, p0, C, cs[1]);
            load_row(px1, p1, C, cs[1]);
            q0 = px0, q1 = px1;
          }
          acc_t* v = vb + k * cpad;
          for (int64_t c = 0; c < C; ++c) v[c] = (CA[c] * w0) * q0[c] + (CA[c] * w1) * q1[c];
          for (int64_t c = C; c < cpad; ++c) v[c] = acc_t(0);
        }
        const acc_t* S;
        int64_t sr, sk;
        if (kSame && (zs[1] == 1 || Cin == 1)) {
          S = reinterpret_cast<const acc_t*>(zdat + n * zs[0] + y * zs[2] + x0 * zs[3]);
          sr = zs[3], sk = zs[1];
        } else {
          lat_stage(zp, zdat + n * zs[0] + y * zs[2] + x0 * zs[3], zs[3], zs[1], np, Cin,
                    static_cast<const acc_t*>(nullptr), sr, sk);
          S = zp;
        }
        acc_t* D;
        int64_t ldd;
        if (o_direct) {
          D = reinterpret_cast<acc_t*>(odat + n * os[0] + y * os[2] + x0 * os[3]);
          ldd = os[3];
        } else {
          D = ob;  // [pixel][C], as store_prow reads it
          ldd = C;
        }
        for (int64_t p0 = 0; p0 < np; p0 += kLatMR) {
          const int mr = static_cast<int>(lat_min(kLatMR, np - p0));
          const acc_t* Sp = S + p0 * sr;
          const acc_t* vr0[kLatMR];
          const acc_t* vr1[kLatMR];
          acc_t wx0[kLatMR], wx1[kLatMR];
          for (int r = 0; r < mr; ++r) {
            int64_t j0, j1;
            ::litefpn::up2_taps<acc_t>(x0 + p0 + r, W, j0, j1, wx0[r], wx1[r]);
            vr0[r] = vb + (j0 - (jb - 1)) * cpad;
            vr1[r] = vb + (j1 - (jb - 1)) * cpad;
          }
          for (int64_t c0 = 0; c0 < C; c0 += TW) {
            const int nv = static_cast<int>(lat_min(kLatNV, (cpad - c0) / L));
            lat_tile_dispatch(mr, nv, [&](auto MRc, auto NVc) {
              constexpr int MR = decltype(MRc)::value, NV = decltype(NVc)::value;
              LatTile<MR, NV, acc_t> t;
              t.set_cols(bias + c0);
              t.gemm(Sp, sr, sk, WT + c0, cpad, Cin);
              V cb[NV];
              for (int v = 0; v < NV; ++v) cb[v] = lv_load(CB + c0 + v * L);
              for (int r = 0; r < MR; ++r) {
                const V a0 = lv_set1<acc_t>(wx0[r]), a1 = lv_set1<acc_t>(wx1[r]);
                for (int v = 0; v < NV; ++v) {
                  const V up = lv_fma(a1, lv_load(vr1[r] + c0 + v * L),
                                      a0 * lv_load(vr0[r] + c0 + v * L));
                  t.acc[r][v] = lv_fma(cb[v], t.acc[r][v], up);
                }
              }
              t.store(D + p0 * ldd + c0, ldd, C - c0);
            });
          }
        }
        if (!o_direct)
          store_prow(odat + n * os[0] + y * os[2] + x0 * os[3], ob, np, C, os[3], os[1]);
      }
    }
  }
}

// ----------------------------------------------------------------------------- grad_z
// Plane path (grad_z has unit pixel stride): per unit the scaled weights Sg[k][c] =
// weight[c,k]*scale[n,c]; per fine row and panel, g and z packed as [pixel tile][K][TW]; tiles
// of MR input channels x TW pixels: shift + Sg g - quad z.
template <typename scalar_t>
static void lat_grad_z_plane(const LatGradZArgs& a, int64_t begin, int64_t end, void* scratch) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr int L = LatVec<acc_t>::L;
  constexpr int TW = kLatNV * L;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  const int64_t C = a.C, Cin = a.Cin, W = a.W, PB = kLatPanel, pbl = lat_round(PB, TW);
  LatScratch<acc_t> scr{static_cast<acc_t*>(scratch)};
  acc_t* const sg = scr.take(C * (a.kpad > Cin ? a.kpad : Cin));  // [Cin][C]
  acc_t* const gp = scr.take(C * pbl);
  acc_t* const zp = scr.take(Cin * pbl);
  acc_t* const ob = scr.take(pbl * a.kpad);  // [Cin][pbl]
  const scalar_t* const gdat = static_cast<const scalar_t*>(a.g.data);
  const scalar_t* const zdat = static_cast<const scalar_t*>(a.z.data);
  scalar_t* const odat = static_cast<scalar_t*>(a.out.data);
  const int64_t *gs = a.g.s, *zs = a.z.s, *os = a.out.s;
  const bool o_direct = kSame && os[3] == 1;
  const acc_t* const Wt = static_cast<const acc_t*>(a.weight);
  const acc_t* const scale = static_cast<const acc_t*>(a.scale);
  const acc_t* const qn = static_cast<const acc_t*>(a.quad_neg);
  const acc_t* const shift = static_cast<const acc_t*>(a.shift);
  acc_t shift_rows[kLatMR];
  int64_t packed_n = -1;

  for (int64_t u = begin; u < end; ++u) {
    const int64_t n = u / a.nchunks, chunk = u % a.nchunks;
    const int64_t yb = chunk * a.rows_per_chunk, ye = lat_min(yb + a.rows_per_chunk, a.H);
    if (packed_n != n) {
      for (int64_t k = 0; k < Cin; ++k)
        for (int64_t c = 0; c < C; ++c)
          sg[k * C + c] = scale ? Wt[c * Cin + k] * scale[n * C + c] : Wt[c * Cin + k];
      packed_n = n;
    }
    for (int64_t y = yb; y < ye; ++y) {
      for (int64_t x0 = 0; x0 < W; x0 += PB) {
        const int64_t np = lat_min(PB, W - x0), npt = lat_round(np, L);
        lat_pack<TW>(gp, TW, gdat + n * gs[0] + y * gs[2] + x0 * gs[3], gs[3], gs[1], np, C,
                     static_cast<const acc_t*>(nullptr));
        if (qn)
          lat_pack<TW>(zp, TW, zdat + n * zs[0] + y * zs[2] + x0 * zs[3], zs[3], zs[1], np, Cin,
                       static_cast<const acc_t*>(nullptr));
        acc_t* D;
        int64_t ldd;
        if (o_direct) {
          D = reinterpret_cast<acc_t*>(odat + n * os[0] + y * os[2] + x0);
          ldd = os[1];
        } else {
          D = ob;
          ldd = pbl;
        }
        for (int64_t k0 = 0; k0 < Cin; k0 += kLatMR) {
          const int mr = static_cast<int>(lat_min(kLatMR, Cin - k0));
          for (int r = 0; r < kLatMR; ++r)
            shift_rows[r] = (shift && r < mr) ? shift[k0 + r] : acc_t(0);
          for (int64_t p0 = 0; p0 < np; p0 += TW) {
            const int nv = static_cast<int>(lat_min(kLatNV, (npt - p0) / L));
            lat_tile_dispatch(mr, nv, [&](auto MRc, auto NVc) {
              constexpr int MR = decltype(MRc)::value, NV = decltype(NVc)::value;
              LatTile<MR, NV, acc_t> t;
              t.set_rows(shift_rows);
              t.gemm(sg + k0 * C, C, 1, gp + p0 * C, TW, C);
              if (qn) t.gemm(qn + k0 * Cin, Cin, 1, zp + p0 * Cin, TW, Cin);
              t.store(D + k0 * ldd + p0, ldd, np - p0);
            });
          }
        }
        if (!o_direct) {
          for (int64_t k = 0; k < Cin; ++k)
            store_row(odat + n * os[0] + k * os[1] + y * os[2] + x0 * os[3], ob + k * pbl, np,
                      os[3]);
        }
      }
    }
  }
}

// nhwc path (grad_z has unit channel stride): per unit Rg[c][kpad] = weight[c,k]*scale[n,c];
// g and z are the broadcast operands: g always staged per panel (lat_stage), z read in place
// when acc_t with unit channel stride; tiles of MR pixels x TW input channels:
// shift + g Rg + z (-quad^T).
template <typename scalar_t>
static void lat_grad_z_nhwc(const LatGradZArgs& a, int64_t begin, int64_t end, void* scratch) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr int L = LatVec<acc_t>::L;
  constexpr int TW = kLatNV * L;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  const int64_t C = a.C, Cin = a.Cin, W = a.W, PB = kLatPanel, kpad = a.kpad;
  const int64_t pbm = lat_round(PB, kLatMR);
  LatScratch<acc_t> scr{static_cast<acc_t*>(scratch)};
  acc_t* const rg = scr.take(C * (kpad > Cin ? kpad : Cin));  // [C][kpad]
  acc_t* const gp = scr.take(lat_stage_elems(PB, C));  // staged g (lat_stage)
  acc_t* const zp = scr.take(lat_stage_elems(PB, Cin));
  acc_t* const ob = scr.take(pbm * kpad);  // [pixel][Cin] staging of grad_z rows
  const scalar_t* const gdat = static_cast<const scalar_t*>(a.g.data);
  const scalar_t* const zdat = static_cast<const scalar_t*>(a.z.data);
  scalar_t* const odat = static_cast<scalar_t*>(a.out.data);
  const int64_t *gs = a.g.s, *zs = a.z.s, *os = a.out.s;
  const bool o_direct = kSame && os[1] == 1;
  const bool z_direct = kSame && (zs[1] == 1 || Cin == 1);
  const acc_t* const Wt = static_cast<const acc_t*>(a.weight);
  const acc_t* const scale = static_cast<const acc_t*>(a.scale);
  const acc_t* const qn = static_cast<const acc_t*>(a.quad_neg);
  const acc_t* const shift = static_cast<const acc_t*>(a.shift);
  int64_t packed_n = -1;
  alignas(64) acc_t zeros[kLatNV * LatVec<acc_t>::L * 8] = {};

  for (int64_t u = begin; u < end; ++u) {
    const int64_t n = u / a.nchunks, chunk = u % a.nchunks;
    const int64_t yb = chunk * a.rows_per_chunk, ye = lat_min(yb + a.rows_per_chunk, a.H);
    if (packed_n != n) {
      for (int64_t c = 0; c < C; ++c) {
        const acc_t s = scale ? scale[n * C + c] : acc_t(1);
        for (int64_t k = 0; k < Cin; ++k) rg[c * kpad + k] = Wt[c * Cin + k] * s;
        for (int64_t k = Cin; k < kpad; ++k) rg[c * kpad + k] = acc_t(0);
      }
      packed_n = n;
    }
    for (int64_t y = yb; y < ye; ++y) {
      for (int64_t x0 = 0; x0 < W; x0 += PB) {
        const int64_t np = lat_min(PB, W - x0);
        const scalar_t* gsrc = gdat + n * gs[0] + y * gs[2] + x0 * gs[3];
        const scalar_t* zsrc = zdat + n * zs[0] + y * zs[2] + x0 * zs[3];
        const acc_t *Sg, *Sz = nullptr;
        int64_t sgr, sgk, szr = 0, szk = 0;
        // g is always staged: even an fp32 NHWC g is faster from the padded copy (its pixel rows
        // 512 B apart alias in the L1 sets), and an NCHW one needs the copy anyway.
        lat_stage(gp, gsrc, gs[3], gs[1], np, C, static_cast<const acc_t*>(nullptr), sgr, sgk);
        Sg = gp;
        if (qn) {
          if (z_direct) {
            Sz = reinterpret_cast<const acc_t*>(zsrc), szr = zs[3], szk = zs[1];
          } else {
            lat_stage(zp, zsrc, zs[3], zs[1], np, Cin, static_cast<const acc_t*>(nullptr), szr,
                      szk);
            Sz = zp;
          }
        }
        acc_t* D;
        int64_t ldd;
        if (o_direct) {
          D = reinterpret_cast<acc_t*>(odat + n * os[0] + y * os[2] + x0 * os[3]);
          ldd = os[3];
        } else {
          D = ob;  // [pixel][Cin], as store_prow reads it
          ldd = Cin;
        }
        for (int64_t p0 = 0; p0 < np; p0 += kLatMR) {
          const int mr = static_cast<int>(lat_min(kLatMR, np - p0));
          const acc_t* Sgp = Sg + p0 * sgr;
          const acc_t* Szp = Sz == nullptr ? nullptr : Sz + p0 * szr;
          for (int64_t k0 = 0; k0 < Cin; k0 += TW) {
            const int nv = static_cast<int>(lat_min(kLatNV, (kpad - k0) / L));
            lat_tile_dispatch(mr, nv, [&](auto MRc, auto NVc) {
              constexpr int MR = decltype(MRc)::value, NV = decltype(NVc)::value;
              LatTile<MR, NV, acc_t> t;
              t.set_cols(shift ? shift + k0 : zeros);
              t.gemm(Sgp, sgr, sgk, rg + k0, kpad, C);
              if (qn) t.gemm(Szp, szr, szk, qn + k0, kpad, Cin);
              t.store(D + p0 * ldd + k0, ldd, Cin - k0);
            });
          }
        }
        if (!o_direct)
          store_prow(odat + n * os[0] + y * os[2] + x0 * os[3], ob, np, Cin, os[3], os[1]);
      }
    }
  }
}

// ----------------------------------------------------------------------------- table
static const LatKernelTable kLatTable = {
    LITEFPN_ISA_NAME,
    kLatVecBytes,
    {lat_gram<float>, lat_gram<double>, lat_gram<c10::Half>, lat_gram<c10::BFloat16>},
    {lat_fwd_plane<float>, lat_fwd_plane<double>, lat_fwd_plane<c10::Half>,
     lat_fwd_plane<c10::BFloat16>},
    {lat_fwd_nhwc<float>, lat_fwd_nhwc<double>, lat_fwd_nhwc<c10::Half>,
     lat_fwd_nhwc<c10::BFloat16>},
    {lat_grad_z_plane<float>, lat_grad_z_plane<double>, lat_grad_z_plane<c10::Half>,
     lat_grad_z_plane<c10::BFloat16>},
    {lat_grad_z_nhwc<float>, lat_grad_z_nhwc<double>, lat_grad_z_nhwc<c10::Half>,
     lat_grad_z_nhwc<c10::BFloat16>},
};
