// Which compiled variant of the CPU kernels runs: every kernel family (up2_fuse,
// lateral_up2_fuse, bn_silu) is compiled once per instruction set into a table of function
// pointers (one translation unit per instruction set: csrc/cpu/isa/<isa>.cpp), and each operator
// file picks its table once with pick_kernel_table (cpu/isa/kernel_tables.h).
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

}  // namespace cpu
}  // namespace litefpn
