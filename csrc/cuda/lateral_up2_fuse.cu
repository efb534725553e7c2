// litefpn::_lateral_{gram,up2_fuse_fwd,grad_z} on CUDA (schemas: csrc/ops.cpp). The kernels, plans
// and op bodies are in lateral_up2_fuse_kernels.cuh, which the host emulation (tests/cuda_emu)
// compiles too.
#include <torch/library.h>

#include "cuda/lateral_up2_fuse_kernels.cuh"

TORCH_LIBRARY_IMPL(litefpn, CUDA, m) {
  m.impl("_lateral_gram", &litefpn::cuda::lateral_gram_cuda);
  m.impl("_lateral_up2_fuse_fwd", &litefpn::cuda::lateral_up2_fuse_fwd_cuda);
  m.impl("_lateral_grad_z", &litefpn::cuda::lateral_grad_z_cuda);
}
