// CPU kernels of litefpn::_up2_fuse_fwd / _up2_fuse_bwd / _up2_fuse_bwd_coarse (schemas in
// csrc/ops.cpp; the last is the coarse half of the backward, for lateral_up2_fuse).
//
// This file is the torch-facing half: argument checks, output allocation, the fusion weights,
// choice of layout path and of instruction set, and the at::parallel_for over work units. The
// arithmetic lives in up2_fuse_impl.h, compiled once per instruction set (csrc/cpu/isa/
// default.cpp, isa/avx2.cpp) and picked with pick_kernel_table (cpu/isa/kernel_tables.h): the
// AVX2 variant wherever cpu_isa() allows AVX2 (there is no AVX-512 one).
//
// Paths (see up2_fuse_impl.h): "nhwc" when the fine-side output (out / grad_fine) has unit
// channel stride and C > 1 (channels_last), else "plane" (NCHW, and every other layout). Inside
// a path, any tensor whose rows are not unit-stride acc_t is read / written through small row
// buffers, so every stride (zero strides of an expanded grad_out included) is handled without a
// copy of a whole activation.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cpu/common/nonfinite_coarse.h"
#include "cpu/common/tensor_view.h"
#include "cpu/common/torch_glue.h"
#include "cpu/isa/kernel_tables.h"
#include "cpu/up2_fuse_kernels.h"
#include "litefpn_math.h"

namespace litefpn {
namespace cpu {
namespace {

using at::Tensor;

const Up2KernelTable& kernels() {
  static const Up2KernelTable* table = pick_kernel_table(&IsaKernelTables::up2_fuse);
  return *table;
}

// ----------------------------------------------------------------------------- helpers
// Fine elements per work unit that we aim for (one unit = a run of coarse rows); units are
// fixed by the shape, so sums do not depend on the thread count.
constexpr int64_t kUnitFineElems = int64_t(1) << 15;
// Minimum fine elements per at::parallel_for task.
constexpr int64_t kGrainFineElems = int64_t(1) << 15;

void set_chunks(Up2Args& a, bool nhwc) {
  const int64_t per_row = 4 * a.W * (nhwc ? a.C : 1);  // fine elements per coarse row
  int64_t rpc = (kUnitFineElems + per_row - 1) / per_row;
  if (rpc < 1) rpc = 1;
  if (rpc > a.H) rpc = a.H;
  a.rows_per_chunk = rpc;
  a.nchunks = (a.H + rpc - 1) / rpc;
}

int64_t grain_units(const Up2Args& a, bool nhwc) {
  const int64_t per_unit = a.rows_per_chunk * 4 * a.W * (nhwc ? a.C : 1);
  const int64_t g = kGrainFineElems / (per_unit > 0 ? per_unit : 1);
  return g < 1 ? 1 : g;
}

void check_common(const Tensor& coarse, const Tensor& fine, const std::optional<Tensor>& w_coarse,
                  const std::optional<Tensor>& w_fine, const std::optional<Tensor>& gate_coarse,
                  const std::optional<Tensor>& gate_fine, const char* op,
                  const char* fine_name = "fine") {
  TORCH_CHECK(coarse.device().is_cpu() && fine.device().is_cpu(), op, ": coarse and ", fine_name,
              " must be CPU tensors, got ", coarse.device(), " and ", fine.device());
  TORCH_CHECK(coarse.dim() == 4 && fine.dim() == 4, op, ": coarse and ", fine_name,
              " must be 4-D [N, C, H, W], got shapes ", coarse.sizes(), " and ", fine.sizes());
  TORCH_CHECK(coarse.scalar_type() == fine.scalar_type(), op, ": coarse and ", fine_name,
              " must have the same dtype, got ", coarse.scalar_type(), " and ",
              fine.scalar_type());
  TORCH_CHECK(dtype_index(fine.scalar_type()) >= 0, op, ": unsupported dtype ",
              fine.scalar_type(), " (expected float16, bfloat16, float32 or float64)");
  const int64_t N = coarse.size(0), C = coarse.size(1), H = coarse.size(2), W = coarse.size(3);
  TORCH_CHECK(fine.size(0) == N && fine.size(1) == C && fine.size(2) == 2 * H &&
                  fine.size(3) == 2 * W,
              op, ": ", fine_name, " must be [N, C, 2H, 2W] for coarse [N, C, H, W]; got coarse ",
              coarse.sizes(), " and ", fine_name, " ", fine.sizes());
  const at::ScalarType acc = acc_scalar_type(fine.scalar_type());
  TORCH_CHECK(w_coarse.has_value() == w_fine.has_value(), op,
              ": w_coarse and w_fine must be given together or both be None");
  for (const auto* w : {&w_coarse, &w_fine}) {
    if (!w->has_value()) continue;
    const Tensor& t = **w;
    TORCH_CHECK(t.device().is_cpu(), op, ": fusion weights must be CPU tensors, got ", t.device());
    TORCH_CHECK(t.scalar_type() == acc && t.numel() == 1, op,
                ": fusion weights must be [1] tensors of the accumulation dtype ", acc, ", got ",
                t.scalar_type(), " with shape ", t.sizes());
  }
  for (const auto* g : {&gate_coarse, &gate_fine}) {
    if (!g->has_value()) continue;
    const Tensor& t = **g;
    TORCH_CHECK(t.device().is_cpu(), op, ": gates must be CPU tensors, got ", t.device());
    TORCH_CHECK(t.scalar_type() == acc && t.dim() == 2 && t.size(0) == N && t.size(1) == C &&
                    t.is_contiguous(),
                op, ": gates must be contiguous [N, C] = [", N, ", ", C,
                "] tensors of the accumulation dtype ", acc, ", got ", t.scalar_type(),
                " with shape ", t.sizes());
  }
}

// ca[n*C+c] = alpha*gate_coarse[n,c], cb[n*C+c] = beta*gate_fine[n,c].
template <typename acc_t>
void plane_scales(const std::optional<Tensor>& w_coarse, const std::optional<Tensor>& w_fine,
                  const std::optional<Tensor>& gate_coarse, const std::optional<Tensor>& gate_fine,
                  double eps, int64_t NC, std::vector<acc_t>& ca, std::vector<acc_t>& cb) {
  acc_t alpha = acc_t(1), beta = acc_t(1);
  if (w_coarse.has_value()) {
    ::litefpn::fusion_weights<acc_t>(w_coarse->const_data_ptr<acc_t>()[0],
                                     w_fine->const_data_ptr<acc_t>()[0], static_cast<acc_t>(eps),
                                     alpha, beta);
  }
  ca.assign(NC, alpha);
  cb.assign(NC, beta);
  if (gate_coarse.has_value()) {
    const acc_t* g = gate_coarse->const_data_ptr<acc_t>();
    for (int64_t i = 0; i < NC; ++i) ca[i] = alpha * g[i];
  }
  if (gate_fine.has_value()) {
    const acc_t* g = gate_fine->const_data_ptr<acc_t>();
    for (int64_t i = 0; i < NC; ++i) cb[i] = beta * g[i];
  }
}

template <typename acc_t>
void run_units(Up2Fn fn, const Up2Args& a, bool bwd, bool nhwc, int64_t units) {
  const int64_t scratch_bytes =
      up2_scratch_layout(bwd, nhwc, a.W, a.C).total() * int64_t(sizeof(acc_t));
  parallel_with_scratch(units, grain_units(a, nhwc), scratch_bytes,
                        [&](int64_t begin, int64_t end, void* scratch) {
                          fn(a, begin, end, scratch);
                        });
}

// ----------------------------------------------------------------------------- forward
Tensor up2_fuse_fwd_cpu(const Tensor& coarse, const Tensor& fine,
                        const std::optional<Tensor>& w_coarse, const std::optional<Tensor>& w_fine,
                        const std::optional<Tensor>& gate_coarse,
                        const std::optional<Tensor>& gate_fine, double eps) {
  check_common(coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, "_up2_fuse_fwd");
  Tensor out = empty_output_like(fine);
  if (out.numel() == 0) return out;
  Up2Args a{};
  a.N = coarse.size(0);
  a.C = coarse.size(1);
  a.H = coarse.size(2);
  a.W = coarse.size(3);
  a.coarse = view_of(coarse);
  a.fine = view_of(fine);
  a.out = view_of(out);
  const bool nhwc = a.C > 1 && out.stride(1) == 1;
  set_chunks(a, nhwc);
  const int di = dtype_index(fine.scalar_type());
  const Up2KernelTable& k = kernels();
  const Up2Fn fn = nhwc ? k.fwd_nhwc[di] : k.fwd_plane[di];
  const int64_t units = (nhwc ? a.N : a.N * a.C) * a.nchunks;
  AT_DISPATCH_FLOATING_TYPES(acc_scalar_type(fine.scalar_type()), "up2_fuse_fwd_cpu", [&] {
    std::vector<scalar_t> ca, cb;
    plane_scales<scalar_t>(w_coarse, w_fine, gate_coarse, gate_fine, eps, a.N * a.C, ca, cb);
    const auto nonfinite = take_nonfinite_planes(ca.data(), a.N, a.C, a.C);
    a.ca = ca.data();
    a.cb = cb.data();
    run_units<scalar_t>(fn, a, /*bwd=*/false, nhwc, units);
    rewrite_nonfinite_planes(nonfinite, out, coarse, acc_scalar_type(fine.scalar_type()),
                             [&](int64_t n, int64_t c) {
                               return fine.select(0, n).select(0, c)
                                   .to(acc_scalar_type(fine.scalar_type()))
                                   .mul(static_cast<double>(cb[n * a.C + c]));
                             });
  });
  return out;
}

// ----------------------------------------------------------------------------- backward
// The backward of up2_fuse (with_fine) or its coarse half only (_up2_fuse_bwd_coarse: fine is
// undefined, no grad_fine / sum_fine). One kernel for both: grad_fine.data == nullptr makes it
// skip the fine half.
struct BwdResult {
  Tensor grad_coarse, grad_fine, sum_coarse, sum_fine;
};

BwdResult up2_bwd_common(const Tensor& grad_out, const Tensor& coarse, const Tensor* fine,
                         const std::optional<Tensor>& w_coarse, const std::optional<Tensor>& w_fine,
                         const std::optional<Tensor>& gate_coarse,
                         const std::optional<Tensor>& gate_fine, double eps, bool need_sums,
                         const char* op) {
  const bool with_fine = fine != nullptr;
  // Without fine, grad_out stands in for it in the shared checks (same shape, dtype, device).
  check_common(coarse, with_fine ? *fine : grad_out, w_coarse, w_fine, gate_coarse, gate_fine, op,
               with_fine ? "fine" : "grad_out");
  const Tensor& ref = with_fine ? *fine : grad_out;
  TORCH_CHECK(grad_out.device().is_cpu(), op, ": grad_out must be a CPU tensor, got ",
              grad_out.device());
  TORCH_CHECK(grad_out.sizes() == ref.sizes(), op, ": grad_out must have fine's shape ",
              ref.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == ref.scalar_type(), op,
              ": grad_out must have fine's dtype ", ref.scalar_type(), ", got ",
              grad_out.scalar_type());
  const at::ScalarType acc = acc_scalar_type(ref.scalar_type());
  const int64_t N = coarse.size(0), C = coarse.size(1);
  BwdResult res;
  res.grad_coarse = empty_output_like(coarse);
  const std::vector<int64_t> sum_shape =
      need_sums ? std::vector<int64_t>{N, C} : std::vector<int64_t>{0};
  res.sum_coarse = at::empty(sum_shape, ref.options().dtype(acc));
  if (with_fine) {
    res.grad_fine = empty_output_like(*fine);
    res.sum_fine = at::empty_like(res.sum_coarse);
  }
  if (ref.numel() == 0) {
    for (Tensor* t : {&res.grad_coarse, &res.grad_fine, &res.sum_coarse, &res.sum_fine})
      if (t->defined()) t->zero_();
    return res;
  }
  Up2Args a{};
  a.N = N;
  a.C = C;
  a.H = coarse.size(2);
  a.W = coarse.size(3);
  a.coarse = view_of(coarse);
  a.grad_out = view_of(grad_out);
  a.grad_coarse = view_of(res.grad_coarse);
  if (with_fine) {
    a.fine = view_of(*fine);
    a.grad_fine = view_of(res.grad_fine);
  }
  // The path follows grad_fine's layout, or without it grad_coarse's (coarse's memory format): a
  // channels_last coarse with an NCHW grad_out (as a contiguous incoming gradient gives) measured
  // faster on the nhwc path, whose row loads transpose grad_out in 8x8 blocks, than on the plane
  // path, whose grad_coarse writes would scatter with stride C.
  const bool nhwc = C > 1 && (with_fine ? res.grad_fine.stride(1) : res.grad_coarse.stride(1)) == 1;
  set_chunks(a, nhwc);
  const int di = dtype_index(ref.scalar_type());
  const Up2KernelTable& k = kernels();
  const Up2Fn fn = nhwc ? k.bwd_nhwc[di] : k.bwd_plane[di];
  const int64_t units = (nhwc ? N : N * C) * a.nchunks;
  AT_DISPATCH_FLOATING_TYPES(acc, "up2_fuse_bwd_cpu", [&] {
    std::vector<scalar_t> ca, cb;
    plane_scales<scalar_t>(w_coarse, w_fine, gate_coarse, gate_fine, eps, N * C, ca, cb);
    a.ca = ca.data();
    a.cb = cb.data();
    // Partial sums per unit; with a single chunk per (n, c) they are the sums themselves.
    std::vector<scalar_t> part_c, part_f;
    if (need_sums) {
      if (a.nchunks == 1) {
        a.part_coarse = res.sum_coarse.data_ptr<scalar_t>();
        if (with_fine) a.part_fine = res.sum_fine.data_ptr<scalar_t>();
      } else {
        const int64_t per_unit = nhwc ? C : 1;
        part_c.resize(units * per_unit);
        a.part_coarse = part_c.data();
        if (with_fine) {
          part_f.resize(units * per_unit);
          a.part_fine = part_f.data();
        }
      }
    }
    run_units<scalar_t>(fn, a, /*bwd=*/true, nhwc, units);
    if (need_sums && a.nchunks > 1) {
      // Fixed-order reduction of the chunk partials: chunk 0, 1, ... for every (n, c).
      scalar_t* sc = res.sum_coarse.data_ptr<scalar_t>();
      scalar_t* sf = with_fine ? res.sum_fine.data_ptr<scalar_t>() : nullptr;
      const int64_t nch = a.nchunks;
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t c = 0; c < C; ++c) {
          scalar_t accc = 0, accf = 0;
          for (int64_t k = 0; k < nch; ++k) {
            const int64_t idx = nhwc ? (n * nch + k) * C + c : (n * C + c) * nch + k;
            accc += part_c[idx];
            if (sf) accf += part_f[idx];
          }
          sc[n * C + c] = accc;
          if (sf) sf[n * C + c] = accf;
        }
      }
    }
  });
  return res;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> up2_fuse_bwd_cpu(
    const Tensor& grad_out, const Tensor& coarse, const Tensor& fine,
    const std::optional<Tensor>& w_coarse, const std::optional<Tensor>& w_fine,
    const std::optional<Tensor>& gate_coarse, const std::optional<Tensor>& gate_fine, double eps,
    bool need_sums) {
  BwdResult r = up2_bwd_common(grad_out, coarse, &fine, w_coarse, w_fine, gate_coarse, gate_fine,
                               eps, need_sums, "_up2_fuse_bwd");
  return {r.grad_coarse, r.grad_fine, r.sum_coarse, r.sum_fine};
}

std::tuple<Tensor, Tensor> up2_fuse_bwd_coarse_cpu(const Tensor& grad_out, const Tensor& coarse,
                                                   const std::optional<Tensor>& w_coarse,
                                                   const std::optional<Tensor>& w_fine,
                                                   const std::optional<Tensor>& gate_coarse,
                                                   double eps, bool need_sum) {
  BwdResult r = up2_bwd_common(grad_out, coarse, nullptr, w_coarse, w_fine, gate_coarse,
                               std::nullopt, eps, need_sum, "_up2_fuse_bwd_coarse");
  return {r.grad_coarse, r.sum_coarse};
}

}  // namespace
}  // namespace cpu
}  // namespace litefpn

TORCH_LIBRARY_IMPL(litefpn, CPU, m) {
  m.impl("_up2_fuse_fwd", &litefpn::cpu::up2_fuse_fwd_cpu);
  m.impl("_up2_fuse_bwd", &litefpn::cpu::up2_fuse_bwd_cpu);
  m.impl("_up2_fuse_bwd_coarse", &litefpn::cpu::up2_fuse_bwd_coarse_cpu);
}
