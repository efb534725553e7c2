// csrc/cuda/bn_silu.cu's op bodies and kernels, built for the host emulation and registered as
// litefpn_emu::_bn_silu_{stats,fwd,bwd_sums,bwd} for CPU tensors. The schema strings are those
// of csrc/ops.cpp (tests/test_cuda_emulated_kernels.py checks that they stay equal).
#include <torch/library.h>

#include "cuda/bn_silu_kernels.cuh"

TORCH_LIBRARY_FRAGMENT(litefpn_emu, m) {
  m.def("_bn_silu_stats(Tensor x, Tensor center) -> (Tensor, Tensor)");
  m.def("_bn_silu_fwd(Tensor x, Tensor scale, Tensor shift) -> Tensor");
  m.def("_bn_silu_bwd_sums(Tensor grad_out, Tensor x, Tensor scale, Tensor shift, "
        "Tensor center) -> (Tensor, Tensor)");
  m.def("_bn_silu_bwd(Tensor grad_out, Tensor x, Tensor scale, Tensor shift, Tensor k_dz, "
        "Tensor k_x, Tensor k_0) -> Tensor");
}

TORCH_LIBRARY_IMPL(litefpn_emu, CPU, m) {
  m.impl("_bn_silu_stats", &litefpn::cuda::bn_silu_stats_cuda);
  m.impl("_bn_silu_fwd", &litefpn::cuda::bn_silu_fwd_cuda);
  m.impl("_bn_silu_bwd_sums", &litefpn::cuda::bn_silu_bwd_sums_cuda);
  m.impl("_bn_silu_bwd", &litefpn::cuda::bn_silu_bwd_cuda);
}
