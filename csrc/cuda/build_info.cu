// litefpn::_cuda_archs() -> int[]: the GPU architectures this build carries code for, as compute
// capabilities times ten (e.g. [80, 90]), from nvcc's own __CUDA_ARCH_LIST__ (every -gencode
// target's virtual arch). The Python package checks at import that the current GPU is covered
// (its capability is listed, or it is newer than the highest one, whose PTX setup.py embeds by
// default). The schema lives here, not in csrc/ops.cpp, because it exists only in CUDA builds.
#include <torch/library.h>

#include <cstdint>
#include <vector>

#if !defined(__CUDA_ARCH_LIST__)
#error "nvcc >= 11.5 defines __CUDA_ARCH_LIST__; an older nvcc cannot report the compiled archs"
#endif

namespace {
std::vector<int64_t> cuda_archs() {
  std::vector<int64_t> archs{__CUDA_ARCH_LIST__};  // 800, 900, ...
  for (int64_t& a : archs) a /= 10;
  return archs;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(litefpn, m) {
  m.def("_cuda_archs() -> int[]", &cuda_archs);
}
