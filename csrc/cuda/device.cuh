// What differs between the GPU build (nvcc) and the host emulation of the same device code
// (tests/cuda_emu, built with -DLITEFPN_CUDA_EMU): the launch, the device type and guard, and the
// __shared__ declaration. Everything else in csrc/cuda (kernels, plans, checks, allocation) is
// compiled unchanged by both.
//
//   launch<kernel<...>>(blocks, threads, args...)  one 1-D launch on the current stream, checked
//   LITEFPN_SHARED(name, type)                      a __shared__ variable of `type` (arrays too)
//   DeviceGuard, on_device(t), kDeviceName          device guard and device-type check
//   force_int64()                                   false here; a test switch in the emulation
//   store_word(p, w)                                one aligned 4/8/16-byte global store
#pragma once

#include <ATen/core/Tensor.h>

#if defined(LITEFPN_CUDA_EMU)
#include "cuda_emu/runtime.h"  // tests/cuda_emu: dim3, threadIdx, __syncthreads, shuffles, launch

namespace litefpn {
namespace cuda {
using ::litefpn::emu::DeviceGuard;
using ::litefpn::emu::force_int64;
using ::litefpn::emu::launch;
using ::litefpn::emu::on_device;
template <typename W>
inline void store_word(W* p, const W& w) {
  *p = w;
}
inline constexpr const char* kDeviceName = ::litefpn::emu::kDeviceName;
}  // namespace cuda
}  // namespace litefpn

#else  // nvcc
#if !defined(__CUDACC__)
#error "csrc/cuda is compiled by nvcc (or by the host emulation with -DLITEFPN_CUDA_EMU)"
#endif
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

// `type` may contain commas (template arguments); arrays are spelled `T[N]`.
#define LITEFPN_SHARED(name, ...)          \
  using name##_smem_t = __VA_ARGS__;       \
  __shared__ name##_smem_t name

namespace litefpn {
namespace cuda {
namespace {
constexpr const char* kDeviceName = "CUDA";
using DeviceGuard = c10::cuda::CUDAGuard;
inline bool on_device(const at::Tensor& t) { return t.is_cuda(); }
constexpr bool force_int64() { return false; }

// A 16/8-byte store as one vector instruction: nvcc's st.global.wb.v4/v2 intrinsics (inline
// PTX), since a plain `*p = w` of a uint4 is split into 4-byte stores when the address is
// 64-bit index arithmetic (audit F5). Other words: a plain store.
template <typename W>
__device__ __forceinline__ void store_word(W* p, const W& w) {
  *p = w;
}
__device__ __forceinline__ void store_word(uint4* p, const uint4& w) { __stwb(p, w); }
__device__ __forceinline__ void store_word(uint2* p, const uint2& w) { __stwb(p, w); }

template <auto Kernel, typename... Args>
void launch(unsigned int blocks, int threads, const Args&... args) {
  Kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
}  // namespace
}  // namespace cuda
}  // namespace litefpn
#endif
