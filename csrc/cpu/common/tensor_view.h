// The storage types every CPU kernel family (up2_fuse, lateral_up2_fuse, bn_silu) takes across
// the plain-data boundary between the torch-facing operator files (<op>.cpp) and the compute
// kernels (<op>_impl.h): no torch types cross this line.
#pragma once

#include <cstdint>

namespace litefpn {
namespace cpu {

// Storage dtypes the kernels take, as an index into the kernel tables (torch_glue.h's
// dtype_index maps at::ScalarType onto it).
enum StorageDType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3, kNumStorageDTypes = 4 };

// A 4-D [N, C, H, W] tensor view: data pointer and strides in elements (any, zero included).
struct TensorView4 {
  void* data;
  int64_t s[4];
};

}  // namespace cpu
}  // namespace litefpn
