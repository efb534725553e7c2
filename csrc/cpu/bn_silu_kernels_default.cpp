// bn_silu CPU kernels (bn_silu_impl.h, on the helpers of up2_fuse_impl.h) compiled for the
// build's baseline instruction set (exp: std::exp).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "bn_silu_kernels.h"
#include "litefpn_math.h"
#include "up2_fuse_kernels.h"

namespace litefpn {
namespace cpu {
namespace bn_isa_default {
#define LITEFPN_UP2_F16C 0
#define LITEFPN_UP2_ISA_NAME "default"
#define LITEFPN_UP2_HELPERS_ONLY 1
#include "up2_fuse_impl.h"
#include "bn_silu_impl.h"
#undef LITEFPN_UP2_HELPERS_ONLY
#undef LITEFPN_UP2_ISA_NAME
#undef LITEFPN_UP2_F16C
}  // namespace bn_isa_default

const BnSiluKernelTable* bn_silu_kernel_table_default() { return &bn_isa_default::kBnTable; }

}  // namespace cpu
}  // namespace litefpn
