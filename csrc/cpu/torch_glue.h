// Torch-side helpers shared by the CPU operators (up2_fuse.cpp, lateral.cpp, bn_silu.cpp): the
// kernel-table dtype index, the accumulation dtype, the plain strided view the kernels take, and
// the allocation of activation-sized outputs.
//
// Outputs (out, grad_coarse, grad_fine, grad_z, ...): at::empty / at::empty_like, then, for large
// ones, a transparent-huge-page hint.
//
// Why: a fresh multi-MB tensor from the CPU allocator is untouched mmap'd memory, and the first
// write of each 4 KiB page is a page fault. For a 32 MiB output that is ~8k faults, which
// measured here cost several times the kernel's own arithmetic (fill_ of a fresh [8,128,64,128]
// fp32 tensor: ~10 ms, of an existing one: ~1 ms). madvise(MADV_HUGEPAGE) on the 2 MiB-aligned
// interior before the first touch lets the kernel fault 2 MiB pages instead (~3 ms). This is
// what PyTorch's own THP_MEM_ALLOC_ENABLE=1 does for every allocation; here it is applied only
// to outputs these kernels are about to write in full. It is advice only: where THP is off
// ("never") or madvise fails, nothing changes. LITEFPN_CPU_HUGEPAGES=0 disables it.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "up2_fuse_kernels.h"

namespace litefpn {
namespace cpu {

// Index into the kernel tables (Up2DType), -1 for an unsupported dtype.
inline int dtype_index(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kUp2F32;
    case at::kDouble: return kUp2F64;
    case at::kHalf: return kUp2F16;
    case at::kBFloat16: return kUp2BF16;
    default: return -1;
  }
}

// float64 accumulates in float64, everything else in float32.
inline at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline Up2View view_of(const at::Tensor& t) {
  Up2View v;
  v.data = const_cast<void*>(t.const_data_ptr());
  for (int d = 0; d < 4; ++d) v.s[d] = t.stride(d);
  return v;
}

inline bool huge_page_hint_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("LITEFPN_CPU_HUGEPAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

// Advise the 2 MiB pages lying wholly inside t's storage onto transparent huge pages.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  constexpr size_t kMinBytes = size_t(4) << 20;  // smaller outputs: a few faults, not worth it
  if (!huge_page_hint_enabled() || !t.defined() || !t.device().is_cpu()) return;
  const size_t nbytes = t.storage().nbytes();
  if (nbytes < kMinBytes) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.storage().data());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (begin + nbytes) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                               at::MemoryFormat format) {
  at::Tensor t = at::empty(sizes, options, format);
  advise_huge_pages(t);
  return t;
}

inline at::Tensor empty_output_like(const at::Tensor& like) {
  at::Tensor t = at::empty_like(like);
  advise_huge_pages(t);
  return t;
}

}  // namespace cpu
}  // namespace litefpn
