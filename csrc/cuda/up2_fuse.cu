// CUDA kernels of litefpn::_up2_fuse_fwd / _up2_fuse_bwd (schemas in csrc/ops.cpp).
//
//   out = ca*Up2(coarse) + cb*fine,  ca = alpha*gate_coarse[n,c],  cb = beta*gate_fine[n,c]
//
// with Up2 = F.interpolate(scale_factor=2, mode="bilinear", align_corners=False), taps from
// litefpn::up2_taps on both axes (all four 2-D taps, combined in eager's order
// wy0*(wx0*v00 + wx1*v01) + wy1*(wx0*v10 + wx1*v11)), and alpha, beta the softplus-normalised
// fusion weights, computed on the device. The backward (a gather, shared with lateral.cu) is in
// common.cuh.
//
// Forward paths, chosen by the output's layout (out = empty_like(fine)):
//   plane (W innermost, e.g. contiguous NCHW): a thread writes G consecutive outputs of one fine
//     row; coarse columns come from a small per-thread window, fine / out move as G-wide vectors.
//   nhwc (C innermost, channels_last): a thread writes G consecutive channels of one fine pixel;
//     coarse, fine and out all move as G-wide vectors along C.
// G = 16 bytes' worth of elements where the sizes allow it (else 2 / the plane path); a tensor
// whose strides or alignment do not allow vectors is read element-wise with its own strides, so
// every layout is correct, and the common ones are fast.
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cuda/common.cuh"

namespace litefpn {
namespace gpu {
namespace {

template <typename scalar_t>
struct Up2FwdArgs {
  int64_t N = 0, C = 0, H = 0, W = 0;  // coarse sizes; fine and out are [N, C, 2H, 2W]
  View4 coarse, fine, out;
  bool vec_coarse = false, vec_fine = false, vec_out = false;
  Up2Scales<acc_of<scalar_t>> sc;
};

// Plane group g: outputs ox0 .. ox0+G-1 (ox0 = G*k, G even) of fine row oy of plane (n, c).
//
// Horizontal taps (litefpn::up2_taps): ox = 2m+1 reads x[m], x[min(m+1, W-1)]; ox = 2m >= 2
// reads x[m-1], x[m]; ox = 0 reads x[0] (weight 1) and x[min(1, W-1)] (weight 0, as eager: a
// NaN/Inf there reaches out[0]). With base = ox0/2 - 1 and window slot k = column
// clamp(base + k), output e's first tap is slot (e+1)/2 and its second slot (e+1)/2 + 1,
// except e = 0 at ox0 = 0, whose second tap x[min(1, W-1)] is slot 2.
template <int G, typename scalar_t, typename index_t>
LITEFPN_HD void up2_fwd_plane_group(const Up2FwdArgs<scalar_t>& a, index_t g,
                                    acc_of<scalar_t> alpha, acc_of<scalar_t> beta) {
  using acc_t = acc_of<scalar_t>;
  static_assert(G >= 2 && G % 2 == 0, "plane groups hold whole output pairs");
  constexpr int NW = G / 2 + 2;
  const index_t C = a.C, H = a.H, W = a.W, Hf = 2 * H, per_row = 2 * W / G;
  const index_t ox0 = (g % per_row) * G;
  index_t r = g / per_row;
  const index_t oy = r % Hf;
  r /= Hf;
  const index_t c = r % C, n = r / C;

  int64_t y0, y1;
  acc_t wy0, wy1;
  up2_taps<acc_t>(oy, H, y0, y1, wy0, wy1);
  const scalar_t* row0 = at4<const scalar_t>(a.coarse, n, c, static_cast<index_t>(y0), index_t(0));
  const scalar_t* row1 = at4<const scalar_t>(a.coarse, n, c, static_cast<index_t>(y1), index_t(0));
  const index_t csW = static_cast<index_t>(a.coarse.s[3]);
  const index_t base = ox0 / 2 - 1;
  acc_t r0[NW], r1[NW];
#pragma unroll
  for (int k = 0; k < NW; ++k) {
    const index_t x = clamp_idx<index_t>(base + k, W - 1);
    r0[k] = to_acc(row0[x * csW]);
    r1[k] = to_acc(row1[x * csW]);
  }

  acc_t f[G];
  load_pack<G>(at4<const scalar_t>(a.fine, n, c, oy, ox0), static_cast<index_t>(a.fine.s[3]),
               a.vec_fine, f);
  const index_t nc = n * C + c;
  const acc_t ca = a.sc.coarse_scale(alpha, nc), cb = a.sc.fine_scale(beta, nc);
  acc_t o[G];
#pragma unroll
  for (int e = 0; e < G; ++e) {
    int64_t x0, x1;  // only the weights are used; the slots below are these columns
    acc_t wx0, wx1;
    up2_taps<acc_t>(ox0 + e, W, x0, x1, wx0, wx1);
    const int k0 = (e + 1) / 2;  // a compile-time slot once the loop is unrolled
    acc_t a1 = r0[k0 + 1], b1 = r1[k0 + 1];
    if (e == 0 && ox0 == 0) {
      a1 = r0[2];
      b1 = r1[2];
    }
    const acc_t up = wy0 * (wx0 * r0[k0] + wx1 * a1) + wy1 * (wx0 * r1[k0] + wx1 * b1);
    o[e] = ca * up + cb * f[e];
  }
  store_pack<G>(at4<scalar_t>(a.out, n, c, oy, ox0), static_cast<index_t>(a.out.s[3]), a.vec_out,
                o);
}

// NHWC group g: channels c0 .. c0+G-1 of fine pixel (oy, ox) of sample n.
template <int G, typename scalar_t, typename index_t>
LITEFPN_HD void up2_fwd_nhwc_group(const Up2FwdArgs<scalar_t>& a, index_t g,
                                   acc_of<scalar_t> alpha, acc_of<scalar_t> beta) {
  using acc_t = acc_of<scalar_t>;
  const index_t C = a.C, H = a.H, W = a.W, Hf = 2 * H, Wf = 2 * W, CG = C / G;
  const index_t c0 = (g % CG) * G;
  index_t r = g / CG;
  const index_t ox = r % Wf;
  r /= Wf;
  const index_t oy = r % Hf, n = r / Hf;

  int64_t y0, y1, x0, x1;
  acc_t wy0, wy1, wx0, wx1;
  up2_taps<acc_t>(oy, H, y0, y1, wy0, wy1);
  up2_taps<acc_t>(ox, W, x0, x1, wx0, wx1);
  const index_t csC = static_cast<index_t>(a.coarse.s[1]);
  acc_t v00[G], v01[G], v10[G], v11[G], f[G];
  load_pack<G>(at4<const scalar_t>(a.coarse, n, c0, index_t(y0), index_t(x0)), csC, a.vec_coarse, v00);
  load_pack<G>(at4<const scalar_t>(a.coarse, n, c0, index_t(y0), index_t(x1)), csC, a.vec_coarse, v01);
  load_pack<G>(at4<const scalar_t>(a.coarse, n, c0, index_t(y1), index_t(x0)), csC, a.vec_coarse, v10);
  load_pack<G>(at4<const scalar_t>(a.coarse, n, c0, index_t(y1), index_t(x1)), csC, a.vec_coarse, v11);
  load_pack<G>(at4<const scalar_t>(a.fine, n, c0, oy, ox), static_cast<index_t>(a.fine.s[1]),
               a.vec_fine, f);
  const index_t nc0 = n * C + c0;
  acc_t o[G];
#pragma unroll
  for (int e = 0; e < G; ++e) {
    const acc_t up = wy0 * (wx0 * v00[e] + wx1 * v01[e]) + wy1 * (wx0 * v10[e] + wx1 * v11[e]);
    o[e] = a.sc.coarse_scale(alpha, nc0 + e) * up + a.sc.fine_scale(beta, nc0 + e) * f[e];
  }
  store_pack<G>(at4<scalar_t>(a.out, n, c0, oy, ox), static_cast<index_t>(a.out.s[1]), a.vec_out,
                o);
}

template <typename scalar_t, typename index_t, int G, bool NHWC>
__global__ void __launch_bounds__(kThreads)
    up2_fwd_kernel(const Up2FwdArgs<scalar_t> a, const int64_t groups) {
  acc_of<scalar_t> alpha, beta;
  a.sc.weights(alpha, beta);
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups;
       g += int64_t(gridDim.x) * blockDim.x) {
    if constexpr (NHWC) {
      up2_fwd_nhwc_group<G, scalar_t, index_t>(a, static_cast<index_t>(g), alpha, beta);
    } else {
      up2_fwd_plane_group<G, scalar_t, index_t>(a, static_cast<index_t>(g), alpha, beta);
    }
  }
}

// ----------------------------------------------------------------------------- ops
void check_common(const char* op, const Tensor& coarse, const Tensor& fine,
                  const std::optional<Tensor>& w_coarse, const std::optional<Tensor>& w_fine,
                  const std::optional<Tensor>& gate_coarse,
                  const std::optional<Tensor>& gate_fine) {
  check_up2_pair(op, "coarse", coarse, "fine", fine);
  check_fusion_params(op, coarse, coarse.size(0), coarse.size(1), w_coarse, w_fine, gate_coarse,
                      gate_fine);
}

// Path and group width of a forward; G elements per thread (16 bytes' worth where possible).
template <typename scalar_t>
struct Up2FwdPlan {
  Up2FwdArgs<scalar_t> a;
  bool nhwc = false;
  int G = 2;
  int64_t groups = 0;
};

template <typename scalar_t>
Up2FwdPlan<scalar_t> plan_up2_fwd(const Tensor& coarse, const Tensor& fine, const Tensor& out,
                                  const std::optional<Tensor>& w_coarse,
                                  const std::optional<Tensor>& w_fine,
                                  const std::optional<Tensor>& gate_coarse,
                                  const std::optional<Tensor>& gate_fine, double eps) {
  constexpr int V = 16 / sizeof(scalar_t);  // elements per 16-byte vector
  Up2FwdPlan<scalar_t> p;
  Up2FwdArgs<scalar_t>& a = p.a;
  a.N = coarse.size(0);
  a.C = coarse.size(1);
  a.H = coarse.size(2);
  a.W = coarse.size(3);
  a.coarse = view4(coarse);
  a.fine = view4(fine);
  a.out = view4(out);
  a.sc = make_scales<acc_of<scalar_t>>(w_coarse, w_fine, gate_coarse, gate_fine, eps);
  p.nhwc = a.C > 1 && out.stride(1) == 1 && a.C % V == 0;
  p.G = p.nhwc ? V : ((2 * a.W) % V == 0 ? V : 2);
  const int vdim = p.nhwc ? 1 : 3;
  a.vec_coarse = p.nhwc && vec_ok(coarse, vdim, p.G);  // the plane path reads coarse element-wise
  a.vec_fine = vec_ok(fine, vdim, p.G);
  a.vec_out = vec_ok(out, vdim, p.G);
  p.groups = out.numel() / p.G;
  return p;
}

Tensor up2_fuse_fwd_cuda(const Tensor& coarse, const Tensor& fine,
                         const std::optional<Tensor>& w_coarse,
                         const std::optional<Tensor>& w_fine,
                         const std::optional<Tensor>& gate_coarse,
                         const std::optional<Tensor>& gate_fine, double eps) {
  constexpr const char* op = "_up2_fuse_fwd";
  check_common(op, coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine);
  const c10::cuda::CUDAGuard guard(fine.device());
  Tensor out = at::empty_like(fine);
  if (out.numel() == 0) return out;
  const bool use64 = any_needs_int64({&coarse, &fine, &out});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fine.scalar_type(), op, [&] {
    const Up2FwdPlan<scalar_t> p =
        plan_up2_fwd<scalar_t>(coarse, fine, out, w_coarse, w_fine, gate_coarse, gate_fine, eps);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const unsigned int blocks = grid_for(p.groups, kThreads);
    dispatch_index(use64, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      constexpr int V = 16 / sizeof(scalar_t);
      if (p.nhwc) {
        up2_fwd_kernel<scalar_t, index_t, V, true><<<blocks, kThreads, 0, stream>>>(p.a, p.groups);
      } else if (p.G == V) {
        up2_fwd_kernel<scalar_t, index_t, V, false><<<blocks, kThreads, 0, stream>>>(p.a, p.groups);
      } else {
        up2_fwd_kernel<scalar_t, index_t, 2, false><<<blocks, kThreads, 0, stream>>>(p.a, p.groups);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> up2_fuse_bwd_cuda(
    const Tensor& grad_out, const Tensor& coarse, const Tensor& fine,
    const std::optional<Tensor>& w_coarse, const std::optional<Tensor>& w_fine,
    const std::optional<Tensor>& gate_coarse, const std::optional<Tensor>& gate_fine, double eps,
    bool need_sums) {
  constexpr const char* op = "_up2_fuse_bwd";
  check_common(op, coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine);
  check_device(op, "grad_out", grad_out, coarse);
  TORCH_CHECK(grad_out.sizes() == fine.sizes(), op, ": grad_out must have fine's shape ",
              fine.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == fine.scalar_type(), op,
              ": grad_out must have fine's dtype ", fine.scalar_type(), ", got ",
              grad_out.scalar_type());
  const c10::cuda::CUDAGuard guard(fine.device());
  const int64_t N = coarse.size(0), C = coarse.size(1);
  const std::vector<int64_t> sum_shape =
      need_sums ? std::vector<int64_t>{N, C} : std::vector<int64_t>{0};
  Up2BwdTensors t;
  t.grad_out = grad_out;
  t.coarse = coarse;
  t.fine = fine;
  t.grad_coarse = at::empty_like(coarse);
  t.grad_fine = at::empty_like(fine);
  t.sum_coarse = at::empty(sum_shape, fine.options().dtype(acc_scalar_type(fine.scalar_type())));
  t.sum_fine = at::empty_like(t.sum_coarse);
  t.w_coarse = w_coarse;
  t.w_fine = w_fine;
  t.gate_coarse = gate_coarse;
  t.gate_fine = gate_fine;
  t.eps = eps;
  t.need_sums = need_sums;
  if (fine.numel() == 0) {  // nothing to gather: zero gradients and sums
    t.grad_coarse.zero_();
    t.grad_fine.zero_();
    t.sum_coarse.zero_();
    t.sum_fine.zero_();
  } else {
    up2_bwd_launch</*WITH_FINE=*/true>(t);
  }
  return {t.grad_coarse, t.grad_fine, t.sum_coarse, t.sum_fine};
}

}  // namespace
}  // namespace gpu
}  // namespace litefpn

TORCH_LIBRARY_IMPL(litefpn, CUDA, m) {
  m.impl("_up2_fuse_fwd", &litefpn::gpu::up2_fuse_fwd_cuda);
  m.impl("_up2_fuse_bwd", &litefpn::gpu::up2_fuse_bwd_cuda);
}
