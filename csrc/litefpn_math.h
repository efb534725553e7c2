// Per-element math shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels: the bilinear 2x
// taps (align_corners=False) and the softplus-normalised fusion weights. One definition, so the
// two backends cannot drift apart.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LITEFPN_HD __host__ __device__ __forceinline__
#else
#define LITEFPN_HD inline
#endif

namespace litefpn {

// F.softplus with its defaults (beta=1, threshold=20): x above the threshold passes through.
template <typename acc_t>
LITEFPN_HD acc_t softplus(acc_t x) {
  return x > acc_t(20) ? x : ::log1p(::exp(x));
}

// alpha = sp(w_coarse) / (sp(w_coarse) + sp(w_fine) + eps), beta likewise.
template <typename acc_t>
LITEFPN_HD void fusion_weights(acc_t w_coarse, acc_t w_fine, acc_t eps, acc_t& alpha, acc_t& beta) {
  const acc_t sp_c = softplus(w_coarse);
  const acc_t sp_f = softplus(w_fine);
  const acc_t denom = sp_c + sp_f + eps;
  alpha = sp_c / denom;
  beta = sp_f / denom;
}

// Forward taps along one axis, exactly those of F.interpolate(scale_factor=2, mode="bilinear",
// align_corners=False): fine index `o` reads coarse i0 = max((o-1)>>1, 0) and
// i1 = min(i0+1, n-1) with weights w0 + w1 = 1:
//   o = 0:            1    * x[0]   + 0    * x[1]    (eager reads x[1] with weight 0, so a
//                                                     NaN/Inf there reaches out[0] too)
//   o = 2i (i >= 1):  0.25 * x[i-1] + 0.75 * x[i]
//   o = 2i+1:         0.75 * x[i]   + 0.25 * x[min(i+1, n-1)]
template <typename acc_t>
LITEFPN_HD void up2_taps(int64_t o, int64_t n_coarse, int64_t& i0, int64_t& i1, acc_t& w0, acc_t& w1) {
  i0 = o > 0 ? (o - 1) >> 1 : 0;
  i1 = i0 + 1 < n_coarse ? i0 + 1 : n_coarse - 1;
  w1 = o == 0 ? acc_t(0) : ((o & 1) ? acc_t(0.25) : acc_t(0.75));
  w0 = acc_t(1) - w1;
}

// Backward (gather) taps along one axis: coarse index `i` collects fine indices
// clamp(2i-1), 2i, 2i+1, clamp(2i+2) (clamped to [0, 2n-1]) with weights 1/4, 3/4, 3/4, 1/4.
// Clamping reproduces the border rows where one coarse pixel carries the full weight 1. (Eager's
// backward also adds 0 * grad[0] into coarse index 1, the zero-weight tap of o = 0; the gather
// leaves that product out, so a NaN/Inf in grad_out's first fine row or column does not reach
// grad_coarse's second one. Every other non-finite value propagates as in eager.)
constexpr int kGatherTaps = 4;

template <typename acc_t>
LITEFPN_HD void up2_gather_taps(int64_t i, int64_t n_coarse, int64_t idx[kGatherTaps], acc_t w[kGatherTaps]) {
  const int64_t last = 2 * n_coarse - 1;
  idx[0] = 2 * i - 1 < 0 ? 0 : 2 * i - 1;
  idx[1] = 2 * i;
  idx[2] = 2 * i + 1;
  idx[3] = 2 * i + 2 > last ? last : 2 * i + 2;
  w[0] = acc_t(0.25);
  w[1] = acc_t(0.75);
  w[2] = acc_t(0.75);
  w[3] = acc_t(0.25);
}

}  // namespace litefpn
