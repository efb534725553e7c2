// The CPU compute kernels of up2_fuse (forward and backward), written once and compiled once per
// instruction set: up2_fuse_kernels_<isa>.cpp includes this file INSIDE its own namespace
// (litefpn::cpu::<isa>), after all #includes and after its target pragma. Hence no #include and
// no #pragma once here, and everything defined here is either `static` or lives in that
// per-ISA namespace: the linker can never substitute code built for one ISA into another.
// Code from the headers included before the pragma (c10, litefpn_math.h) is baseline code,
// which GCC and Clang inline into the ISA-specific functions.
//
// Math (litefpn_math.h): forward out = ca*Up2(coarse) + cb*fine, with ca = alpha*gate_coarse,
// cb = beta*gate_fine precomputed per (n, c) by the caller. Up2 is separable: a vertical blend of
// two coarse rows (litefpn::up2_taps along y), then the horizontal 2x (up2_taps along x).
// Backward: grad_fine = cb*g; grad_coarse = ca*Up2^T(g), gathered: a vertical gather of the
// (clamped) fine rows of litefpn::up2_gather_taps, then the horizontal gather along x. With
// grad_fine.data == nullptr the backward kernels do the coarse half only (grad_coarse and
// sum_coarse: _up2_fuse_bwd_coarse); fine and part_fine are then not touched.
// Arithmetic is in acc_t (float, or double for double storage); f16/bf16 rows are converted to
// acc_t in small L1-resident row buffers, so are rows of any stride (zero included).
//
// Two paths, same math:
//  * plane path (NCHW-like: W is the unit-stride dim): unit = (n, c, chunk of coarse rows).
//    The horizontal 2x along the contiguous W runs on a padded row vp[k] = v[clamp(k-1, 0, W-1)]
//    (exactly the clamped taps of up2_taps / up2_gather_taps along x), as plain loops that the
//    compiler vectorises (interleaving / deinterleaving shuffles).
//  * nhwc path (C is the unit-stride dim): unit = (n, chunk of coarse rows), all channels; the
//    taps are evaluated per pixel and the inner loops run over the contiguous channels.
// Reductions (backward sums) run in a fixed order inside a unit: lane-wise partials with a fixed
// lane count (plane path) or per-channel accumulators (nhwc path). Units never share a reduction,
// so results do not depend on how at::parallel_for splits the units over threads.

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
#if LITEFPN_UP2_F16C
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
#if LITEFPN_UP2_F16C
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

#if LITEFPN_UP2_F16C
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
#if LITEFPN_UP2_F16C
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

// ----------------------------------------------------------------------------- plane-path rows
// o[j] = w0*r0[j] + w1*r1[j]   (r0 and r1 may be the same row: read-only)
template <typename T>
static inline void row_blend2(T* __restrict o, const T* __restrict r0, const T* __restrict r1,
                              T w0, T w1, int64_t n) {
  for (int64_t j = 0; j < n; ++j) o[j] = w0 * r0[j] + w1 * r1[j];
}

// o[x] = w[0]*g0[x] + w[1]*g1[x] + w[2]*g2[x] + w[3]*g3[x]
template <typename T>
static inline void row_blend4(T* __restrict o, const T* __restrict g0, const T* __restrict g1,
                              const T* __restrict g2, const T* __restrict g3, const T* w,
                              int64_t n) {
  const T w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  for (int64_t x = 0; x < n; ++x) o[x] = w0 * g0[x] + w1 * g1[x] + w2 * g2[x] + w3 * g3[x];
}

// Horizontal 2x of the padded row vp (vp[k] = v[clamp(k-1)], length W+2) fused with cb*f:
//   o[2j]   = we0*v[j-1] + we1*v[j] + cb*f[2j],  o[2j+1] = wo0*v[j] + wo1*v[j+1] + cb*f[2j+1]
template <typename T>
static inline void row_up2_add(T* __restrict o, const T* __restrict vp, const T* __restrict f,
                               T cb, int64_t W, T we0, T we1, T wo0, T wo1) {
  for (int64_t j = 0; j < W; ++j) {
    const T a = vp[j], b = vp[j + 1], c = vp[j + 2];
    o[2 * j] = we0 * a + we1 * b + cb * f[2 * j];
    o[2 * j + 1] = wo0 * b + wo1 * c + cb * f[2 * j + 1];
  }
}

// Horizontal gather of the padded row tp (tp[k] = t[clamp(k-1)], length 2W+2):
//   o[j] = h0*t[2j-1] + h1*t[2j] + h2*t[2j+1] + h3*t[2j+2]  (clamped)
template <typename T>
static inline void row_gather_x(T* __restrict o, const T* __restrict tp, const T* h, int64_t W) {
  const T h0 = h[0], h1 = h[1], h2 = h[2], h3 = h[3];
  for (int64_t j = 0; j < W; ++j)
    o[j] = h0 * tp[2 * j] + h1 * tp[2 * j + 1] + h2 * tp[2 * j + 2] + h3 * tp[2 * j + 3];
}

template <typename T>
static inline void row_scale(T* __restrict o, const T* __restrict x, T s, int64_t n) {
  for (int64_t j = 0; j < n; ++j) o[j] = s * x[j];
}

// ----------------------------------------------------------------------------- nhwc-path pixels
// o[c] = s[c]*(w0*r0[c] + w1*r1[c])
template <typename T>
static inline void px_blend2(T* __restrict o, const T* __restrict r0, const T* __restrict r1,
                             const T* __restrict s, T w0, T w1, int64_t C) {
  for (int64_t c = 0; c < C; ++c) o[c] = s[c] * (w0 * r0[c] + w1 * r1[c]);
}

// o[c] = w0*v0[c] + w1*v1[c] + cb[c]*f[c]
template <typename T>
static inline void px_up2_add(T* __restrict o, const T* __restrict v0, const T* __restrict v1,
                              const T* __restrict f, const T* __restrict cb, T w0, T w1,
                              int64_t C) {
  for (int64_t c = 0; c < C; ++c) o[c] = w0 * v0[c] + w1 * v1[c] + cb[c] * f[c];
}

// o[c] = sum_k w[k]*g_k[c]
template <typename T>
static inline void px_blend4(T* __restrict o, const T* __restrict g0, const T* __restrict g1,
                             const T* __restrict g2, const T* __restrict g3, const T* w, int64_t C) {
  const T w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  for (int64_t c = 0; c < C; ++c) o[c] = w0 * g0[c] + w1 * g1[c] + w2 * g2[c] + w3 * g3[c];
}

// v = sum_k w[k]*t_k[c]; o[c] = ca[c]*v; (sums) ps[c] += x[c]*v
template <typename T>
static inline void px_gather_x(T* __restrict o, const T* __restrict t0, const T* __restrict t1,
                               const T* __restrict t2, const T* __restrict t3, const T* w,
                               const T* __restrict ca, int64_t C) {
  const T w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  for (int64_t c = 0; c < C; ++c) o[c] = ca[c] * (w0 * t0[c] + w1 * t1[c] + w2 * t2[c] + w3 * t3[c]);
}
template <typename T>
static inline void px_gather_x_sum(T* __restrict o, T* __restrict ps, const T* __restrict t0,
                                   const T* __restrict t1, const T* __restrict t2,
                                   const T* __restrict t3, const T* w, const T* __restrict ca,
                                   const T* __restrict x, int64_t C) {
  const T w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  for (int64_t c = 0; c < C; ++c) {
    const T v = w0 * t0[c] + w1 * t1[c] + w2 * t2[c] + w3 * t3[c];
    o[c] = ca[c] * v;
    ps[c] += x[c] * v;
  }
}

// o[c] = cb[c]*g[c]; (sums) ps[c] += g[c]*f[c]
template <typename T>
static inline void px_scale(T* __restrict o, const T* __restrict g, const T* __restrict cb,
                            int64_t C) {
  for (int64_t c = 0; c < C; ++c) o[c] = cb[c] * g[c];
}
template <typename T>
static inline void px_scale_sum(T* __restrict o, T* __restrict ps, const T* __restrict g,
                                const T* __restrict f, const T* __restrict cb, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    o[c] = cb[c] * g[c];
    ps[c] += g[c] * f[c];
  }
}
// A whole pixel row at once (P pixels, pixel strides ldo / ldg / ldf): blocks of channels
// outside, pixels inside, so a block's sums stay in registers instead of a load + store of ps per
// pixel (that per-pixel round trip through memory made the row loop several times slower at
// large sizes). Each ps[c] still adds its pixels in order 0, 1, ..., P-1.
template <typename T>
static inline void px_scale_sum_row(T* __restrict o, int64_t ldo, T* __restrict ps,
                                    const T* __restrict g, int64_t ldg, const T* __restrict f,
                                    int64_t ldf, const T* __restrict cb, int64_t P, int64_t C) {
  constexpr int64_t kB = 16;
  int64_t c0 = 0;
  for (; c0 + kB <= C; c0 += kB) {
    T acc[kB], s[kB];
    for (int64_t k = 0; k < kB; ++k) {
      acc[k] = ps[c0 + k];
      s[k] = cb[c0 + k];
    }
    for (int64_t x = 0; x < P; ++x) {
      const T* __restrict gx = g + x * ldg + c0;
      const T* __restrict fx = f + x * ldf + c0;
      T* __restrict ox = o + x * ldo + c0;
      for (int64_t k = 0; k < kB; ++k) {
        ox[k] = s[k] * gx[k];
        acc[k] += gx[k] * fx[k];
      }
    }
    for (int64_t k = 0; k < kB; ++k) ps[c0 + k] = acc[k];
  }
  if (c0 < C) {
    for (int64_t x = 0; x < P; ++x)
      px_scale_sum(o + x * ldo + c0, ps + c0, g + x * ldg + c0, f + x * ldf + c0, cb + c0, C - c0);
  }
}

// ----------------------------------------------------------------------------- row sources
// A read-only row of acc_t: straight from the tensor when the storage is acc_t with unit stride
// (`direct`), else converted / gathered into a ring slot, cached by row index.
template <typename scalar_t, typename acc_t>
struct RowRing {
  const scalar_t* base;  // row 0 of the (n, c) plane / of image n
  int64_t row_stride;
  int64_t n, st;         // plane: elements per row and their stride
  int64_t P, C, ld, cs;  // nhwc: pixels, channels, pixel stride, channel stride
  bool direct, nhwc;
  acc_t* slots;
  int64_t slot_elems;
  int nslots;
  int64_t tag[4];

  void reset(const scalar_t* b) {
    base = b;
    for (int s = 0; s < 4; ++s) tag[s] = -1;
  }
  // Pointer to row r; its pixel stride (nhwc) is returned in *ld_out.
  const acc_t* get(int64_t r, int64_t* ld_out) {
    const scalar_t* src = base + r * row_stride;
    if (direct) {
      if (ld_out) *ld_out = ld;
      return reinterpret_cast<const acc_t*>(src);
    }
    const int s = static_cast<int>(r % nslots);
    acc_t* d = slots + s * slot_elems;
    if (tag[s] != r) {
      if (nhwc) {
        load_prow(d, src, P, C, ld, cs);
      } else {
        load_row(d, src, n, st);
      }
      tag[s] = r;
    }
    if (ld_out) *ld_out = C;
    return d;
  }
};

template <typename scalar_t, typename acc_t>
static inline RowRing<scalar_t, acc_t> plane_ring(const Up2View& v, int64_t n, acc_t* slots,
                                                  int nslots) {
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  RowRing<scalar_t, acc_t> r;
  r.row_stride = v.s[2];
  r.n = n;
  r.st = v.s[3];
  r.P = r.C = r.ld = r.cs = 1;
  r.direct = kSame && v.s[3] == 1;
  r.nhwc = false;
  r.slots = slots;
  r.slot_elems = n;
  r.nslots = nslots;
  r.reset(nullptr);
  return r;
}

template <typename scalar_t, typename acc_t>
static inline RowRing<scalar_t, acc_t> nhwc_ring(const Up2View& v, int64_t P, int64_t C,
                                                 acc_t* slots, int nslots) {
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  RowRing<scalar_t, acc_t> r;
  r.row_stride = v.s[2];
  r.n = P * C;
  r.st = 1;
  r.P = P;
  r.C = C;
  r.ld = v.s[3];
  r.cs = v.s[1];
  r.direct = kSame && v.s[1] == 1;
  r.nhwc = true;
  r.slots = slots;
  r.slot_elems = P * C;
  r.nslots = nslots;
  r.reset(nullptr);
  return r;
}

#if !defined(LITEFPN_UP2_HELPERS_ONLY)  // lateral_kernels_<isa>.cpp take the helpers above only
// ----------------------------------------------------------------------------- forward
template <typename scalar_t>
static void fwd_plane(const Up2Args& a, int64_t begin, int64_t end, void* scratch) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  const int64_t C = a.C, H = a.H, W = a.W, W2 = 2 * W;
  const Up2ScratchLayout L = up2_scratch_layout(false, false, W, C);
  acc_t* const scr = static_cast<acc_t*>(scratch);
  acc_t* const vp = scr + L.off[kSegBlend];
  acc_t* const fbuf = scr + L.off[kSegIn1];
  acc_t* const obuf = scr + L.off[kSegOut1];
  const scalar_t* const cdat = static_cast<const scalar_t*>(a.coarse.data);
  const scalar_t* const fdat = static_cast<const scalar_t*>(a.fine.data);
  scalar_t* const odat = static_cast<scalar_t*>(a.out.data);
  const int64_t *cs = a.coarse.s, *fs = a.fine.s, *os = a.out.s;
  const bool f_direct = kSame && fs[3] == 1;
  const bool o_direct = kSame && os[3] == 1;
  const acc_t* const CA = static_cast<const acc_t*>(a.ca);
  const acc_t* const CB = static_cast<const acc_t*>(a.cb);
  // Taps along x for the even (>= 2) and the odd fine columns (on the padded row: vp[j], vp[j+1]
  // and vp[j+1], vp[j+2]); column 0 has its own taps (1, 0), applied after the row loop.
  int64_t e0, e1, o0, o1, z0, z1;
  acc_t we0, we1, wo0, wo1, wz0, wz1;
  ::litefpn::up2_taps<acc_t>(2, W, e0, e1, we0, we1);
  ::litefpn::up2_taps<acc_t>(1, W, o0, o1, wo0, wo1);
  ::litefpn::up2_taps<acc_t>(0, W, z0, z1, wz0, wz1);
  RowRing<scalar_t, acc_t> crows = plane_ring<scalar_t, acc_t>(a.coarse, W, scr + L.off[kSegRing], 3);

  for (int64_t u = begin; u < end; ++u) {
    const int64_t nc = u / a.nchunks, chunk = u % a.nchunks;
    const int64_t n = nc / C, c = nc % C;
    const int64_t ib = chunk * a.rows_per_chunk;
    const int64_t ie = ib + a.rows_per_chunk < H ? ib + a.rows_per_chunk : H;
    const acc_t ca = CA[nc], cb = CB[nc];
    crows.reset(cdat + n * cs[0] + c * cs[1]);
    const scalar_t* const fpl = fdat + n * fs[0] + c * fs[1];
    scalar_t* const opl = odat + n * os[0] + c * os[1];
    for (int64_t i = ib; i < ie; ++i) {
      for (int64_t y = 2 * i; y < 2 * i + 2; ++y) {
        int64_t i0, i1;
        acc_t w0, w1;
        ::litefpn::up2_taps<acc_t>(y, H, i0, i1, w0, w1);
        const acc_t* r0 = crows.get(i0, nullptr);
        const acc_t* r1 = crows.get(i1, nullptr);
        row_blend2(vp + 1, r0, r1, ca * w0, ca * w1, W);
        vp[0] = vp[1];
        vp[W + 1] = vp[W];
        const scalar_t* frow = fpl + y * fs[2];
        const acc_t* f;
        if (f_direct) {
          f = reinterpret_cast<const acc_t*>(frow);
        } else {
          load_row(fbuf, frow, W2, fs[3]);
          f = fbuf;
        }
        scalar_t* orow = opl + y * os[2];
        acc_t* o = o_direct ? reinterpret_cast<acc_t*>(orow) : obuf;
        row_up2_add(o, vp, f, cb, W, we0, we1, wo0, wo1);
        o[0] = wz0 * vp[1 + z0] + wz1 * vp[1 + z1] + cb * f[0];
        if (!o_direct) store_row(orow, obuf, W2, os[3]);
      }
    }
  }
}

template <typename scalar_t>
static void fwd_nhwc(const Up2Args& a, int64_t begin, int64_t end, void* scratch) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  const int64_t C = a.C, H = a.H, W = a.W, W2 = 2 * W;
  const Up2ScratchLayout L = up2_scratch_layout(false, true, W, C);
  acc_t* const scr = static_cast<acc_t*>(scratch);
  acc_t* const v = scr + L.off[kSegBlend];  // [W][C]: ca * vertical blend of one fine row
  acc_t* const fbuf = scr + L.off[kSegIn1];
  acc_t* const obuf = scr + L.off[kSegOut1];
  const scalar_t* const cdat = static_cast<const scalar_t*>(a.coarse.data);
  const scalar_t* const fdat = static_cast<const scalar_t*>(a.fine.data);
  scalar_t* const odat = static_cast<scalar_t*>(a.out.data);
  const int64_t *cs = a.coarse.s, *fs = a.fine.s, *os = a.out.s;
  const bool f_direct = kSame && fs[1] == 1;
  const bool o_direct = kSame && os[1] == 1;
  const acc_t* const CA = static_cast<const acc_t*>(a.ca);
  const acc_t* const CB = static_cast<const acc_t*>(a.cb);
  RowRing<scalar_t, acc_t> crows = nhwc_ring<scalar_t, acc_t>(a.coarse, W, C, scr + L.off[kSegRing], 3);

  for (int64_t u = begin; u < end; ++u) {
    const int64_t n = u / a.nchunks, chunk = u % a.nchunks;
    const int64_t ib = chunk * a.rows_per_chunk;
    const int64_t ie = ib + a.rows_per_chunk < H ? ib + a.rows_per_chunk : H;
    const acc_t* const ca = CA + n * C;
    const acc_t* const cb = CB + n * C;
    crows.reset(cdat + n * cs[0]);
    const scalar_t* const fimg = fdat + n * fs[0];
    scalar_t* const oimg = odat + n * os[0];
    for (int64_t i = ib; i < ie; ++i) {
      for (int64_t y = 2 * i; y < 2 * i + 2; ++y) {
        int64_t i0, i1, ld0, ld1;
        acc_t w0, w1;
        ::litefpn::up2_taps<acc_t>(y, H, i0, i1, w0, w1);
        const acc_t* r0 = crows.get(i0, &ld0);
        const acc_t* r1 = crows.get(i1, &ld1);
        for (int64_t j = 0; j < W; ++j) px_blend2(v + j * C, r0 + j * ld0, r1 + j * ld1, ca, w0, w1, C);
        const scalar_t* frow = fimg + y * fs[2];
        const acc_t* f;
        int64_t ldf;
        if (f_direct) {
          f = reinterpret_cast<const acc_t*>(frow);
          ldf = fs[3];
        } else {
          load_prow(fbuf, frow, W2, C, fs[3], fs[1]);
          f = fbuf;
          ldf = C;
        }
        scalar_t* orow = oimg + y * os[2];
        acc_t* o = o_direct ? reinterpret_cast<acc_t*>(orow) : obuf;
        const int64_t ldo = o_direct ? os[3] : C;
        for (int64_t x = 0; x < W2; ++x) {
          int64_t j0, j1;
          acc_t wx0, wx1;
          ::litefpn::up2_taps<acc_t>(x, W, j0, j1, wx0, wx1);
          px_up2_add(o + x * ldo, v + j0 * C, v + j1 * C, f + x * ldf, cb, wx0, wx1, C);
        }
        if (!o_direct) store_prow(orow, obuf, W2, C, os[3], os[1]);
      }
    }
  }
}

// ----------------------------------------------------------------------------- backward
template <typename scalar_t>
static void bwd_plane(const Up2Args& a, int64_t begin, int64_t end, void* scratch) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  constexpr int kL = Lanes<acc_t>::L;
  const int64_t C = a.C, H = a.H, W = a.W, W2 = 2 * W;
  const Up2ScratchLayout L = up2_scratch_layout(true, false, W, C);
  acc_t* const scr = static_cast<acc_t*>(scratch);
  acc_t* const tp = scr + L.off[kSegBlend];  // padded vertical gather, 2W+2
  acc_t* const fbuf = scr + L.off[kSegIn1];
  acc_t* const gfbuf = scr + L.off[kSegOut1];
  acc_t* const gcbuf = scr + L.off[kSegOut2];
  acc_t* const gcr = scr + L.off[kSegVec];  // Up2^T(g) of one coarse row, unscaled
  const scalar_t* const fdat = static_cast<const scalar_t*>(a.fine.data);
  scalar_t* const gcdat = static_cast<scalar_t*>(a.grad_coarse.data);
  scalar_t* const gfdat = static_cast<scalar_t*>(a.grad_fine.data);
  const int64_t *gs = a.grad_out.s, *cs = a.coarse.s, *fs = a.fine.s;
  const int64_t *gcs = a.grad_coarse.s, *gfs = a.grad_fine.s;
  const bool f_direct = kSame && fs[3] == 1;
  const bool gc_direct = kSame && gcs[3] == 1;
  const bool gf_direct = kSame && gfs[3] == 1;
  const bool sums = a.part_coarse != nullptr;
  const bool fine_half = gfdat != nullptr;  // else the coarse half only (_up2_fuse_bwd_coarse)
  acc_t* const part_c = static_cast<acc_t*>(a.part_coarse);
  acc_t* const part_f = static_cast<acc_t*>(a.part_fine);
  const acc_t* const CA = static_cast<const acc_t*>(a.ca);
  const acc_t* const CB = static_cast<const acc_t*>(a.cb);
  // Gather weights along x (the same for every column; the clamping is in the padding of tp).
  int64_t xi[::litefpn::kGatherTaps];
  acc_t hx[::litefpn::kGatherTaps];
  ::litefpn::up2_gather_taps<acc_t>(0, W, xi, hx);
  RowRing<scalar_t, acc_t> grows = plane_ring<scalar_t, acc_t>(a.grad_out, W2, scr + L.off[kSegRing], 4);
  RowRing<scalar_t, acc_t> crows = plane_ring<scalar_t, acc_t>(a.coarse, W, scr + L.off[kSegIn2], 1);

  for (int64_t u = begin; u < end; ++u) {
    const int64_t nc = u / a.nchunks, chunk = u % a.nchunks;
    const int64_t n = nc / C, c = nc % C;
    const int64_t ib = chunk * a.rows_per_chunk;
    const int64_t ie = ib + a.rows_per_chunk < H ? ib + a.rows_per_chunk : H;
    const acc_t ca = CA[nc], cb = CB[nc];
    grows.reset(static_cast<const scalar_t*>(a.grad_out.data) + n * gs[0] + c * gs[1]);
    crows.reset(static_cast<const scalar_t*>(a.coarse.data) + n * cs[0] + c * cs[1]);
    const scalar_t* const fpl = fdat + n * fs[0] + c * fs[1];
    scalar_t* const gcpl = gcdat + n * gcs[0] + c * gcs[1];
    scalar_t* const gfpl = gfdat + n * gfs[0] + c * gfs[1];
    acc_t lc[kL], lf[kL];
    for (int k = 0; k < kL; ++k) lc[k] = lf[k] = acc_t(0);
    for (int64_t i = ib; i < ie; ++i) {
      int64_t yi[::litefpn::kGatherTaps];
      acc_t wy[::litefpn::kGatherTaps];
      ::litefpn::up2_gather_taps<acc_t>(i, H, yi, wy);
      // Rows 2i-1 .. 2i+2 (clamped): distinct modulo 4, so the 4 ring slots hold them all.
      const acc_t* g0 = grows.get(yi[0], nullptr);
      const acc_t* g1 = grows.get(yi[1], nullptr);
      const acc_t* g2 = grows.get(yi[2], nullptr);
      const acc_t* g3 = grows.get(yi[3], nullptr);
      row_blend4(tp + 1, g0, g1, g2, g3, wy, W2);
      tp[0] = tp[1];
      tp[W2 + 1] = tp[W2];
      row_gather_x(gcr, tp, hx, W);
      scalar_t* gcrow = gcpl + i * gcs[2];
      acc_t* gco = gc_direct ? reinterpret_cast<acc_t*>(gcrow) : gcbuf;
      row_scale(gco, gcr, ca, W);
      if (!gc_direct) store_row(gcrow, gcbuf, W, gcs[3]);
      if (sums) dot_lanes(lc, crows.get(i, nullptr), gcr, W);
      // The fine rows 2i and 2i+1 (= yi[1], yi[2]) belong to this coarse row.
      for (int h = 0; h < (fine_half ? 2 : 0); ++h) {
        const int64_t y = 2 * i + h;
        const acc_t* g = h == 0 ? g1 : g2;
        scalar_t* gfrow = gfpl + y * gfs[2];
        acc_t* gfo = gf_direct ? reinterpret_cast<acc_t*>(gfrow) : gfbuf;
        if (sums) {
          const scalar_t* frow = fpl + y * fs[2];
          const acc_t* f;
          if (f_direct) {
            f = reinterpret_cast<const acc_t*>(frow);
          } else {
            load_row(fbuf, frow, W2, fs[3]);
            f = fbuf;
          }
          scale_dot_lanes(gfo, lf, g, f, cb, W2);
        } else {
          row_scale(gfo, g, cb, W2);
        }
        if (!gf_direct) store_row(gfrow, gfbuf, W2, gfs[3]);
      }
    }
    if (sums) {
      part_c[u] = reduce_lanes(lc);
      if (fine_half) part_f[u] = reduce_lanes(lf);
    }
  }
}

template <typename scalar_t>
static void bwd_nhwc(const Up2Args& a, int64_t begin, int64_t end, void* scratch) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  const int64_t C = a.C, H = a.H, W = a.W, W2 = 2 * W;
  const Up2ScratchLayout L = up2_scratch_layout(true, true, W, C);
  acc_t* const scr = static_cast<acc_t*>(scratch);
  acc_t* const t = scr + L.off[kSegBlend];  // [2W][C] vertical gather
  acc_t* const fbuf = scr + L.off[kSegIn1];
  acc_t* const gfbuf = scr + L.off[kSegOut1];
  acc_t* const gcbuf = scr + L.off[kSegOut2];
  const scalar_t* const fdat = static_cast<const scalar_t*>(a.fine.data);
  scalar_t* const gcdat = static_cast<scalar_t*>(a.grad_coarse.data);
  scalar_t* const gfdat = static_cast<scalar_t*>(a.grad_fine.data);
  const int64_t *gs = a.grad_out.s, *cs = a.coarse.s, *fs = a.fine.s;
  const int64_t *gcs = a.grad_coarse.s, *gfs = a.grad_fine.s;
  const bool f_direct = kSame && fs[1] == 1;
  const bool gc_direct = kSame && gcs[1] == 1;
  const bool gf_direct = kSame && gfs[1] == 1;
  const bool sums = a.part_coarse != nullptr;
  const bool fine_half = gfdat != nullptr;  // else the coarse half only (_up2_fuse_bwd_coarse)
  const acc_t* const CA = static_cast<const acc_t*>(a.ca);
  const acc_t* const CB = static_cast<const acc_t*>(a.cb);
  RowRing<scalar_t, acc_t> grows = nhwc_ring<scalar_t, acc_t>(a.grad_out, W2, C, scr + L.off[kSegRing], 4);
  RowRing<scalar_t, acc_t> crows = nhwc_ring<scalar_t, acc_t>(a.coarse, W, C, scr + L.off[kSegIn2], 1);

  for (int64_t u = begin; u < end; ++u) {
    const int64_t n = u / a.nchunks, chunk = u % a.nchunks;
    const int64_t ib = chunk * a.rows_per_chunk;
    const int64_t ie = ib + a.rows_per_chunk < H ? ib + a.rows_per_chunk : H;
    const acc_t* const ca = CA + n * C;
    const acc_t* const cb = CB + n * C;
    grows.reset(static_cast<const scalar_t*>(a.grad_out.data) + n * gs[0]);
    crows.reset(static_cast<const scalar_t*>(a.coarse.data) + n * cs[0]);
    const scalar_t* const fimg = fdat + n * fs[0];
    scalar_t* const gcimg = gcdat + n * gcs[0];
    scalar_t* const gfimg = gfdat + n * gfs[0];
    // Per-channel sums of this unit, accumulated pixel by pixel in a fixed order.
    acc_t* const psc = sums ? static_cast<acc_t*>(a.part_coarse) + u * C : nullptr;
    acc_t* const psf = sums && fine_half ? static_cast<acc_t*>(a.part_fine) + u * C : nullptr;
    if (sums) {
      for (int64_t c = 0; c < C; ++c) psc[c] = acc_t(0);
      if (fine_half)
        for (int64_t c = 0; c < C; ++c) psf[c] = acc_t(0);
    }
    for (int64_t i = ib; i < ie; ++i) {
      int64_t yi[::litefpn::kGatherTaps], ld[::litefpn::kGatherTaps];
      acc_t wy[::litefpn::kGatherTaps];
      ::litefpn::up2_gather_taps<acc_t>(i, H, yi, wy);
      const acc_t* g0 = grows.get(yi[0], &ld[0]);
      const acc_t* g1 = grows.get(yi[1], &ld[1]);
      const acc_t* g2 = grows.get(yi[2], &ld[2]);
      const acc_t* g3 = grows.get(yi[3], &ld[3]);
      for (int64_t x = 0; x < W2; ++x)
        px_blend4(t + x * C, g0 + x * ld[0], g1 + x * ld[1], g2 + x * ld[2], g3 + x * ld[3], wy, C);
      scalar_t* gcrow = gcimg + i * gcs[2];
      acc_t* gco = gc_direct ? reinterpret_cast<acc_t*>(gcrow) : gcbuf;
      const int64_t ldgc = gc_direct ? gcs[3] : C;
      int64_t ldc = 0;
      const acc_t* cr = sums ? crows.get(i, &ldc) : nullptr;
      for (int64_t j = 0; j < W; ++j) {
        int64_t xi[::litefpn::kGatherTaps];
        acc_t wx[::litefpn::kGatherTaps];
        ::litefpn::up2_gather_taps<acc_t>(j, W, xi, wx);
        if (sums) {
          px_gather_x_sum(gco + j * ldgc, psc, t + xi[0] * C, t + xi[1] * C, t + xi[2] * C,
                          t + xi[3] * C, wx, ca, cr + j * ldc, C);
        } else {
          px_gather_x(gco + j * ldgc, t + xi[0] * C, t + xi[1] * C, t + xi[2] * C, t + xi[3] * C,
                      wx, ca, C);
        }
      }
      if (!gc_direct) store_prow(gcrow, gcbuf, W, C, gcs[3], gcs[1]);
      for (int h = 0; h < (fine_half ? 2 : 0); ++h) {
        const int64_t y = 2 * i + h;
        const acc_t* g = h == 0 ? g1 : g2;
        const int64_t ldg = h == 0 ? ld[1] : ld[2];
        scalar_t* gfrow = gfimg + y * gfs[2];
        acc_t* gfo = gf_direct ? reinterpret_cast<acc_t*>(gfrow) : gfbuf;
        const int64_t ldgf = gf_direct ? gfs[3] : C;
        if (sums) {
          const scalar_t* frow = fimg + y * fs[2];
          const acc_t* f;
          int64_t ldf;
          if (f_direct) {
            f = reinterpret_cast<const acc_t*>(frow);
            ldf = fs[3];
          } else {
            load_prow(fbuf, frow, W2, C, fs[3], fs[1]);
            f = fbuf;
            ldf = C;
          }
          px_scale_sum_row(gfo, ldgf, psf, g, ldg, f, ldf, cb, W2, C);
        } else {
          for (int64_t x = 0; x < W2; ++x) px_scale(gfo + x * ldgf, g + x * ldg, cb, C);
        }
        if (!gf_direct) store_prow(gfrow, gfbuf, W2, C, gfs[3], gfs[1]);
      }
    }
  }
}

// ----------------------------------------------------------------------------- table
static const Up2KernelTable kTable = {
    LITEFPN_UP2_ISA_NAME,
    {fwd_plane<float>, fwd_plane<double>, fwd_plane<c10::Half>, fwd_plane<c10::BFloat16>},
    {fwd_nhwc<float>, fwd_nhwc<double>, fwd_nhwc<c10::Half>, fwd_nhwc<c10::BFloat16>},
    {bwd_plane<float>, bwd_plane<double>, bwd_plane<c10::Half>, bwd_plane<c10::BFloat16>},
    {bwd_nhwc<float>, bwd_nhwc<double>, bwd_nhwc<c10::Half>, bwd_nhwc<c10::BFloat16>},
};
#endif  // !LITEFPN_UP2_HELPERS_ONLY
