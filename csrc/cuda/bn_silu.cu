// litefpn::_bn_silu_{stats,fwd,bwd_sums,bwd} on CUDA (schemas: csrc/ops.cpp). The kernels, plans
// and op bodies are in bn_silu_kernels.cuh, which the host emulation (tests/cuda_emu) compiles
// too.
#include <torch/library.h>

#include "cuda/bn_silu_kernels.cuh"

TORCH_LIBRARY_IMPL(litefpn, CUDA, m) {
  m.impl("_bn_silu_stats", &litefpn::cuda::bn_silu_stats_cuda);
  m.impl("_bn_silu_fwd", &litefpn::cuda::bn_silu_fwd_cuda);
  m.impl("_bn_silu_bwd_sums", &litefpn::cuda::bn_silu_bwd_sums_cuda);
  m.impl("_bn_silu_bwd", &litefpn::cuda::bn_silu_bwd_cuda);
}
