// lateral_up2_fuse CPU kernels (lateral_impl.h, on the helpers of up2_fuse_impl.h) compiled for
// AVX-512 (F, BW, DQ, VL) on top of AVX2 + FMA + F16C: 64-byte vectors in the micro-kernel, the
// same tiles and summation order as the AVX2 build. lateral.cpp runs them only where
// cpu_isa() says AVX-512. Same arrangement as lateral_kernels_avx2.cpp.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "lateral_kernels.h"
#include "litefpn_math.h"
#include "up2_fuse_kernels.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(                                                       \
    __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
#endif

namespace litefpn {
namespace cpu {
namespace lat_isa_avx512 {
#define LITEFPN_UP2_F16C 1
#define LITEFPN_UP2_ISA_NAME "avx512"
#define LITEFPN_LAT_AVX512 1
#define LITEFPN_UP2_HELPERS_ONLY 1
#include "up2_fuse_impl.h"
#include "lateral_impl.h"
#undef LITEFPN_UP2_HELPERS_ONLY
#undef LITEFPN_LAT_AVX512
#undef LITEFPN_UP2_ISA_NAME
#undef LITEFPN_UP2_F16C
}  // namespace lat_isa_avx512
}  // namespace cpu
}  // namespace litefpn

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace litefpn {
namespace cpu {
const LatKernelTable* lat_kernel_table_avx512() { return &lat_isa_avx512::kLatTable; }
}  // namespace cpu
}  // namespace litefpn

#else  // not x86 with GCC/Clang: no AVX-512 variant

namespace litefpn {
namespace cpu {
const LatKernelTable* lat_kernel_table_avx512() { return nullptr; }
}  // namespace cpu
}  // namespace litefpn

#endif
