// The CPU feature checks and the LITEFPN_CPU_ISA cap behind cpu_isa() (cpu_isa.h).
#include "cpu/common/cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define LITEFPN_X86 1
#else
#define LITEFPN_X86 0
#endif

namespace litefpn {
namespace cpu {
namespace {

// The widest variant this CPU can run.
CpuIsa cpu_supported_isa() {
#if LITEFPN_X86
  unsigned int eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return CpuIsa::kDefault;
  const bool fma = ecx & (1u << 12), osxsave = ecx & (1u << 27), avx = ecx & (1u << 28),
             f16c = ecx & (1u << 29);
  if (!(fma && osxsave && avx && f16c)) return CpuIsa::kDefault;
  // The OS must save the YMM state (XCR0 bits 1, 2) and, for AVX-512, the opmask and ZMM state
  // (bits 5, 6, 7).
  unsigned int xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & 0x6u) != 0x6u) return CpuIsa::kDefault;
  if (__get_cpuid_max(0, nullptr) < 7) return CpuIsa::kDefault;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  if ((ebx & (1u << 5)) == 0) return CpuIsa::kDefault;  // AVX2
  const unsigned int f = 1u << 16, dq = 1u << 17, bw = 1u << 30, vl = 1u << 31;
  const bool avx512 = (ebx & (f | dq | bw | vl)) == (f | dq | bw | vl);
  if (avx512 && (xcr0_lo & 0xE0u) == 0xE0u) return CpuIsa::kAvx512;
  return CpuIsa::kAvx2;
#else
  return CpuIsa::kDefault;
#endif
}

CpuIsa env_isa_cap() {
  const char* env = std::getenv("LITEFPN_CPU_ISA");
  if (env == nullptr || env[0] == '\0') return CpuIsa::kAvx512;
  for (CpuIsa isa : {CpuIsa::kDefault, CpuIsa::kAvx2, CpuIsa::kAvx512})
    if (std::strcmp(env, cpu_isa_name(isa)) == 0) return isa;
  TORCH_CHECK(false, "LITEFPN_CPU_ISA must be \"default\", \"avx2\" or \"avx512\" (or unset), ",
              "got \"", env, "\"");
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "default";
  }
}

CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    const CpuIsa cap = env_isa_cap(), supported = cpu_supported_isa();
    return cap < supported ? cap : supported;
  }();
  return isa;
}

}  // namespace cpu
}  // namespace litefpn
