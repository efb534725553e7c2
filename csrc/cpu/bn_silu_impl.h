// The CPU compute kernels of bn_silu (training-mode BatchNorm2d + SiLU), written once and
// compiled once per instruction set: csrc/cpu/isa/<isa>.cpp includes this file INSIDE its own
// namespace (litefpn::cpu::isa_<isa>), after its target pragma and after the helpers of
// common/row_io.h (to_acc / put conversions, row and pixel-row loads and stores, Acc, Lanes,
// reduce_lanes). Hence no #include and no #pragma once here, and everything is `static` or in
// that per-ISA namespace.
//
// Math (all in acc_t: float, or double for double storage), per element of channel c:
//   a  = x*scale[c] + shift[c]
//   fwd:       y  = a / (1 + exp(-a))                               (eager's silu formula)
//   bwd:       sg = 1 / (1 + exp(-a)),  dz = g * sg * (1 + a*(1 - sg))  (eager's silu_backward)
//              grad_x = dz*k_dz[c] + x*k_x[c] + k_0[c]
//   stats:     s1[c] += x - center[c],  s2[c] += (x - center[c])^2
//   bwd_sums:  s1[c] += dz,             s2[c] += dz*(x - center[c])
// exp: float uses bn_exp8 below in the AVX2 build and bn_exp16 (the same steps on 16 lanes) in
// the AVX-512 one (vectorised; std::exp in a loop is scalar without -ffast-math), std::exp
// otherwise; double always std::exp.
//
// Each block of at most kBnBlock elements is staged in acc_t buffers (or read / written in place
// when the storage is acc_t with unit stride): first the affine a = x*scale + shift per layout,
// then one flat elementwise pass (silu or dz) over the block, then the per-layout sums / output
// epilogue. Every stride (0 included, for an expanded grad_out) goes through load_row /
// load_prow; nothing bigger than a block is ever copied.
//
// Two paths, same math:
//  * plane path: unit = a run of positions of one (n, c) plane; the per-channel constants are
//    scalars; a block's sums in Lanes<acc_t>::L lane-wise partials, combined by reduce_lanes.
//  * nhwc path: unit = a run of pixels of image n, all channels; inner loops over the contiguous
//    channels; a block's per-channel sums accumulated pixel by pixel.
// Block sums are added into the unit's double sums, block by block (all in a fixed order).
// Units never share a reduction: the caller combines the per-unit partials in a fixed order.

// ----------------------------------------------------------------------------- exp (AVX2)
#if LITEFPN_ISA_AVX2
// exp(x) for 8 floats: Cody-Waite reduction x = n*ln2 + r, |r| <= ln2/2 (ln2 split in a 9-bit
// high part, so n*ln2_hi is exact for |n| <= 150), Cephes' degree-7 expf polynomial in r (about
// 1 ulp), scaling by 2^n as 2^(n/2) * 2^(n - n/2) so that both factors are normal floats and the
// product rounds once: overflow gives +inf (x > ln(FLT_MAX) = 88.7228), gradual underflow to
// denormals and 0 (x < -103.97 -> 0), NaN -> NaN.
static inline __m256 bn_exp8(__m256 x) {
  // max / min return their second operand when either is NaN: a NaN x stays NaN through the
  // clamp, hence through r, p and y (NaN * 2^n1 * 2^n2).
  const __m256 xc = _mm256_min_ps(_mm256_set1_ps(88.8f),
                                  _mm256_max_ps(_mm256_set1_ps(-104.0f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
  const __m256i ni = _mm256_cvtps_epi32(n);  // n in [-150, 128]
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, f1), f2);
}

static inline __m256 bn_neg8(__m256 v) { return _mm256_xor_ps(v, _mm256_set1_ps(-0.0f)); }

// a / (1 + exp(-a))
static inline __m256 bn_silu8(__m256 a) {
  return _mm256_div_ps(a, _mm256_add_ps(_mm256_set1_ps(1.0f), bn_exp8(bn_neg8(a))));
}

// sg = 1 / (1 + exp(-a)); g * sg * (1 + a * (1 - sg))
static inline __m256 bn_dz8(__m256 a, __m256 g) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sg = _mm256_div_ps(one, _mm256_add_ps(one, bn_exp8(bn_neg8(a))));
  const __m256 t = _mm256_add_ps(one, _mm256_mul_ps(a, _mm256_sub_ps(one, sg)));
  return _mm256_mul_ps(_mm256_mul_ps(g, sg), t);
}

// Lanes [0, r) of a vector, r in [1, 7].
static inline __m256i bn_tail_mask(int64_t r) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(r)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

#if LITEFPN_ISA_AVX512
// bn_exp8, bn_silu8 and bn_dz8 on 16 floats: the same operations in the same order, so the
// AVX-512 build gives the AVX2 build's bits.
static inline __m512 bn_exp16(__m512 x) {
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(88.8f),
                                  _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
  const __m512i ni = _mm512_cvtps_epi32(n);
  const __m512i n1 = _mm512_srai_epi32(ni, 1);
  const __m512i n2 = _mm512_sub_epi32(ni, n1);
  const __m512i bias = _mm512_set1_epi32(127);
  const __m512 f1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n1, bias), 23));
  const __m512 f2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n2, bias), 23));
  return _mm512_mul_ps(_mm512_mul_ps(p, f1), f2);
}

static inline __m512 bn_neg16(__m512 v) {
  return _mm512_castsi512_ps(
      _mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32(static_cast<int>(0x80000000u))));
}

static inline __m512 bn_silu16(__m512 a) {
  return _mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(1.0f), bn_exp16(bn_neg16(a))));
}

static inline __m512 bn_dz16(__m512 a, __m512 g) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 sg = _mm512_div_ps(one, _mm512_add_ps(one, bn_exp16(bn_neg16(a))));
  const __m512 t = _mm512_add_ps(one, _mm512_mul_ps(a, _mm512_sub_ps(one, sg)));
  return _mm512_mul_ps(_mm512_mul_ps(g, sg), t);
}

// Lanes [0, r) of a vector, r in [1, 15].
static inline __mmask16 bn_tail_mask16(int64_t r) {
  return static_cast<__mmask16>((1u << r) - 1u);
}
#endif

// ----------------------------------------------------------------------------- flat passes
// a[i] = a[i] / (1 + exp(-a[i]))
template <typename T>
static inline void silu_flat(T* __restrict a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = a[i] / (T(1) + std::exp(-a[i]));
}

// a[i] <- dz of (a[i], g[i])
template <typename T>
static inline void dz_flat(T* __restrict a, const T* __restrict g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T v = a[i];
    const T sg = T(1) / (T(1) + std::exp(-v));
    a[i] = g[i] * sg * (T(1) + v * (T(1) - sg));
  }
}

#if LITEFPN_ISA_AVX512
// The float overloads (preferred to the templates): 16 at a time, the tail masked (so every
// element goes through the same vector code, wherever it lies in a block).
static inline void silu_flat(float* __restrict a, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(a + i, bn_silu16(_mm512_loadu_ps(a + i)));
  if (i < n) {
    const __mmask16 m = bn_tail_mask16(n - i);
    _mm512_mask_storeu_ps(a + i, m, bn_silu16(_mm512_maskz_loadu_ps(m, a + i)));
  }
}

static inline void dz_flat(float* __restrict a, const float* __restrict g, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(a + i, bn_dz16(_mm512_loadu_ps(a + i), _mm512_loadu_ps(g + i)));
  if (i < n) {
    const __mmask16 m = bn_tail_mask16(n - i);
    const __m512 v = bn_dz16(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, g + i));
    _mm512_mask_storeu_ps(a + i, m, v);
  }
}
#elif LITEFPN_ISA_AVX2
// The float overloads (preferred to the templates): 8 at a time, the tail masked (so every
// element goes through the same vector code, wherever it lies in a block).
static inline void silu_flat(float* __restrict a, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(a + i, bn_silu8(_mm256_loadu_ps(a + i)));
  if (i < n) {
    const __m256i m = bn_tail_mask(n - i);
    _mm256_maskstore_ps(a + i, m, bn_silu8(_mm256_maskload_ps(a + i, m)));
  }
}

static inline void dz_flat(float* __restrict a, const float* __restrict g, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(a + i, bn_dz8(_mm256_loadu_ps(a + i), _mm256_loadu_ps(g + i)));
  if (i < n) {
    const __m256i m = bn_tail_mask(n - i);
    _mm256_maskstore_ps(a + i, m, bn_dz8(_mm256_maskload_ps(a + i, m), _mm256_maskload_ps(g + i, m)));
  }
}
#endif

// ----------------------------------------------------------------------------- plane-path rows
// o[i] = x[i]*s + b
template <typename T>
static inline void row_affine(T* __restrict o, const T* __restrict x, T s, T b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = x[i] * s + b;
}

// o[i] = dz[i]*kdz + x[i]*kx + k0
template <typename T>
static inline void row_grad_x(T* __restrict o, const T* __restrict dz, const T* __restrict x,
                              T kdz, T kx, T k0, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = dz[i] * kdz + x[i] * kx + k0;
}

// Lane-wise sums: lane k takes the elements i with i % L == k (L = Lanes<T>::L), in order.
// l1 += x - ce, l2 += (x - ce)^2
template <typename T>
static inline void stats_lanes(T* __restrict l1, T* __restrict l2, const T* __restrict x, T ce,
                               int64_t n) {
  constexpr int L = Lanes<T>::L;
  T s1[L], s2[L];
  for (int k = 0; k < L; ++k) {
    s1[k] = l1[k];
    s2[k] = l2[k];
  }
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int k = 0; k < L; ++k) {
      const T d = x[i + k] - ce;
      s1[k] += d;
      s2[k] += d * d;
    }
  }
  for (int k = 0; i + k < n; ++k) {
    const T d = x[i + k] - ce;
    s1[k] += d;
    s2[k] += d * d;
  }
  for (int k = 0; k < L; ++k) {
    l1[k] = s1[k];
    l2[k] = s2[k];
  }
}

// l1 += dz, l2 += dz*(x - ce)
template <typename T>
static inline void dz_sums_lanes(T* __restrict l1, T* __restrict l2, const T* __restrict dz,
                                 const T* __restrict x, T ce, int64_t n) {
  constexpr int L = Lanes<T>::L;
  T s1[L], s2[L];
  for (int k = 0; k < L; ++k) {
    s1[k] = l1[k];
    s2[k] = l2[k];
  }
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int k = 0; k < L; ++k) {
      s1[k] += dz[i + k];
      s2[k] += dz[i + k] * (x[i + k] - ce);
    }
  }
  for (int k = 0; i + k < n; ++k) {
    s1[k] += dz[i + k];
    s2[k] += dz[i + k] * (x[i + k] - ce);
  }
  for (int k = 0; k < L; ++k) {
    l1[k] = s1[k];
    l2[k] = s2[k];
  }
}

#if LITEFPN_ISA_AVX512
// The float overloads of the two lane-wise sums: the same 16 lanes in one vector, so the same
// additions in the same order as the templates and the AVX2 overloads below.
static inline void stats_lanes(float* __restrict l1, float* __restrict l2,
                               const float* __restrict x, float ce, int64_t n) {
  __m512 a = _mm512_loadu_ps(l1), b = _mm512_loadu_ps(l2);
  const __m512 cv = _mm512_set1_ps(ce);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + i), cv);
    a = _mm512_add_ps(a, d);
    b = _mm512_fmadd_ps(d, d, b);
  }
  _mm512_storeu_ps(l1, a);
  _mm512_storeu_ps(l2, b);
  for (int k = 0; i + k < n; ++k) {
    const float d = x[i + k] - ce;
    l1[k] += d;
    l2[k] = std::fma(d, d, l2[k]);
  }
}

static inline void dz_sums_lanes(float* __restrict l1, float* __restrict l2,
                                 const float* __restrict dz, const float* __restrict x, float ce,
                                 int64_t n) {
  __m512 a = _mm512_loadu_ps(l1), b = _mm512_loadu_ps(l2);
  const __m512 cv = _mm512_set1_ps(ce);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 g = _mm512_loadu_ps(dz + i);
    a = _mm512_add_ps(a, g);
    b = _mm512_fmadd_ps(g, _mm512_sub_ps(_mm512_loadu_ps(x + i), cv), b);
  }
  _mm512_storeu_ps(l1, a);
  _mm512_storeu_ps(l2, b);
  for (int k = 0; i + k < n; ++k) {
    l1[k] += dz[i + k];
    l2[k] = std::fma(dz[i + k], x[i + k] - ce, l2[k]);
  }
}
#elif LITEFPN_ISA_AVX2
// The float overloads of the two lane-wise sums: the same 16 lanes (lanes 0-7 and 8-15 in two
// vectors), written out because GCC vectorises the templates' outer loop with permutes instead
// (several times slower; the baseline build keeps the templates).
static inline void stats_lanes(float* __restrict l1, float* __restrict l2,
                               const float* __restrict x, float ce, int64_t n) {
  __m256 a0 = _mm256_loadu_ps(l1), a1 = _mm256_loadu_ps(l1 + 8);
  __m256 b0 = _mm256_loadu_ps(l2), b1 = _mm256_loadu_ps(l2 + 8);
  const __m256 cv = _mm256_set1_ps(ce);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(x + i), cv);
    const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(x + i + 8), cv);
    a0 = _mm256_add_ps(a0, d0);
    a1 = _mm256_add_ps(a1, d1);
    b0 = _mm256_fmadd_ps(d0, d0, b0);
    b1 = _mm256_fmadd_ps(d1, d1, b1);
  }
  _mm256_storeu_ps(l1, a0);
  _mm256_storeu_ps(l1 + 8, a1);
  _mm256_storeu_ps(l2, b0);
  _mm256_storeu_ps(l2 + 8, b1);
  for (int k = 0; i + k < n; ++k) {
    const float d = x[i + k] - ce;
    l1[k] += d;
    l2[k] = std::fma(d, d, l2[k]);
  }
}

static inline void dz_sums_lanes(float* __restrict l1, float* __restrict l2,
                                 const float* __restrict dz, const float* __restrict x, float ce,
                                 int64_t n) {
  __m256 a0 = _mm256_loadu_ps(l1), a1 = _mm256_loadu_ps(l1 + 8);
  __m256 b0 = _mm256_loadu_ps(l2), b1 = _mm256_loadu_ps(l2 + 8);
  const __m256 cv = _mm256_set1_ps(ce);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 g0 = _mm256_loadu_ps(dz + i), g1 = _mm256_loadu_ps(dz + i + 8);
    a0 = _mm256_add_ps(a0, g0);
    a1 = _mm256_add_ps(a1, g1);
    b0 = _mm256_fmadd_ps(g0, _mm256_sub_ps(_mm256_loadu_ps(x + i), cv), b0);
    b1 = _mm256_fmadd_ps(g1, _mm256_sub_ps(_mm256_loadu_ps(x + i + 8), cv), b1);
  }
  _mm256_storeu_ps(l1, a0);
  _mm256_storeu_ps(l1 + 8, a1);
  _mm256_storeu_ps(l2, b0);
  _mm256_storeu_ps(l2 + 8, b1);
  for (int k = 0; i + k < n; ++k) {
    l1[k] += dz[i + k];
    l2[k] = std::fma(dz[i + k], x[i + k] - ce, l2[k]);
  }
}
#endif

// ----------------------------------------------------------------------------- nhwc-path pixels
// o[p*C + c] = x[p*C + c]*s[c] + b[c]
template <typename T>
static inline void px_affine(T* __restrict o, const T* __restrict x, const T* __restrict s,
                             const T* __restrict b, int64_t P, int64_t C) {
  for (int64_t p = 0; p < P; ++p) {
    T* op = o + p * C;
    const T* xp = x + p * C;
    for (int64_t c = 0; c < C; ++c) op[c] = xp[c] * s[c] + b[c];
  }
}

template <typename T>
static inline void px_grad_x(T* __restrict o, const T* __restrict dz, const T* __restrict x,
                             const T* __restrict kdz, const T* __restrict kx,
                             const T* __restrict k0, int64_t P, int64_t C) {
  for (int64_t p = 0; p < P; ++p) {
    T* op = o + p * C;
    const T* dp = dz + p * C;
    const T* xp = x + p * C;
    for (int64_t c = 0; c < C; ++c) op[c] = dp[c] * kdz[c] + xp[c] * kx[c] + k0[c];
  }
}

template <typename T>
static inline void px_stats(T* __restrict s1, T* __restrict s2, const T* __restrict x,
                            const T* __restrict ce, int64_t P, int64_t C) {
  for (int64_t p = 0; p < P; ++p) {
    const T* xp = x + p * C;
    for (int64_t c = 0; c < C; ++c) {
      const T d = xp[c] - ce[c];
      s1[c] += d;
      s2[c] += d * d;
    }
  }
}

template <typename T>
static inline void px_dz_sums(T* __restrict s1, T* __restrict s2, const T* __restrict dz,
                              const T* __restrict x, const T* __restrict ce, int64_t P,
                              int64_t C) {
  for (int64_t p = 0; p < P; ++p) {
    const T* dp = dz + p * C;
    const T* xp = x + p * C;
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += dp[c];
      s2[c] += dp[c] * (xp[c] - ce[c]);
    }
  }
}

// t1 += b1, t2 += b2 (a block's per-channel sums into the unit's, in double)
template <typename T>
static inline void add_sums(double* __restrict t1, double* __restrict t2, const T* __restrict b1,
                            const T* __restrict b2, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    t1[c] += static_cast<double>(b1[c]);
    t2[c] += static_cast<double>(b2[c]);
  }
}

// P pixels x C channels (pixel stride ld, channel stride cs) <-> contiguous [P][C]; dense pixels
// (ld == C, cs == 1) as one row.
template <typename acc_t, typename scalar_t>
static inline void load_px(acc_t* d, const scalar_t* s, int64_t P, int64_t C, int64_t ld,
                           int64_t cs) {
  if (cs == 1 && ld == C) {
    load_row(d, s, P * C, int64_t(1));
  } else {
    load_prow(d, s, P, C, ld, cs);
  }
}
template <typename scalar_t, typename acc_t>
static inline void store_px(scalar_t* d, const acc_t* s, int64_t P, int64_t C, int64_t ld,
                            int64_t cs) {
  if (cs == 1 && ld == C) {
    store_row(d, s, P * C, int64_t(1));
  } else {
    store_prow(d, s, P, C, ld, cs);
  }
}

// ----------------------------------------------------------------------------- segments
// The positions [p0, pe) of a chunk, as runs that each lie in one row of the (merged) map:
// fn(h, w, len) for each.
template <typename F>
static inline void for_each_segment(const BnSiluArgs& a, int64_t p0, int64_t pe, F&& fn) {
  if (a.merged) {
    // stride(2) == W*stride(3) for every tensor: offset h*s2 + w*s3 == p*s3.
    fn(p0 / a.W, p0 % a.W, pe - p0);
    return;
  }
  for (int64_t p = p0; p < pe;) {
    const int64_t h = p / a.W, w = p % a.W;
    const int64_t row_end = (h + 1) * a.W;
    const int64_t len = (row_end < pe ? row_end : pe) - p;
    fn(h, w, len);
    p += len;
  }
}

// ----------------------------------------------------------------------------- kernels
template <int kOp, typename scalar_t>
static void plane_kernel(const BnSiluArgs& a, int64_t begin, int64_t end, void* scratch) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  constexpr bool kGrad = kOp == kBnBwdSums || kOp == kBnBwd;  // reads grad_out
  constexpr bool kOut = kOp == kBnFwd || kOp == kBnBwd;       // writes an output
  constexpr bool kSums = kOp == kBnStats || kOp == kBnBwdSums;
  constexpr int L = Lanes<acc_t>::L;
  const int64_t C = a.C, HW = a.H * a.W;
  const int64_t be = bn_silu_buf_elems(false, C);
  acc_t* const xb = static_cast<acc_t*>(scratch);
  acc_t* const gb = xb + be;
  acc_t* const ab = gb + be;
  acc_t* const ob = ab + be;
  const scalar_t* const xd = static_cast<const scalar_t*>(a.x.data);
  const scalar_t* const gd = static_cast<const scalar_t*>(a.g.data);
  scalar_t* const od = static_cast<scalar_t*>(a.out.data);
  const int64_t *xs = a.x.s, *gs = a.g.s, *os = a.out.s;
  const bool x_direct = kSame && xs[3] == 1;
  const bool g_direct = kSame && kGrad && gs[3] == 1;
  const bool o_direct = kSame && kOut && os[3] == 1;
  const acc_t* const SC = static_cast<const acc_t*>(a.scale);
  const acc_t* const SH = static_cast<const acc_t*>(a.shift);
  const acc_t* const CE = static_cast<const acc_t*>(a.center);
  const acc_t* const KDZ = static_cast<const acc_t*>(a.k_dz);
  const acc_t* const KX = static_cast<const acc_t*>(a.k_x);
  const acc_t* const K0 = static_cast<const acc_t*>(a.k_0);

  for (int64_t u = begin; u < end; ++u) {
    const int64_t nc = u / a.nchunks, chunk = u % a.nchunks;
    const int64_t n = nc / C, c = nc % C;
    const int64_t p0 = chunk * a.unit_len;
    const int64_t pe = p0 + a.unit_len < HW ? p0 + a.unit_len : HW;
    const acc_t sc = kOp != kBnStats ? SC[c] : acc_t(0);
    const acc_t sh = kOp != kBnStats ? SH[c] : acc_t(0);
    const acc_t ce = kSums ? CE[c] : acc_t(0);
    const acc_t kdz = kOp == kBnBwd ? KDZ[c] : acc_t(0);
    const acc_t kx = kOp == kBnBwd ? KX[c] : acc_t(0);
    const acc_t k0 = kOp == kBnBwd ? K0[c] : acc_t(0);
    const scalar_t* const xpl = xd + n * xs[0] + c * xs[1];
    const scalar_t* const gpl = kGrad ? gd + n * gs[0] + c * gs[1] : nullptr;
    scalar_t* const opl = kOut ? od + n * os[0] + c * os[1] : nullptr;
    double t1 = 0.0, t2 = 0.0;  // the unit's sums, block by block
    for_each_segment(a, p0, pe, [&](int64_t h, int64_t w, int64_t len) {
      const scalar_t* const xr = xpl + h * xs[2] + w * xs[3];
      const scalar_t* const gr = kGrad ? gpl + h * gs[2] + w * gs[3] : nullptr;
      scalar_t* const orow = kOut ? opl + h * os[2] + w * os[3] : nullptr;
      for (int64_t q = 0; q < len; q += kBnBlock) {
        const int64_t nb = len - q < kBnBlock ? len - q : kBnBlock;
        const acc_t* xv;
        if (x_direct) {
          xv = reinterpret_cast<const acc_t*>(xr + q);
        } else {
          load_row(xb, xr + q * xs[3], nb, xs[3]);
          xv = xb;
        }
        acc_t l1[L], l2[L];  // the block's lane-wise sums
        if (kSums) {
          for (int k = 0; k < L; ++k) l1[k] = l2[k] = acc_t(0);
        }
        if (kOp == kBnStats) {
          stats_lanes(l1, l2, xv, ce, nb);
          t1 += static_cast<double>(reduce_lanes(l1));
          t2 += static_cast<double>(reduce_lanes(l2));
          continue;
        }
        acc_t* const ov = o_direct ? reinterpret_cast<acc_t*>(orow + q) : ob;
        if (kOp == kBnFwd) {
          row_affine(ov, xv, sc, sh, nb);
          silu_flat(ov, nb);
        } else {
          const acc_t* gv;
          if (g_direct) {
            gv = reinterpret_cast<const acc_t*>(gr + q);
          } else {
            load_row(gb, gr + q * gs[3], nb, gs[3]);
            gv = gb;
          }
          row_affine(ab, xv, sc, sh, nb);
          dz_flat(ab, gv, nb);
          if (kOp == kBnBwdSums) {
            dz_sums_lanes(l1, l2, ab, xv, ce, nb);
            t1 += static_cast<double>(reduce_lanes(l1));
            t2 += static_cast<double>(reduce_lanes(l2));
          } else {
            row_grad_x(ov, ab, xv, kdz, kx, k0, nb);
          }
        }
        if (kOut && !o_direct) store_row(orow + q * os[3], ob, nb, os[3]);
      }
    });
    if (kSums) {
      a.part[u * 2] = t1;
      a.part[u * 2 + 1] = t2;
    }
  }
}

template <int kOp, typename scalar_t>
static void nhwc_kernel(const BnSiluArgs& a, int64_t begin, int64_t end, void* scratch) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  constexpr bool kGrad = kOp == kBnBwdSums || kOp == kBnBwd;
  constexpr bool kOut = kOp == kBnFwd || kOp == kBnBwd;
  constexpr bool kSums = kOp == kBnStats || kOp == kBnBwdSums;
  const int64_t C = a.C, HW = a.H * a.W;
  const int64_t PB = bn_block_pixels(C);
  const int64_t be = bn_silu_buf_elems(true, C);
  acc_t* const xb = static_cast<acc_t*>(scratch);
  acc_t* const gb = xb + be;
  acc_t* const ab = gb + be;
  acc_t* const ob = ab + be;
  acc_t* const b1 = ob + be;  // the current block's per-channel sums
  acc_t* const b2 = b1 + bn_round16(C);
  double* const t1 = reinterpret_cast<double*>(b2 + bn_round16(C));  // the current unit's
  double* const t2 = t1 + bn_round16(C);
  const scalar_t* const xd = static_cast<const scalar_t*>(a.x.data);
  const scalar_t* const gd = static_cast<const scalar_t*>(a.g.data);
  scalar_t* const od = static_cast<scalar_t*>(a.out.data);
  const int64_t *xs = a.x.s, *gs = a.g.s, *os = a.out.s;
  // In place only for dense pixels (a block of pixels is then one contiguous [P][C] run).
  const bool x_direct = kSame && xs[1] == 1 && xs[3] == C;
  const bool g_direct = kSame && kGrad && gs[1] == 1 && gs[3] == C;
  const bool o_direct = kSame && kOut && os[1] == 1 && os[3] == C;
  const acc_t* const SC = static_cast<const acc_t*>(a.scale);
  const acc_t* const SH = static_cast<const acc_t*>(a.shift);
  const acc_t* const CE = static_cast<const acc_t*>(a.center);
  const acc_t* const KDZ = static_cast<const acc_t*>(a.k_dz);
  const acc_t* const KX = static_cast<const acc_t*>(a.k_x);
  const acc_t* const K0 = static_cast<const acc_t*>(a.k_0);

  for (int64_t u = begin; u < end; ++u) {
    const int64_t n = u / a.nchunks, chunk = u % a.nchunks;
    const int64_t p0 = chunk * a.unit_len;
    const int64_t pe = p0 + a.unit_len < HW ? p0 + a.unit_len : HW;
    const scalar_t* const ximg = xd + n * xs[0];
    const scalar_t* const gimg = kGrad ? gd + n * gs[0] : nullptr;
    scalar_t* const oimg = kOut ? od + n * os[0] : nullptr;
    if (kSums) {
      for (int64_t c = 0; c < C; ++c) t1[c] = t2[c] = 0.0;
    }
    for_each_segment(a, p0, pe, [&](int64_t h, int64_t w, int64_t len) {
      const scalar_t* const xr = ximg + h * xs[2] + w * xs[3];
      const scalar_t* const gr = kGrad ? gimg + h * gs[2] + w * gs[3] : nullptr;
      scalar_t* const orow = kOut ? oimg + h * os[2] + w * os[3] : nullptr;
      for (int64_t q = 0; q < len; q += PB) {
        const int64_t np = len - q < PB ? len - q : PB;
        const int64_t ne = np * C;
        const acc_t* xv;
        if (x_direct) {
          xv = reinterpret_cast<const acc_t*>(xr + q * C);
        } else {
          load_px(xb, xr + q * xs[3], np, C, xs[3], xs[1]);
          xv = xb;
        }
        if (kSums) {
          for (int64_t c = 0; c < C; ++c) b1[c] = b2[c] = acc_t(0);
        }
        if (kOp == kBnStats) {
          px_stats(b1, b2, xv, CE, np, C);
          add_sums(t1, t2, b1, b2, C);
          continue;
        }
        acc_t* const ov = o_direct ? reinterpret_cast<acc_t*>(orow + q * C) : ob;
        if (kOp == kBnFwd) {
          px_affine(ov, xv, SC, SH, np, C);
          silu_flat(ov, ne);
        } else {
          const acc_t* gv;
          if (g_direct) {
            gv = reinterpret_cast<const acc_t*>(gr + q * C);
          } else {
            load_px(gb, gr + q * gs[3], np, C, gs[3], gs[1]);
            gv = gb;
          }
          px_affine(ab, xv, SC, SH, np, C);
          dz_flat(ab, gv, ne);
          if (kOp == kBnBwdSums) {
            px_dz_sums(b1, b2, ab, xv, CE, np, C);
            add_sums(t1, t2, b1, b2, C);
          } else {
            px_grad_x(ov, ab, xv, KDZ, KX, K0, np, C);
          }
        }
        if (kOut && !o_direct) store_px(orow + q * os[3], ob, np, C, os[3], os[1]);
      }
    });
    if (kSums) {
      double* const pu = a.part + u * 2 * C;
      for (int64_t c = 0; c < C; ++c) {
        pu[c] = t1[c];
        pu[C + c] = t2[c];
      }
    }
  }
}

// ----------------------------------------------------------------------------- table
#define LITEFPN_BN_ROW(kernel, op)                                                    \
  {kernel<op, float>, kernel<op, double>, kernel<op, c10::Half>, kernel<op, c10::BFloat16>}

static const BnSiluKernelTable kBnTable = {
    LITEFPN_ISA_NAME,
    {LITEFPN_BN_ROW(plane_kernel, kBnStats), LITEFPN_BN_ROW(plane_kernel, kBnFwd),
     LITEFPN_BN_ROW(plane_kernel, kBnBwdSums), LITEFPN_BN_ROW(plane_kernel, kBnBwd)},
    {LITEFPN_BN_ROW(nhwc_kernel, kBnStats), LITEFPN_BN_ROW(nhwc_kernel, kBnFwd),
     LITEFPN_BN_ROW(nhwc_kernel, kBnBwdSums), LITEFPN_BN_ROW(nhwc_kernel, kBnBwd)},
};

#undef LITEFPN_BN_ROW
