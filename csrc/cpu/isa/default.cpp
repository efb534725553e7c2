// Every CPU kernel family compiled for the build's baseline instruction set (no target pragma;
// exp: std::exp; the micro-kernel of lateral_up2_fuse multiplies and adds plain vectors).
#define LITEFPN_ISA_NAME "default"
#define LITEFPN_ISA_AVX2 0
#define LITEFPN_ISA_AVX512 0
#include "cpu/isa/kernel_headers.h"

namespace litefpn {
namespace cpu {
namespace isa_default {
#include "cpu/common/row_io.h"
#include "cpu/up2_fuse_impl.h"
#include "cpu/lateral_up2_fuse_impl.h"
#include "cpu/bn_silu_impl.h"
}  // namespace isa_default

const IsaKernelTables* isa_tables_default() {
  static const IsaKernelTables t = {LITEFPN_ISA_NAME, &isa_default::kTable,
                                    &isa_default::kLatTable, &isa_default::kBnTable};
  return &t;
}

#if !LITEFPN_X86_TARGETS  // isa/avx2.cpp and isa/avx512.cpp compile to nothing: no such variants
const IsaKernelTables* isa_tables_avx2() { return nullptr; }
const IsaKernelTables* isa_tables_avx512() { return nullptr; }
#endif

}  // namespace cpu
}  // namespace litefpn
