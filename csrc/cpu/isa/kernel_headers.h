// Everything the per-ISA kernel code (common/row_io.h, <op>_impl.h) needs from outside, for
// csrc/cpu/isa/<isa>.cpp to include BEFORE its target pragma: inline code from these headers
// (the standard library, c10, litefpn_math.h) then stays baseline code, and no AVX2 / AVX-512
// copy of a shared inline function can be picked by the linker for a caller on another CPU.
// Also the LITEFPN_ISA_TARGET_PUSH / POP pair that brackets the per-ISA code.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/bn_silu_kernels.h"
#include "cpu/common/tensor_view.h"
#include "cpu/isa/kernel_tables.h"
#include "cpu/lateral_up2_fuse_kernels.h"
#include "cpu/up2_fuse_kernels.h"
#include "litefpn_math.h"

// LITEFPN_X86_TARGETS: x86 with GCC or Clang, where the avx2 / avx512 variants are compiled
// (with the target pragma below); elsewhere isa/avx2.cpp and isa/avx512.cpp compile to nothing
// and isa/default.cpp defines their table getters as nullptr.
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define LITEFPN_X86_TARGETS 1
#include <immintrin.h>
#else
#define LITEFPN_X86_TARGETS 0
#endif

// LITEFPN_ISA_TARGET_PUSH("avx2,fma,f16c") ... LITEFPN_ISA_TARGET_POP(): every function defined
// in between is compiled for that target, whatever the build's baseline.
#define LITEFPN_PRAGMA_STR_(x) _Pragma(#x)
#define LITEFPN_PRAGMA_(x) LITEFPN_PRAGMA_STR_(x)
#if defined(__clang__)
#define LITEFPN_ISA_TARGET_PUSH(features) \
  LITEFPN_PRAGMA_(clang attribute push(__attribute__((target(features))), apply_to = function))
#define LITEFPN_ISA_TARGET_POP() _Pragma("clang attribute pop")
#else
#define LITEFPN_ISA_TARGET_PUSH(features) \
  _Pragma("GCC push_options") LITEFPN_PRAGMA_(GCC target(features))
#define LITEFPN_ISA_TARGET_POP() _Pragma("GCC pop_options")
#endif
