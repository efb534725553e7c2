// Interface between the torch-facing CPU operator (up2_fuse.cpp) and the compute kernels of
// up2_fuse (up2_fuse_impl.h), which are compiled once per instruction set (csrc/cpu/isa/
// default.cpp: the build's baseline; isa/avx2.cpp: AVX2+FMA+F16C, picked at run time when the
// CPU has them; there is no AVX-512 variant, isa/avx512.cpp leaves it out and the AVX2 one runs
// there). Plain data only: no torch types cross this line.
#pragma once

#include <cstdint>

#include "cpu/common/tensor_view.h"

namespace litefpn {
namespace cpu {

// One launch. Sizes are the COARSE ones (fine is [N, C, 2H, 2W]). The work is split into units
// of `rows_per_chunk` coarse rows (and the fine rows 2i, 2i+1 of each coarse row i):
//   plane path: unit u = nc * nchunks + chunk (nc = n * C + c);
//   nhwc path:  unit u = n * nchunks + chunk (all channels of those rows).
// The split depends on the shape only, never on the number of threads.
struct Up2Args {
  int64_t N, C, H, W;
  int64_t rows_per_chunk, nchunks;
  // forward: coarse, fine -> out;  backward: grad_out, coarse, fine -> grad_coarse, grad_fine
  // (backward with grad_fine.data == nullptr: the coarse half only; fine is not read)
  TensorView4 coarse, fine, out;
  TensorView4 grad_out, grad_coarse, grad_fine;
  // [N*C] per-plane scales in the accumulation dtype: ca = alpha*gate_coarse, cb = beta*gate_fine.
  const void* ca;
  const void* cb;
  // backward with sums: per-unit partials in the accumulation dtype, nullptr without sums.
  //   plane path: part[nc * nchunks + chunk]; nhwc path: part[(n * nchunks + chunk) * C + c].
  void* part_coarse;  // sum over the unit's coarse pixels of coarse * Up2^T(grad_out)
  void* part_fine;    // sum over the unit's fine pixels of grad_out * fine
};

// Runs units [begin, end) with `scratch` (up2_scratch_elems accumulation-dtype elements).
using Up2Fn = void (*)(const Up2Args& args, int64_t begin, int64_t end, void* scratch);

struct Up2KernelTable {
  const char* isa;
  Up2Fn fwd_plane[kNumStorageDTypes];
  Up2Fn fwd_nhwc[kNumStorageDTypes];
  Up2Fn bwd_plane[kNumStorageDTypes];
  Up2Fn bwd_nhwc[kNumStorageDTypes];
};

// Scratch of one task (one at::parallel_for range), in accumulation-dtype elements: a sequence
// of segments, each rounded up to 16 elements (64 bytes for float).
inline int64_t up2_round16(int64_t n) { return (n + 15) & ~int64_t(15); }

enum Up2Segment : int {
  kSegRing = 0,  // fetched (converted / gathered) input rows: 3 coarse rows fwd, 4 fine rows bwd
  kSegBlend,     // fwd: padded vertical blend (plane) or blended coarse row (nhwc);
                 // bwd: padded vertical gather of fine rows
  kSegIn1,       // fetched fine row
  kSegIn2,       // fetched coarse row (bwd)
  kSegOut1,      // staging of out / grad_fine row
  kSegOut2,      // staging of grad_coarse row (bwd)
  kSegVec,       // bwd: gathered coarse row (plane) or one gathered pixel (nhwc)
  kSegSum1,      // nhwc bwd: per-channel sums
  kSegSum2,
  kSegCount
};

struct Up2ScratchLayout {
  int64_t off[kSegCount + 1];
  int64_t total() const { return off[kSegCount]; }
};

inline Up2ScratchLayout up2_scratch_layout(bool bwd, bool nhwc, int64_t W, int64_t C) {
  const int64_t k = nhwc ? C : 1;  // elements per pixel in a row
  int64_t sz[kSegCount] = {0};
  const int64_t W2 = 2 * W;
  sz[kSegRing] = (bwd ? 4 * W2 : 3 * W) * k;
  sz[kSegBlend] = nhwc ? (bwd ? W2 : W) * k : (bwd ? W2 + 2 : W + 2);
  sz[kSegIn1] = W2 * k;
  sz[kSegIn2] = bwd ? W * k : 0;
  sz[kSegOut1] = W2 * k;
  sz[kSegOut2] = bwd ? W * k : 0;
  sz[kSegVec] = bwd ? (nhwc ? C : W) : 0;
  sz[kSegSum1] = (bwd && nhwc) ? C : 0;
  sz[kSegSum2] = (bwd && nhwc) ? C : 0;
  Up2ScratchLayout l;
  l.off[0] = 0;
  for (int s = 0; s < kSegCount; ++s) l.off[s + 1] = l.off[s] + up2_round16(sz[s]);
  return l;
}

}  // namespace cpu
}  // namespace litefpn
