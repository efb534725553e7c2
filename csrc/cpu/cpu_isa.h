// Which compiled variant of the CPU kernels runs: every kernel family (up2_fuse, lateral,
// bn_silu) is compiled once per instruction set into a table of function pointers
// (*_kernels_<isa>.cpp), and each operator file picks its table once with pick_isa_table.
#pragma once

namespace litefpn {
namespace cpu {

enum class CpuIsa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest instruction set both this CPU (cpuid, and xgetbv for the OS's register saving)
// and the environment variable LITEFPN_CPU_ISA allow. LITEFPN_CPU_ISA caps it: "default" (the
// build's baseline), "avx2" (AVX2 + FMA + F16C) or "avx512" (AVX-512 F/BW/DQ/VL on top); unset
// or empty: no cap. Any other value is an error. Decided once per process.
CpuIsa cpu_isa();
const char* cpu_isa_name(CpuIsa isa);

// The table of the widest variant at most cpu_isa(); a variant that is not compiled in (non-x86
// builds, or a family without one) is nullptr and is skipped.
template <typename Table>
const Table* pick_isa_table(const Table* dflt, const Table* avx2, const Table* avx512) {
  const CpuIsa isa = cpu_isa();
  if (avx512 != nullptr && isa >= CpuIsa::kAvx512) return avx512;
  if (avx2 != nullptr && isa >= CpuIsa::kAvx2) return avx2;
  return dflt;
}

}  // namespace cpu
}  // namespace litefpn
