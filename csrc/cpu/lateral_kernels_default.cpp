// lateral_up2_fuse CPU kernels (lateral_impl.h) compiled for the build's baseline instruction set.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "lateral_kernels.h"
#include "litefpn_math.h"
#include "up2_fuse_kernels.h"

namespace litefpn {
namespace cpu {
namespace lat_isa_default {
#define LITEFPN_UP2_F16C 0
#define LITEFPN_UP2_ISA_NAME "default"
#define LITEFPN_UP2_HELPERS_ONLY 1
#include "up2_fuse_impl.h"
#include "lateral_impl.h"
#undef LITEFPN_UP2_HELPERS_ONLY
#undef LITEFPN_UP2_ISA_NAME
#undef LITEFPN_UP2_F16C
}  // namespace lat_isa_default

const LatKernelTable* lat_kernel_table_default() { return &lat_isa_default::kLatTable; }

}  // namespace cpu
}  // namespace litefpn
