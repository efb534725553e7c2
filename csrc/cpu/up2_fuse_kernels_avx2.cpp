// up2_fuse CPU kernels (up2_fuse_impl.h) compiled for AVX2 + FMA + F16C, whatever the build's
// baseline; up2_fuse.cpp runs them only on CPUs that report these features (cpuid + xgetbv).
//
// Everything is #included BEFORE the target pragma, so inline code from those headers (c10,
// litefpn_math.h) stays baseline code; only the kernels of up2_fuse_impl.h, which are static or
// in the namespace isa_avx2, are compiled for AVX2. No AVX2 copy of a shared inline function can
// be picked by the linker for a caller on another CPU.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "litefpn_math.h"
#include "up2_fuse_kernels.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace litefpn {
namespace cpu {
namespace isa_avx2 {
#define LITEFPN_UP2_F16C 1
#define LITEFPN_UP2_ISA_NAME "avx2"
#include "up2_fuse_impl.h"
#undef LITEFPN_UP2_ISA_NAME
#undef LITEFPN_UP2_F16C
}  // namespace isa_avx2
}  // namespace cpu
}  // namespace litefpn

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace litefpn {
namespace cpu {
const Up2KernelTable* up2_kernel_table_avx2() { return &isa_avx2::kTable; }
}  // namespace cpu
}  // namespace litefpn

#else  // not x86 with GCC/Clang: no AVX2 variant

namespace litefpn {
namespace cpu {
const Up2KernelTable* up2_kernel_table_avx2() { return nullptr; }
}  // namespace cpu
}  // namespace litefpn

#endif
