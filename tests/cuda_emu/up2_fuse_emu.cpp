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
