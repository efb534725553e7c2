// Every CPU kernel family compiled for AVX2 + FMA + F16C, whatever the build's baseline; the
// operators run these kernels only on CPUs that report these features (cpu_isa() >= avx2, cpuid
// + xgetbv). Every header is #included BEFORE the target pragma (kernel_headers.h), and the
// kernels are static or in the namespace isa_avx2.
#define LITEFPN_ISA_NAME "avx2"
#define LITEFPN_ISA_AVX2 1
#define LITEFPN_ISA_AVX512 0
#include "cpu/isa/kernel_headers.h"

namespace litefpn {
namespace cpu {

#if LITEFPN_X86_TARGETS
LITEFPN_ISA_TARGET_PUSH("avx2,fma,f16c")
namespace isa_avx2 {
#include "cpu/common/row_io.h"
#include "cpu/up2_fuse_impl.h"
#include "cpu/lateral_up2_fuse_impl.h"
#include "cpu/bn_silu_impl.h"
}  // namespace isa_avx2
LITEFPN_ISA_TARGET_POP()

const IsaKernelTables* isa_tables_avx2() {
  static const IsaKernelTables t = {LITEFPN_ISA_NAME, &isa_avx2::kTable, &isa_avx2::kLatTable,
                                    &isa_avx2::kBnTable};
  return &t;
}
#endif  // LITEFPN_X86_TARGETS

}  // namespace cpu
}  // namespace litefpn
