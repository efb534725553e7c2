// Every CPU kernel family that has an AVX-512 variant compiled for AVX-512 (F, BW, DQ, VL) on
// top of AVX2 + FMA + F16C; the operators run these kernels only where cpu_isa() says AVX-512.
// lateral_up2_fuse: 64-byte vectors in the micro-kernel, the same tiles and summation order as
// the AVX2 build; bn_silu: 16-float vectors in the elementwise passes and the lane-wise sums, the
// same operations and order as the AVX2 build. up2_fuse has no AVX-512 variant (its table here
// is nullptr, and its AVX2 variant runs on AVX-512 CPUs). Same arrangement as avx2.cpp.
#define LITEFPN_ISA_NAME "avx512"
#define LITEFPN_ISA_AVX2 1
#define LITEFPN_ISA_AVX512 1
#include "cpu/isa/kernel_headers.h"

namespace litefpn {
namespace cpu {

#if LITEFPN_X86_TARGETS
LITEFPN_ISA_TARGET_PUSH("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
namespace isa_avx512 {
#include "cpu/common/row_io.h"
#include "cpu/lateral_up2_fuse_impl.h"
#include "cpu/bn_silu_impl.h"
}  // namespace isa_avx512
LITEFPN_ISA_TARGET_POP()

const IsaKernelTables* isa_tables_avx512() {
  static const IsaKernelTables t = {LITEFPN_ISA_NAME, nullptr, &isa_avx512::kLatTable,
                                    &isa_avx512::kBnTable};
  return &t;
}
#endif  // LITEFPN_X86_TARGETS

}  // namespace cpu
}  // namespace litefpn
