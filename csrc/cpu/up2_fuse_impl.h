// The CPU compute kernels of up2_fuse (forward and backward), written once and compiled once per
// instruction set: csrc/cpu/isa/<isa>.cpp includes this file INSIDE its own namespace
// (litefpn::cpu::isa_<isa>), after all #includes (cpu/isa/kernel_headers.h), after its target
// pragma and after common/row_io.h. Hence no #include and no #pragma once here, and everything
// defined here is either `static` or lives in that per-ISA namespace: the linker can never
// substitute code built for one ISA into another. Code from the headers included before the
// pragma (c10, litefpn_math.h) is baseline code, which GCC and Clang inline into the
// ISA-specific functions.
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

// The conversions, row I/O and fixed-order lane sums used here are in common/row_io.h, which
// csrc/cpu/isa/<isa>.cpp includes before this file, in the same per-ISA namespace.

// ----------------------------------------------------------------------------- plane-path rows
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
  // Pointer to row r; its pixel stride (nhwc) is returned in *ld_out. Not inlined: it runs a
  // few times per output row, and inlining its two loaders into the NHWC backward (as GCC did
  // once every kernel shared one translation unit per ISA) made that kernel 10-20% slower.
  __attribute__((noinline)) const acc_t* get(int64_t r, int64_t* ld_out) {
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
static inline RowRing<scalar_t, acc_t> plane_ring(const TensorView4& v, int64_t n, acc_t* slots,
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
static inline RowRing<scalar_t, acc_t> nhwc_ring(const TensorView4& v, int64_t P, int64_t C,
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
    LITEFPN_ISA_NAME,
    {fwd_plane<float>, fwd_plane<double>, fwd_plane<c10::Half>, fwd_plane<c10::BFloat16>},
    {fwd_nhwc<float>, fwd_nhwc<double>, fwd_nhwc<c10::Half>, fwd_nhwc<c10::BFloat16>},
    {bwd_plane<float>, bwd_plane<double>, bwd_plane<c10::Half>, bwd_plane<c10::BFloat16>},
    {bwd_nhwc<float>, bwd_nhwc<double>, bwd_nhwc<c10::Half>, bwd_nhwc<c10::BFloat16>},
};
