// The kernel tables of every CPU kernel family, one set per instruction set, and the pick of one
// table per family for this process.
//
// Each instruction set is one translation unit, csrc/cpu/isa/<isa>.cpp (the idea of ATen's
// CPU_CAPABILITY and of torchao's per-ISA *_krnl.cpp builds): it compiles row_io.h and every
// <op>_impl.h for that instruction set and hands out their tables with isa_tables_<isa>(). The
// operator files (<op>.cpp) never see those translation units, only pick_kernel_table.
#pragma once

#include "cpu/common/cpu_isa.h"

namespace litefpn {
namespace cpu {

struct Up2KernelTable;     // up2_fuse_kernels.h
struct LatKernelTable;     // lateral_up2_fuse_kernels.h
struct BnSiluKernelTable;  // bn_silu_kernels.h

// One instruction set's tables; a family without a variant for it has nullptr (up2_fuse has no
// AVX-512 variant: its AVX2 one runs there).
struct IsaKernelTables {
  const char* isa;
  const Up2KernelTable* up2_fuse;
  const LatKernelTable* lateral_up2_fuse;
  const BnSiluKernelTable* bn_silu;
};

const IsaKernelTables* isa_tables_default();
// nullptr where the variant is not compiled (non-x86 builds, or compilers other than GCC/Clang).
const IsaKernelTables* isa_tables_avx2();
const IsaKernelTables* isa_tables_avx512();

// The table of one family (e.g. &IsaKernelTables::bn_silu) of the widest variant at most
// cpu_isa(); a variant that is not compiled in, or that lacks this family, is skipped.
template <typename Table>
const Table* pick_kernel_table(const Table* IsaKernelTables::*family) {
  const CpuIsa isa = cpu_isa();
  const IsaKernelTables* avx512 = isa_tables_avx512();
  const IsaKernelTables* avx2 = isa_tables_avx2();
  if (isa >= CpuIsa::kAvx512 && avx512 != nullptr && avx512->*family != nullptr)
    return avx512->*family;
  if (isa >= CpuIsa::kAvx2 && avx2 != nullptr && avx2->*family != nullptr) return avx2->*family;
  return isa_tables_default()->*family;
}

}  // namespace cpu
}  // namespace litefpn
