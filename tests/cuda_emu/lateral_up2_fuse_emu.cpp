// csrc/cuda/lateral_up2_fuse.cu's op bodies and kernels, built for the host emulation and
// registered as litefpn_emu::_lateral_{gram,up2_fuse_fwd,grad_z} for CPU tensors. The schema
// strings are those of csrc/ops.cpp (tests/test_cuda_emulated_kernels.py checks that).
#include <torch/library.h>

#include "cuda/lateral_up2_fuse_kernels.cuh"

TORCH_LIBRARY_FRAGMENT(litefpn_emu, m) {
  m.def("_lateral_gram(Tensor a, Tensor b, Tensor? a_center, Tensor? b_center) "
        "-> (Tensor, Tensor)");
  m.def("_lateral_up2_fuse_fwd(Tensor coarse, Tensor z, Tensor weight, Tensor bias, "
        "Tensor? w_coarse, Tensor? w_fine, Tensor? gate_coarse, Tensor? gate_fine, float eps) "
        "-> Tensor");
  m.def("_lateral_grad_z(Tensor grad_out, Tensor z, Tensor weight, Tensor? scale, Tensor? quad, "
        "Tensor? shift) -> Tensor");
}

TORCH_LIBRARY_IMPL(litefpn_emu, CPU, m) {
  m.impl("_lateral_gram", &litefpn::cuda::lateral_gram_cuda);
  m.impl("_lateral_up2_fuse_fwd", &litefpn::cuda::lateral_up2_fuse_fwd_cuda);
  m.impl("_lateral_grad_z", &litefpn::cuda::lateral_grad_z_cuda);
}
