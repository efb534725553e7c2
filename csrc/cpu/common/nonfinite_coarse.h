// The coarse side of up2_fuse / lateral_up2_fuse when its coefficient ca = alpha*gate_coarse[n,c]
// is not finite (an Inf gate). Eager interpolates first and scales after, so Inf*Up2(coarse) is
// +-Inf; the kernels fold ca into the interpolation taps, where the zero-weight border tap and
// taps of opposite sign would give 0*Inf and Inf-Inf = NaN instead. Such (n, c) planes run
// through the kernel with ca = 0 and are then rewritten here in eager's order. A rare path
// (plain ATen ops), and the check costs one pass over the [N, C] coefficients.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/upsample_bilinear2d.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace litefpn {
namespace cpu {

struct NonFinitePlane {
  int64_t n, c;
  double ca;
};

// Collects the planes whose coefficient ca[n*ld + c] is not finite and zeroes it for the kernel.
template <typename acc_t>
std::vector<NonFinitePlane> take_nonfinite_planes(acc_t* ca, int64_t N, int64_t C, int64_t ld) {
  std::vector<NonFinitePlane> planes;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      acc_t& v = ca[n * ld + c];
      if (!std::isfinite(v)) {
        planes.push_back({n, c, static_cast<double>(v)});
        v = acc_t(0);
      }
    }
  }
  return planes;
}

// out[n, c] = ca * Up2(coarse[n, c]) + fine_side(n, c) for each collected plane, in `acc`;
// fine_side returns the fine term (coefficient included) as an [2H, 2W] tensor of `acc`.
template <typename FineSide>
void rewrite_nonfinite_planes(const std::vector<NonFinitePlane>& planes, const at::Tensor& out,
                              const at::Tensor& coarse, at::ScalarType acc, FineSide fine_side) {
  const int64_t H = coarse.size(2), W = coarse.size(3);
  for (const NonFinitePlane& p : planes) {
    const at::Tensor x = coarse.select(0, p.n).narrow(0, p.c, 1).unsqueeze(0).to(acc);
    const at::Tensor up = at::upsample_bilinear2d(x, {2 * H, 2 * W}, /*align_corners=*/false,
                                                  2.0, 2.0).squeeze(0).squeeze(0);
    out.select(0, p.n).select(0, p.c).copy_(up.mul(p.ca).add(fine_side(p.n, p.c)));
  }
}

}  // namespace cpu
}  // namespace litefpn
