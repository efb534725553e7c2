// Host emulation of the CUDA execution model, for running csrc/cuda's device code unchanged on a
// CPU (test infrastructure, included through csrc/cuda/device.cuh when LITEFPN_CUDA_EMU is set).
//
// A launch runs its blocks one after another; a block is blockDim.x real std::threads (a pool
// reused across launches), so __syncthreads() is a real barrier, and data races on __shared__
// between barriers are races ThreadSanitizer can see. Per block:
//   * __shared__ variables (LITEFPN_SHARED) are fresh, exact-size heap allocations filled with
//     0xff bytes (NaN for floats), so a read of shared data no thread wrote shows up in the
//     results and AddressSanitizer sees any access past the end;
//   * warp shuffles exchange values through per-warp slots between two per-warp barriers, so all
//     32 lanes must take part, as with a full mask on the GPU;
//   * a thread that returns from the kernel leaves the block's barriers (arrive_and_drop), as an
//     exited GPU thread no longer holds up __syncthreads.
// Every launch is logged by kernel instantiation and grid size, so tests can check which paths
// ran; force_int64() makes every op take its 64-bit index kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// __restrict__ is a GNU keyword already; `#pragma unroll` is ignored by g++.

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;
// CUDA's 8- and 16-byte vector types (common.cuh PackWord): same size and alignment.
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};

// The built-in variables: per thread, set by the launcher.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace litefpn {
namespace emu {

inline constexpr const char* kDeviceName = "CPU (emulated CUDA)";

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
inline bool on_device(const at::Tensor& t) { return t.is_cpu(); }

bool force_int64();
void set_force_int64(bool on);

// Launch log: "<kernel instantiation>@<blocks>", in launch order; taken (and cleared) by tests.
std::vector<std::string> take_launch_log();

// Block-level primitives of the calling thread's block.
void sync_block();
void* block_shared(const void* site, std::size_t bytes, std::size_t align);
void warp_exchange(const void* in, void* out, std::size_t bytes, int src_lane, bool take);

// Runs body() as every thread of every block of a 1-D grid, recording `name`.
void run_grid(std::string_view name, unsigned int blocks, int threads, void (*body)(const void*),
              const void* ctx);

template <auto Kernel>
std::string_view kernel_name() {
  // "... [with auto Kernel = <instantiation>; ...]" (GCC, Clang): the instantiation alone.
  std::string_view s = __PRETTY_FUNCTION__;
  const auto b = s.find("Kernel = ");
  if (b == std::string_view::npos) return s;
  s.remove_prefix(b + 9);
  return s.substr(0, s.find_first_of(";]"));
}

template <auto Kernel, typename... Args>
void launch(unsigned int blocks, int threads, const Args&... args) {
  struct Ctx {
    const std::tuple<const Args&...> args;
  } ctx{std::tie(args...)};
  run_grid(kernel_name<Kernel>(), blocks, threads,
           [](const void* c) {
             // each thread gets its own copy of the arguments, as kernel parameters are
             std::apply([](const Args&... a) { Kernel(a...); }, static_cast<const Ctx*>(c)->args);
           },
           &ctx);
}

template <typename T>
T& shared_var(const void* site) {
  return *static_cast<T*>(block_shared(site, sizeof(T), alignof(T)));
}

}  // namespace emu
}  // namespace litefpn

#define LITEFPN_SHARED(name, ...)                         \
  using name##_smem_t = __VA_ARGS__;                      \
  static const char name##_smem_site = 0;                 \
  name##_smem_t& name = ::litefpn::emu::shared_var<name##_smem_t>(&name##_smem_site)

inline void __syncthreads() { ::litefpn::emu::sync_block(); }

// Full-warp shuffles (width 32): lane l reads lane src; out-of-range sources keep their own value.
template <typename T>
T __shfl_down_sync(unsigned int /*mask*/, T v, unsigned int delta, int width = 32) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int src = lane + static_cast<int>(delta);
  T out = v;
  ::litefpn::emu::warp_exchange(&v, &out, sizeof(T), src, (lane % width) + static_cast<int>(delta) < width);
  return out;
}

template <typename T>
T __shfl_xor_sync(unsigned int /*mask*/, T v, int lane_mask, int width = 32) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int src = lane ^ lane_mask;
  T out = v;
  ::litefpn::emu::warp_exchange(&v, &out, sizeof(T), src, (src / width) == (lane / width));
  return out;
}

template <typename T>
T __ldg(const T* p) {
  return *p;
}
