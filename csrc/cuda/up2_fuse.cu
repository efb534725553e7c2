// litefpn::_up2_fuse_{fwd,bwd,bwd_coarse} on CUDA (schemas: csrc/ops.cpp). The kernels, plans and
// op bodies are in up2_fuse_kernels.cuh, which the host emulation (tests/cuda_emu) compiles too.
#include <torch/library.h>

#include "cuda/up2_fuse_kernels.cuh"

TORCH_LIBRARY_IMPL(litefpn, CUDA, m) {
  m.impl("_up2_fuse_fwd", &litefpn::cuda::up2_fuse_fwd_cuda);
  m.impl("_up2_fuse_bwd", &litefpn::cuda::up2_fuse_bwd_cuda);
  m.impl("_up2_fuse_bwd_coarse", &litefpn::cuda::up2_fuse_bwd_coarse_cuda);
}
