// Torch-side helpers shared by the CPU operators (up2_fuse.cpp, lateral_up2_fuse.cpp,
// bn_silu.cpp): the kernel-table dtype index, the accumulation dtype, the plain strided view the
// kernels take (TensorView4, common/tensor_view.h), the allocation of activation-sized outputs and the parallel loop with per-task scratch.
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

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/common/tensor_view.h"

namespace litefpn {
namespace cpu {

// Index into the kernel tables (StorageDType), -1 for an unsupported dtype.
inline int dtype_index(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return StorageDType::kF32;
    case at::kDouble: return StorageDType::kF64;
    case at::kHalf: return StorageDType::kF16;
    case at::kBFloat16: return StorageDType::kBF16;
    default: return -1;
  }
}

// float64 accumulates in float64, everything else in float32.
inline at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline TensorView4 view_of(const at::Tensor& t) {
  TensorView4 v;
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

// The memory format of an output that follows `t`: channels_last when t is channels_last (and
// not also contiguous, as for size-1 dims), else contiguous; the fake kernels in ops.py use the
// same rule (_empty_in_format).
inline at::MemoryFormat output_format_of(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous()
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// at::parallel_for over [0, units) in tasks of at least `grain` units; each task gets its own
// 64-byte aligned scratch of scratch_bytes: fn(begin, end, scratch).
template <typename F>
void parallel_with_scratch(int64_t units, int64_t grain, int64_t scratch_bytes, F&& fn) {
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    std::unique_ptr<char[]> raw(new char[scratch_bytes + 64]);
    void* p = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(raw.get()) + 63) &
                                      ~uintptr_t(63));
    fn(begin, end, p);
  });
}

}  // namespace cpu
}  // namespace litefpn
