// csrc/cuda/up2_fuse.cu's op bodies and kernels, built for the host emulation and registered as
// litefpn_emu::_up2_fuse_{fwd,bwd,bwd_coarse} for CPU tensors. The schema strings are those of
// csrc/ops.cpp (tests/test_cuda_emulated_kernels.py checks that they stay equal).
#include <torch/library.h>

#include "cuda/up2_fuse_kernels.cuh"

TORCH_LIBRARY_FRAGMENT(litefpn_emu, m) {
  m.def("_up2_fuse_fwd(Tensor coarse, Tensor fine, Tensor? w_coarse, Tensor? w_fine, "
        "Tensor? gate_coarse, Tensor? gate_fine, float eps) -> Tensor");
  m.def("_up2_fuse_bwd(Tensor grad_out, Tensor coarse, Tensor fine, Tensor? w_coarse, "
        "Tensor? w_fine, Tensor? gate_coarse, Tensor? gate_fine, float eps, bool need_sums) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("_up2_fuse_bwd_coarse(Tensor grad_out, Tensor coarse, Tensor? w_coarse, Tensor? w_fine, "
        "Tensor? gate_coarse, float eps, bool need_sum) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(litefpn_emu, CPU, m) {
  m.impl("_up2_fuse_fwd", &litefpn::cuda::up2_fuse_fwd_cuda);
  m.impl("_up2_fuse_bwd", &litefpn::cuda::up2_fuse_bwd_cuda);
  m.impl("_up2_fuse_bwd_coarse", &litefpn::cuda::up2_fuse_bwd_coarse_cuda);
}

// Test hooks: the launch plan the op bodies compute for these tensors (the same plan functions,
// with the outputs allocated as the ops allocate them), so tests can check which vector and
// layout paths a case takes.
namespace {
using at::Tensor;

// -> [nhwc, G, vec_coarse, vec_fine, vec_out]
std::vector<int64_t> up2_fwd_plan(const Tensor& coarse, const Tensor& fine) {
  using namespace litefpn::cuda;
  const Tensor out = at::empty_like(fine);
  std::vector<int64_t> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fine.scalar_type(), "plan", [&] {
    const auto p = plan_up2_fwd<scalar_t>(coarse, fine, out, std::nullopt, std::nullopt,
                                          std::nullopt, std::nullopt, 0.0);
    r = {p.nhwc, p.G, p.a.vec_coarse, p.a.vec_fine, p.a.vec_out};
  });
  return r;
}

// -> [nhwc, GC, vec_g, vec_coarse, vec_gc, vec_fine, vec_gf, nchunks]; fine None: bwd_coarse.
std::vector<int64_t> up2_bwd_plan(const Tensor& grad_out, const Tensor& coarse,
                                  const std::optional<Tensor>& fine) {
  using namespace litefpn::cuda;
  Up2BwdTensors t;
  t.grad_out = grad_out;
  t.coarse = coarse;
  t.grad_coarse = at::empty_like(coarse);
  if (fine.has_value()) {
    t.fine = *fine;
    t.grad_fine = at::empty_like(*fine);
  }
  std::vector<int64_t> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, coarse.scalar_type(), "plan", [&] {
    const auto p = fine.has_value() ? plan_up2_bwd<scalar_t, true>(t)
                                    : plan_up2_bwd<scalar_t, false>(t);
    r = {p.nhwc, p.GC, p.a.vec_g, p.a.vec_coarse, p.a.vec_gc, p.a.vec_fine, p.a.vec_gf,
         p.a.nchunks};
  });
  return r;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(litefpn_emu, m) {
  m.def("_up2_fwd_plan(Tensor coarse, Tensor fine) -> int[]", &up2_fwd_plan);
  m.def("_up2_bwd_plan(Tensor grad_out, Tensor coarse, Tensor? fine) -> int[]", &up2_bwd_plan);
}
