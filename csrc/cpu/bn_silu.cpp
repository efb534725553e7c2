// CPU kernels of litefpn::_bn_silu_stats, _bn_silu_fwd, _bn_silu_bwd_sums and _bn_silu_bwd
// (schemas and contracts in csrc/ops.cpp): the per-element and per-channel parts of a fused
// training-mode BatchNorm2d + SiLU. The statistics, the folding of BN into scale / shift and the
// backward's k_dz / k_x / k_0 are computed by the caller from the [C] sums these kernels return.
//
// This file is the torch-facing half: argument checks, output allocation, the work split, the
// choice of layout path and instruction set, the at::parallel_for over work units and the
// fixed-order combination of the per-unit partial sums. The arithmetic is in bn_silu_impl.h,
// compiled per instruction set (csrc/cpu/isa/{default,avx2,avx512}.cpp) and picked with
// pick_kernel_table (cpu/isa/kernel_tables.h; LITEFPN_CPU_ISA caps the choice).
//
// Paths (see bn_silu_impl.h): the ops with an output follow the output's layout, the sums-only
// ops follow x's: "nhwc" when that tensor has unit channel stride (and C > 1), else "plane".
// Every other stride, and fp16/bf16, goes through per-block staging buffers: no activation-sized
// copy is ever made.
//
// Determinism: units (a run of one plane, or a run of pixels of one image) depend on the shape
// only; their partial sums (double) are combined here in unit order, in double, so results are
// bitwise the same for any number of threads.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "cpu/bn_silu_kernels.h"
#include "cpu/common/tensor_view.h"
#include "cpu/common/torch_glue.h"
#include "cpu/isa/kernel_tables.h"

namespace litefpn {
namespace cpu {
namespace {

using at::Tensor;

const BnSiluKernelTable& bn_kernels() {
  static const BnSiluKernelTable* table = pick_kernel_table(&IsaKernelTables::bn_silu);
  return *table;
}

// Minimum elements per at::parallel_for task.
constexpr int64_t kGrainElems = int64_t(1) << 15;

void check_x(const Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(dtype_index(x.scalar_type()) >= 0, op, ": x has unsupported dtype ",
              x.scalar_type(), " (expected float16, bfloat16, float32 or float64)");
}

void check_grad_out(const Tensor& g, const Tensor& x, const char* op) {
  TORCH_CHECK(g.device().is_cpu(), op, ": grad_out must be a CPU tensor, got ", g.device());
  TORCH_CHECK(g.sizes() == x.sizes(), op, ": grad_out must have x's shape ", x.sizes(), ", got ",
              g.sizes());
  TORCH_CHECK(g.scalar_type() == x.scalar_type(), op, ": grad_out must have x's dtype ",
              x.scalar_type(), ", got ", g.scalar_type());
}

// A per-channel vector: CPU, accumulation dtype, contiguous [C].
void check_vec(const Tensor& t, const Tensor& x, const char* op, const char* name) {
  const at::ScalarType acc = acc_scalar_type(x.scalar_type());
  const int64_t C = x.size(1);
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must have the accumulation dtype ", acc,
              " (x is ", x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": ", name, " must have shape [C] = [", C,
              "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

bool mergeable(const Tensor& t) {
  return t.size(2) == 1 || t.stride(2) == t.size(3) * t.stride(3);
}

// Units of the work split and the parallel loop over them, for `op` on the path `nhwc`.
struct Launch {
  BnSiluArgs a{};
  bool nhwc = false;
  int64_t units = 0;
  int64_t grain = 1;
  int di = 0;
};

Launch make_launch(const Tensor& x, const Tensor* g, const Tensor* out, bool nhwc) {
  Launch l;
  BnSiluArgs& a = l.a;
  a.N = x.size(0);
  a.C = x.size(1);
  a.H = x.size(2);
  a.W = x.size(3);
  a.x = view_of(x);
  if (g) a.g = view_of(*g);
  if (out) a.out = view_of(*out);
  a.merged = mergeable(x) && (!g || mergeable(*g)) && (!out || mergeable(*out));
  const int64_t HW = a.H * a.W;
  int64_t len;
  if (nhwc) {
    len = kBnNhwcUnitElems / a.C;
    len = len < kBnNhwcMinPixels ? kBnNhwcMinPixels : len;
    len = len > kBnNhwcMaxPixels ? kBnNhwcMaxPixels : len;
  } else {
    len = kBnPlaneUnit;
  }
  a.unit_len = len < HW ? len : HW;
  a.nchunks = (HW + a.unit_len - 1) / a.unit_len;
  l.nhwc = nhwc;
  l.units = (nhwc ? a.N : a.N * a.C) * a.nchunks;
  const int64_t per_unit = a.unit_len * (nhwc ? a.C : 1);
  l.grain = kGrainElems / per_unit;
  if (l.grain < 1) l.grain = 1;
  l.di = dtype_index(x.scalar_type());
  return l;
}

void run(const Launch& l, BnSiluOp op, int64_t acc_size) {
  const BnSiluKernelTable& k = bn_kernels();
  const BnSiluFn fn = l.nhwc ? k.nhwc[op][l.di] : k.plane[op][l.di];
  const int64_t scratch_bytes = bn_silu_scratch_bytes(l.nhwc, l.a.C, acc_size);
  parallel_with_scratch(l.units, l.grain, scratch_bytes,
                        [&](int64_t begin, int64_t end, void* p) { fn(l.a, begin, end, p); });
}

// Runs a sums op and combines the per-unit (double) partials in unit order, in double.
std::tuple<Tensor, Tensor> run_sums(Launch& l, BnSiluOp op, const Tensor& x) {
  const at::ScalarType acc = acc_scalar_type(x.scalar_type());
  const int64_t N = l.a.N, C = l.a.C, nch = l.a.nchunks;
  std::vector<double> part(static_cast<size_t>(l.units) * 2 * (l.nhwc ? C : 1));
  l.a.part = part.data();
  run(l, op, at::elementSize(acc));
  std::vector<double> t1(C, 0.0), t2(C, 0.0);
  if (l.nhwc) {
    for (int64_t u = 0; u < l.units; ++u) {
      const double* pu = part.data() + u * 2 * C;
      for (int64_t c = 0; c < C; ++c) {
        t1[c] += pu[c];
        t2[c] += pu[C + c];
      }
    }
  } else {
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        const double* pu = part.data() + (n * C + c) * nch * 2;
        for (int64_t k = 0; k < nch; ++k) {
          t1[c] += pu[2 * k];
          t2[c] += pu[2 * k + 1];
        }
      }
    }
  }
  Tensor s1 = at::empty({C}, x.options().dtype(acc));
  Tensor s2 = at::empty({C}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "bn_silu_sums_cpu", [&] {
    scalar_t* o1 = s1.data_ptr<scalar_t>();
    scalar_t* o2 = s2.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      o1[c] = static_cast<scalar_t>(t1[c]);
      o2[c] = static_cast<scalar_t>(t2[c]);
    }
  });
  return {s1, s2};
}

bool empty_work(const Tensor& x) {
  return x.size(0) * x.size(2) * x.size(3) == 0 || x.size(1) == 0;
}

std::tuple<Tensor, Tensor> zero_sums(const Tensor& x) {
  const auto opts = x.options().dtype(acc_scalar_type(x.scalar_type()));
  return {at::zeros({x.size(1)}, opts), at::zeros({x.size(1)}, opts)};
}

// The sums-only ops walk x in its own layout.
bool nhwc_for_input(const Tensor& x) { return x.size(1) > 1 && x.stride(1) == 1; }
// The ops with an output walk it in the output's layout.
bool nhwc_for_output(const Tensor& out) { return out.size(1) > 1 && out.stride(1) == 1; }

// ----------------------------------------------------------------------------- ops
std::tuple<Tensor, Tensor> bn_silu_stats_cpu(const Tensor& x, const Tensor& center) {
  const char* op = "_bn_silu_stats";
  check_x(x, op);
  check_vec(center, x, op, "center");
  if (empty_work(x)) return zero_sums(x);
  Launch l = make_launch(x, nullptr, nullptr, nhwc_for_input(x));
  l.a.center = center.const_data_ptr();
  return run_sums(l, kBnStats, x);
}

Tensor bn_silu_fwd_cpu(const Tensor& x, const Tensor& scale, const Tensor& shift) {
  const char* op = "_bn_silu_fwd";
  check_x(x, op);
  check_vec(scale, x, op, "scale");
  check_vec(shift, x, op, "shift");
  Tensor out = empty_output(x.sizes(), x.options(), output_format_of(x));
  if (empty_work(x)) return out;
  Launch l = make_launch(x, nullptr, &out, nhwc_for_output(out));
  l.a.scale = scale.const_data_ptr();
  l.a.shift = shift.const_data_ptr();
  run(l, kBnFwd, at::elementSize(acc_scalar_type(x.scalar_type())));
  return out;
}

std::tuple<Tensor, Tensor> bn_silu_bwd_sums_cpu(const Tensor& grad_out, const Tensor& x,
                                                const Tensor& scale, const Tensor& shift,
                                                const Tensor& center) {
  const char* op = "_bn_silu_bwd_sums";
  check_x(x, op);
  check_grad_out(grad_out, x, op);
  check_vec(scale, x, op, "scale");
  check_vec(shift, x, op, "shift");
  check_vec(center, x, op, "center");
  if (empty_work(x)) return zero_sums(x);
  Launch l = make_launch(x, &grad_out, nullptr, nhwc_for_input(x));
  l.a.scale = scale.const_data_ptr();
  l.a.shift = shift.const_data_ptr();
  l.a.center = center.const_data_ptr();
  return run_sums(l, kBnBwdSums, x);
}

Tensor bn_silu_bwd_cpu(const Tensor& grad_out, const Tensor& x, const Tensor& scale,
                       const Tensor& shift, const Tensor& k_dz, const Tensor& k_x,
                       const Tensor& k_0) {
  const char* op = "_bn_silu_bwd";
  check_x(x, op);
  check_grad_out(grad_out, x, op);
  check_vec(scale, x, op, "scale");
  check_vec(shift, x, op, "shift");
  check_vec(k_dz, x, op, "k_dz");
  check_vec(k_x, x, op, "k_x");
  check_vec(k_0, x, op, "k_0");
  Tensor out = empty_output(x.sizes(), x.options(), output_format_of(x));
  if (empty_work(x)) return out;
  Launch l = make_launch(x, &grad_out, &out, nhwc_for_output(out));
  l.a.scale = scale.const_data_ptr();
  l.a.shift = shift.const_data_ptr();
  l.a.k_dz = k_dz.const_data_ptr();
  l.a.k_x = k_x.const_data_ptr();
  l.a.k_0 = k_0.const_data_ptr();
  run(l, kBnBwd, at::elementSize(acc_scalar_type(x.scalar_type())));
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace litefpn

TORCH_LIBRARY_IMPL(litefpn, CPU, m) {
  m.impl("_bn_silu_stats", &litefpn::cpu::bn_silu_stats_cpu);
  m.impl("_bn_silu_fwd", &litefpn::cpu::bn_silu_fwd_cpu);
  m.impl("_bn_silu_bwd_sums", &litefpn::cpu::bn_silu_bwd_sums_cpu);
  m.impl("_bn_silu_bwd", &litefpn::cpu::bn_silu_bwd_cpu);
}
