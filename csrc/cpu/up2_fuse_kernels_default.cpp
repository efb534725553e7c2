// up2_fuse CPU kernels (up2_fuse_impl.h) compiled for the build's baseline instruction set.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "litefpn_math.h"
#include "up2_fuse_kernels.h"

namespace litefpn {
namespace cpu {
namespace isa_default {
#define LITEFPN_UP2_F16C 0
#define LITEFPN_UP2_ISA_NAME "default"
#include "up2_fuse_impl.h"
#undef LITEFPN_UP2_ISA_NAME
#undef LITEFPN_UP2_F16C
}  // namespace isa_default

const Up2KernelTable* up2_kernel_table_default() { return &isa_default::kTable; }

}  // namespace cpu
}  // namespace litefpn
