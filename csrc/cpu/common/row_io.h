// The per-ISA helpers every CPU kernel family builds on: the accumulation type (Acc), scalar
// conversions (to_acc, put), row and pixel-row loads and stores of any stride (load_row,
// store_row, transpose_load, load_prow, store_prow), the fixed-order lane-wise sums (Lanes,
// dot_lanes, scale_dot_lanes, reduce_lanes) and the two-row blend shared by up2_fuse and
// lateral_up2_fuse (row_blend2).
//
// Like the kernels (<op>_impl.h), this file is compiled once per instruction set: each
// csrc/cpu/isa/<isa>.cpp includes it INSIDE its own namespace (litefpn::cpu::isa_<isa>), after
// all #includes (cpu/isa/kernel_headers.h) and after its target pragma, and before the
// <op>_impl.h that use it. Hence no #include and no #pragma once here, and everything defined
// here is `static` or lives in that per-ISA namespace. The including file sets
// LITEFPN_ISA_AVX2 (AVX2 + FMA + F16C intrinsics available: 1 in the avx2 and avx512 builds),
// LITEFPN_ISA_AVX512 and LITEFPN_ISA_NAME.
#if !defined(LITEFPN_ISA_AVX2) || !defined(LITEFPN_ISA_AVX512) || !defined(LITEFPN_ISA_NAME)
#error "row_io.h is included by csrc/cpu/isa/<isa>.cpp, which defines the LITEFPN_ISA_* macros"
#endif

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// ----------------------------------------------------------------------------- conversions
static inline float to_acc(float v) { return v; }
static inline double to_acc(double v) { return v; }
static inline float to_acc(c10::BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
static inline float to_acc(c10::Half v) {
#if LITEFPN_ISA_AVX2
  return _cvtsh_ss(v.x);
#else
  return static_cast<float>(v);
#endif
}

static inline void put(float* p, float v) { *p = v; }
static inline void put(double* p, double v) { *p = v; }
// Round to nearest even, NaN -> canonical quiet NaN: bit-identical to c10::BFloat16(float),
// written branch-free so that it vectorises.
static inline void put(c10::BFloat16* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t r = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1u)) >> 16;
  p->x = static_cast<uint16_t>(v != v ? UINT32_C(0x7FC0) : r);
}
static inline void put(c10::Half* p, float v) {
#if LITEFPN_ISA_AVX2
  p->x = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
#else
  *p = c10::Half(v);
#endif
}

// Row of n elements, element stride st (any, 0 included) -> contiguous acc_t.
template <typename acc_t, typename scalar_t>
static inline void load_row(acc_t* __restrict d, const scalar_t* __restrict s, int64_t n,
                            int64_t st) {
  if (st == 1) {
    for (int64_t i = 0; i < n; ++i) d[i] = to_acc(s[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) d[i] = to_acc(s[i * st]);
  }
}

// Contiguous acc_t -> row of n elements with element stride st.
template <typename scalar_t, typename acc_t>
static inline void store_row(scalar_t* __restrict d, const acc_t* __restrict s, int64_t n,
                             int64_t st) {
  if (st == 1) {
    for (int64_t i = 0; i < n; ++i) put(d + i, s[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) put(d + i * st, s[i]);
  }
}

#if LITEFPN_ISA_AVX2
static inline void load_row(float* __restrict d, const c10::Half* __restrict s, int64_t n,
                            int64_t st) {
  int64_t i = 0;
  if (st == 1) {
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  }
  for (; i < n; ++i) d[i] = to_acc(s[i * st]);
}
static inline void store_row(c10::Half* __restrict d, const float* __restrict s, int64_t n,
                             int64_t st) {
  int64_t i = 0;
  if (st == 1) {
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) put(d + i * st, s[i]);
}
#endif

// Transposing load: d[p*ldd + c] = s[c*cs + p] (- center[c]) for p < P, c < C: C rows of
// unit-stride pixels (NCHW-like) to pixel rows. Blocks of 8 channels, so each pass reads 8
// source rows sequentially and writes 8 consecutive elements per pixel; the AVX2 build turns
// float blocks of 8 x 8 around in registers.
template <typename acc_t, typename scalar_t>
static inline void transpose_load(acc_t* __restrict d, int64_t ldd, const scalar_t* __restrict s,
                                  int64_t cs, int64_t P, int64_t C,
                                  const acc_t* __restrict center) {
  int64_t c0 = 0;
#if LITEFPN_ISA_AVX2
  if (std::is_same<scalar_t, float>::value && std::is_same<acc_t, float>::value) {
    const float* sf = reinterpret_cast<const float*>(s);
    float* df = reinterpret_cast<float*>(d);
    for (; c0 + 8 <= C; c0 += 8) {
      const __m256 cv = center ? _mm256_loadu_ps(reinterpret_cast<const float*>(center) + c0)
                               : _mm256_setzero_ps();
      int64_t p0 = 0;
      for (; p0 + 8 <= P; p0 += 8) {
        __m256 r[8], t[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(sf + (c0 + i) * cs + p0);
        for (int i = 0; i < 8; i += 2) {
          t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
          t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
        }
        for (int i = 0; i < 8; i += 4) {
          r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
          r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
          r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
          r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
        }
        for (int i = 0; i < 4; ++i) {
          t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
          t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
        }
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(df + (p0 + j) * ldd + c0, _mm256_sub_ps(t[j], cv));
      }
      for (; p0 < P; ++p0)
        for (int i = 0; i < 8; ++i)
          df[p0 * ldd + c0 + i] = sf[(c0 + i) * cs + p0] - (center ? center[c0 + i] : acc_t(0));
    }
  }
#endif
  for (; c0 < C; c0 += 8) {
    const int nc = C - c0 < 8 ? static_cast<int>(C - c0) : 8;
    acc_t cv[8];
    for (int i = 0; i < nc; ++i) cv[i] = center ? center[c0 + i] : acc_t(0);
    for (int64_t p = 0; p < P; ++p)
      for (int i = 0; i < nc; ++i) d[p * ldd + c0 + i] = to_acc(s[(c0 + i) * cs + p]) - cv[i];
  }
}

// Pixel row of P pixels x C channels (pixel stride ld, channel stride cs) <-> contiguous [P][C].
template <typename acc_t, typename scalar_t>
static inline void load_prow(acc_t* d, const scalar_t* s, int64_t P, int64_t C, int64_t ld,
                             int64_t cs) {
  if (ld == 1 && cs != 1 && P > 1) {
    transpose_load(d, C, s, cs, P, C, static_cast<const acc_t*>(nullptr));
    return;
  }
  for (int64_t p = 0; p < P; ++p) load_row(d + p * C, s + p * ld, C, cs);
}
template <typename scalar_t, typename acc_t>
static inline void store_prow(scalar_t* d, const acc_t* s, int64_t P, int64_t C, int64_t ld,
                              int64_t cs) {
  for (int64_t p = 0; p < P; ++p) store_row(d + p * ld, s + p * C, C, cs);
}

// ----------------------------------------------------------------------------- fixed-order sums
// Lane-wise partial dot products: lane k accumulates the elements x with x % L == k of each row,
// in order; lanes are combined by a fixed pairwise tree. L is a compile-time constant, so the
// order is fixed (no -ffast-math: the compiler may not reassociate).
template <typename T>
struct Lanes {
  static constexpr int L = 64 / static_cast<int>(sizeof(T));  // 16 floats, 8 doubles
};

template <typename T>
static inline void dot_lanes(T* __restrict lanes, const T* __restrict a, const T* __restrict b,
                             int64_t n) {
  constexpr int L = Lanes<T>::L;
  T l[L];
  for (int k = 0; k < L; ++k) l[k] = lanes[k];
  int64_t x = 0;
  for (; x + L <= n; x += L)
    for (int k = 0; k < L; ++k) l[k] += a[x + k] * b[x + k];
  for (int k = 0; x + k < n; ++k) l[k] += a[x + k] * b[x + k];
  for (int k = 0; k < L; ++k) lanes[k] = l[k];
}

// o = s*g, and lanes += g*f (the grad_fine row and its sum in one pass).
template <typename T>
static inline void scale_dot_lanes(T* __restrict o, T* __restrict lanes, const T* __restrict g,
                                   const T* __restrict f, T s, int64_t n) {
  constexpr int L = Lanes<T>::L;
  T l[L];
  for (int k = 0; k < L; ++k) l[k] = lanes[k];
  int64_t x = 0;
  for (; x + L <= n; x += L) {
    for (int k = 0; k < L; ++k) {
      o[x + k] = s * g[x + k];
      l[k] += g[x + k] * f[x + k];
    }
  }
  for (int k = 0; x + k < n; ++k) {
    o[x + k] = s * g[x + k];
    l[k] += g[x + k] * f[x + k];
  }
  for (int k = 0; k < L; ++k) lanes[k] = l[k];
}

template <typename T>
static inline T reduce_lanes(T* l) {
  for (int w = Lanes<T>::L / 2; w > 0; w /= 2)
    for (int k = 0; k < w; ++k) l[k] += l[k + w];
  return l[0];
}

// ----------------------------------------------------------------------------- two-row blend
// o[j] = w0*r0[j] + w1*r1[j]   (r0 and r1 may be the same row: read-only)
template <typename T>
static inline void row_blend2(T* __restrict o, const T* __restrict r0, const T* __restrict r1,
                              T w0, T w1, int64_t n) {
  for (int64_t j = 0; j < n; ++j) o[j] = w0 * r0[j] + w1 * r1[j];
}
