// CPU kernels of litefpn::_lateral_gram, _lateral_up2_fuse_fwd and _lateral_grad_z (schemas and
// contracts in csrc/ops.cpp; the fourth lateral kernel, _up2_fuse_bwd_coarse, shares up2_fuse's
// backward kernel and is registered in up2_fuse.cpp).
//
// This file is the torch-facing half: argument checks, output allocation, the small per-call
// tables (fusion weights x gates per (n, c), transposed / padded weights), the work split and
// the fixed-order combination of the gram partials. The arithmetic is in
// lateral_up2_fuse_impl.h, compiled per instruction set (csrc/cpu/isa/{default,avx2,avx512}.cpp)
// and picked with pick_kernel_table (cpu/isa/kernel_tables.h; LITEFPN_CPU_ISA caps the choice).
//
// Paths (see lateral_up2_fuse_impl.h): the forward follows out (z's memory format), grad_z
// follows grad_z (z's layout): "nhwc" when that output has unit channel stride (and more than one channel),
// else "plane". Every other stride, and fp16/bf16, goes through per-panel staging buffers: no
// activation-sized copy is ever made.
//
// Determinism: units (n, chunk of rows) depend on the shape only; gram partials are per unit and
// are summed over a unit's chunks in chunk order here, so results are bitwise the same for any
// number of threads.
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
#include "cpu/lateral_up2_fuse_kernels.h"
#include "litefpn_math.h"

namespace litefpn {
namespace cpu {
namespace {

using at::Tensor;

const LatKernelTable& lat_kernels() {
  static const LatKernelTable* table = pick_kernel_table(&IsaKernelTables::lateral_up2_fuse);
  return *table;
}

// Lanes of the picked table's vectors: the padded widths (cbp, cpad, kpad) and the scratch sizes
// follow them.
int64_t lanes_of(at::ScalarType acc) {
  return lat_kernels().vec_bytes / (acc == at::kDouble ? 8 : 4);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows per unit so that a unit covers about `target` elements (rows of `per_row` elements).
int64_t rows_per_unit(int64_t target, int64_t per_row, int64_t rows) {
  int64_t r = ceil_div(target, per_row > 0 ? per_row : 1);
  if (r < 1) r = 1;
  if (r > rows) r = rows;
  return r < 1 ? 1 : r;
}

void check_activation(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D [N, C, H, W], got shape ", t.sizes());
  TORCH_CHECK(dtype_index(t.scalar_type()) >= 0, op, ": ", name, " has unsupported dtype ",
              t.scalar_type(), " (expected float16, bfloat16, float32 or float64)");
}

// A small parameter tensor: CPU, accumulation dtype, contiguous, the given shape.
void check_small(const Tensor& t, at::ScalarType acc, at::IntArrayRef shape, const char* op,
                 const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must have the accumulation dtype ", acc,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// ----------------------------------------------------------------------------- gram
// Pixels per gram unit: the unit's sum is accumulated panel by panel in fp32 (fp64).
constexpr int64_t kGramUnitPixels = 4096;

std::tuple<Tensor, Tensor> lateral_gram_cpu(const Tensor& a, const Tensor& b,
                                            const std::optional<Tensor>& a_center,
                                            const std::optional<Tensor>& b_center) {
  const char* op = "_lateral_gram";
  check_activation(a, op, "a");
  check_activation(b, op, "b");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": a and b must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.size(0) == b.size(0) && a.size(2) == b.size(2) && a.size(3) == b.size(3), op,
              ": a and b must share batch and spatial size, got a ", a.sizes(), " and b ",
              b.sizes());
  const at::ScalarType acc = acc_scalar_type(a.scalar_type());
  const int64_t N = a.size(0), Ca = a.size(1), Cb = b.size(1), H = a.size(2), W = a.size(3);
  if (a_center.has_value()) check_small(*a_center, acc, {Ca}, op, "a_center");
  if (b_center.has_value()) check_small(*b_center, acc, {Cb}, op, "b_center");
  Tensor gram = at::empty({N, Ca, Cb}, a.options().dtype(acc));
  Tensor colsum = at::empty({N, Ca}, a.options().dtype(acc));
  if (N == 0 || Ca == 0) return {gram, colsum};
  if (H * W == 0) {
    gram.zero_();
    colsum.zero_();
    return {gram, colsum};
  }
  LatGramArgs g{};
  g.N = N;
  g.Ca = Ca;
  g.Cb = Cb;
  g.H = H;
  g.W = W;
  g.a = view_of(a);
  g.b = view_of(b);
  g.a_center = a_center.has_value() ? a_center->const_data_ptr() : nullptr;
  g.b_center = b_center.has_value() ? b_center->const_data_ptr() : nullptr;
  g.same = a.is_same(b) ||
           (a.const_data_ptr() == b.const_data_ptr() && a.sizes() == b.sizes() &&
            a.strides() == b.strides());
  g.same = g.same && g.a_center == g.b_center;
  const int64_t lanes = lanes_of(acc);
  g.cbp = lat_round(Cb, lanes);
  g.rows_per_chunk = rows_per_unit(kGramUnitPixels, W, H);
  g.nchunks = ceil_div(H, g.rows_per_chunk);
  const int64_t units = N * g.nchunks;
  const int di = dtype_index(a.scalar_type());
  const LatGramFn fn = lat_kernels().gram[di];
  AT_DISPATCH_FLOATING_TYPES(acc, "lateral_gram_cpu", [&] {
    const int64_t nch = g.nchunks, cbp = g.cbp, per_unit = Ca * cbp + Ca;
    std::vector<scalar_t> part(static_cast<size_t>(units * per_unit));
    g.part = part.data();
    parallel_with_scratch(units, 1, lat_gram_scratch(g, lanes) * int64_t(sizeof(scalar_t)),
                          [&](int64_t begin, int64_t end, void* scr) { fn(g, begin, end, scr); });
    // Fixed-order combination of the chunk partials (in double; chunk 0, 1, ...).
    scalar_t* gp = gram.data_ptr<scalar_t>();
    scalar_t* cp = colsum.data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* pn = part.data() + n * nch * per_unit;
      for (int64_t i = 0; i < Ca; ++i) {
        for (int64_t j = 0; j < Cb; ++j) {
          // a's own gram: the kernel leaves tiles below the diagonal unset, read (j, i) there
          const int64_t at = g.same && j < i ? j * cbp + i : i * cbp + j;
          double s = 0;
          for (int64_t k = 0; k < nch; ++k) s += pn[k * per_unit + at];
          gp[(n * Ca + i) * Cb + j] = static_cast<scalar_t>(s);
        }
        double s = 0;
        for (int64_t k = 0; k < nch; ++k) s += pn[k * per_unit + Ca * cbp + i];
        cp[n * Ca + i] = static_cast<scalar_t>(s);
      }
    }
  });
  return {gram, colsum};
}

// ----------------------------------------------------------------------------- forward
// Output elements per forward unit (a run of coarse rows, all channels).
constexpr int64_t kFwdUnitElems = int64_t(1) << 15;

Tensor lateral_up2_fuse_fwd_cpu(const Tensor& coarse, const Tensor& z, const Tensor& weight,
                                const Tensor& bias, const std::optional<Tensor>& w_coarse,
                                const std::optional<Tensor>& w_fine,
                                const std::optional<Tensor>& gate_coarse,
                                const std::optional<Tensor>& gate_fine, double eps) {
  const char* op = "_lateral_up2_fuse_fwd";
  check_activation(coarse, op, "coarse");
  check_activation(z, op, "z");
  TORCH_CHECK(coarse.scalar_type() == z.scalar_type(), op,
              ": coarse and z must have the same dtype, got ", coarse.scalar_type(), " and ",
              z.scalar_type());
  const int64_t N = coarse.size(0), C = coarse.size(1), H = coarse.size(2), W = coarse.size(3);
  const int64_t Cin = z.size(1);
  TORCH_CHECK(z.size(0) == N && z.size(2) == 2 * H && z.size(3) == 2 * W, op,
              ": z must be [N, Cin, 2H, 2W] for coarse [N, C, H, W]; got coarse ", coarse.sizes(),
              " and z ", z.sizes());
  const at::ScalarType acc = acc_scalar_type(z.scalar_type());
  check_small(weight, acc, {C, Cin}, op, "weight");
  check_small(bias, acc, {C}, op, "bias");
  TORCH_CHECK(w_coarse.has_value() == w_fine.has_value(), op,
              ": w_coarse and w_fine must be given together or both be None");
  if (w_coarse.has_value()) {
    check_small(*w_coarse, acc, {1}, op, "w_coarse");
    check_small(*w_fine, acc, {1}, op, "w_fine");
  }
  if (gate_coarse.has_value()) check_small(*gate_coarse, acc, {N, C}, op, "gate_coarse");
  if (gate_fine.has_value()) check_small(*gate_fine, acc, {N, C}, op, "gate_fine");
  // out in z's memory format (as the operator's fake kernel: ops._out_like_z)
  Tensor out = empty_output({N, C, 2 * H, 2 * W}, z.options(), output_format_of(z));
  if (out.numel() == 0) return out;
  const int64_t lanes = lanes_of(acc);
  LatFwdArgs f{};
  f.N = N;
  f.C = C;
  f.Cin = Cin;
  f.H = H;
  f.W = W;
  f.coarse = view_of(coarse);
  f.z = view_of(z);
  f.out = view_of(out);
  f.cpad = lat_round(C, lanes);
  f.rows_per_chunk = rows_per_unit(kFwdUnitElems, 4 * W * C, H);
  f.nchunks = ceil_div(H, f.rows_per_chunk);
  const bool nhwc = C > 1 && out.stride(1) == 1;
  const int di = dtype_index(z.scalar_type());
  const LatFwdFn fn = nhwc ? lat_kernels().fwd_nhwc[di] : lat_kernels().fwd_plane[di];
  const int64_t units = N * f.nchunks;
  AT_DISPATCH_FLOATING_TYPES(acc, "lateral_up2_fuse_fwd_cpu", [&] {
    const int64_t cpad = f.cpad;
    scalar_t alpha = 1, beta = 1;
    if (w_coarse.has_value()) {
      ::litefpn::fusion_weights<scalar_t>(w_coarse->const_data_ptr<scalar_t>()[0],
                                          w_fine->const_data_ptr<scalar_t>()[0],
                                          static_cast<scalar_t>(eps), alpha, beta);
    }
    std::vector<scalar_t> ca(N * cpad, scalar_t(0)), cb(N * cpad, scalar_t(0));
    const scalar_t* gc = gate_coarse.has_value() ? gate_coarse->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* gf = gate_fine.has_value() ? gate_fine->const_data_ptr<scalar_t>() : nullptr;
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        ca[n * cpad + c] = gc ? alpha * gc[n * C + c] : alpha;
        cb[n * cpad + c] = gf ? beta * gf[n * C + c] : beta;
      }
    }
    const scalar_t* wsrc = weight.const_data_ptr<scalar_t>();
    std::vector<scalar_t> wt, bpad(cpad, scalar_t(0));
    for (int64_t c = 0; c < C; ++c) bpad[c] = bias.const_data_ptr<scalar_t>()[c];
    if (nhwc) {
      wt.assign(Cin * cpad, scalar_t(0));
      for (int64_t c = 0; c < C; ++c)
        for (int64_t k = 0; k < Cin; ++k) wt[k * cpad + c] = wsrc[c * Cin + k];
      f.weight = wt.data();
    } else {
      f.weight = wsrc;
    }
    f.bias = bpad.data();
    const auto nonfinite = take_nonfinite_planes(ca.data(), N, C, cpad);
    f.ca = ca.data();
    f.cb = cb.data();
    parallel_with_scratch(units, 1, lat_fwd_scratch(f, lanes) * int64_t(sizeof(scalar_t)),
                          [&](int64_t begin, int64_t end, void* scr) { fn(f, begin, end, scr); });
    // the fine term: cb * (weight[c] . z[n] + bias[c]), the kernel's y for this plane
    rewrite_nonfinite_planes(nonfinite, out, coarse, acc, [&](int64_t n, int64_t c) {
      const at::Tensor zn = z.select(0, n).to(acc);
      const at::Tensor w = weight.select(0, c).view({Cin, 1, 1});
      return zn.mul(w).sum(0).add(static_cast<double>(bpad[c]))
          .mul(static_cast<double>(cb[n * cpad + c]));
    });
  });
  return out;
}

// ----------------------------------------------------------------------------- grad_z
// Input-channel outputs per grad_z unit (a run of fine rows).
constexpr int64_t kGradZUnitPixels = 4096;

Tensor lateral_grad_z_cpu(const Tensor& grad_out, const Tensor& z, const Tensor& weight,
                          const std::optional<Tensor>& scale, const std::optional<Tensor>& quad,
                          const std::optional<Tensor>& shift) {
  const char* op = "_lateral_grad_z";
  check_activation(grad_out, op, "grad_out");
  check_activation(z, op, "z");
  TORCH_CHECK(grad_out.scalar_type() == z.scalar_type(), op,
              ": grad_out and z must have the same dtype, got ", grad_out.scalar_type(), " and ",
              z.scalar_type());
  const int64_t N = z.size(0), Cin = z.size(1), H = z.size(2), W = z.size(3);
  const int64_t C = grad_out.size(1);
  TORCH_CHECK(grad_out.size(0) == N && grad_out.size(2) == H && grad_out.size(3) == W, op,
              ": grad_out must be [N, C, H, W] for z [N, Cin, H, W]; got grad_out ",
              grad_out.sizes(), " and z ", z.sizes());
  const at::ScalarType acc = acc_scalar_type(z.scalar_type());
  check_small(weight, acc, {C, Cin}, op, "weight");
  if (scale.has_value()) check_small(*scale, acc, {N, C}, op, "scale");
  if (quad.has_value()) check_small(*quad, acc, {Cin, Cin}, op, "quad");
  if (shift.has_value()) check_small(*shift, acc, {Cin}, op, "shift");
  Tensor grad_z = empty_output_like(z);
  if (grad_z.numel() == 0) return grad_z;
  const int64_t lanes = lanes_of(acc);
  LatGradZArgs g{};
  g.N = N;
  g.C = C;
  g.Cin = Cin;
  g.H = H;
  g.W = W;
  g.g = view_of(grad_out);
  g.z = view_of(z);
  g.out = view_of(grad_z);
  g.kpad = lat_round(Cin, lanes);
  g.rows_per_chunk = rows_per_unit(kGradZUnitPixels, W, H);
  g.nchunks = ceil_div(H, g.rows_per_chunk);
  const bool nhwc = Cin > 1 && grad_z.stride(1) == 1;
  const int di = dtype_index(z.scalar_type());
  const LatGradZFn fn = nhwc ? lat_kernels().grad_z_nhwc[di] : lat_kernels().grad_z_plane[di];
  const int64_t units = N * g.nchunks;
  AT_DISPATCH_FLOATING_TYPES(acc, "lateral_grad_z_cpu", [&] {
    const int64_t kpad = g.kpad;
    std::vector<scalar_t> qn, sh;
    if (quad.has_value()) {
      const scalar_t* q = quad->const_data_ptr<scalar_t>();
      if (nhwc) {  // -quad^T [j][kpad]
        qn.assign(Cin * kpad, scalar_t(0));
        for (int64_t k = 0; k < Cin; ++k)
          for (int64_t j = 0; j < Cin; ++j) qn[j * kpad + k] = -q[k * Cin + j];
      } else {  // -quad [k][j]
        qn.resize(Cin * Cin);
        for (int64_t i = 0; i < Cin * Cin; ++i) qn[i] = -q[i];
      }
      g.quad_neg = qn.data();
    }
    if (shift.has_value()) {
      sh.assign(kpad, scalar_t(0));
      for (int64_t k = 0; k < Cin; ++k) sh[k] = shift->const_data_ptr<scalar_t>()[k];
      g.shift = sh.data();
    }
    g.weight = weight.const_data_ptr<scalar_t>();
    g.scale = scale.has_value() ? scale->const_data_ptr<scalar_t>() : nullptr;
    parallel_with_scratch(units, 1, lat_grad_z_scratch(g, lanes) * int64_t(sizeof(scalar_t)),
                          [&](int64_t begin, int64_t end, void* scr) { fn(g, begin, end, scr); });
  });
  return grad_z;
}

}  // namespace
}  // namespace cpu
}  // namespace litefpn

TORCH_LIBRARY_IMPL(litefpn, CPU, m) {
  m.impl("_lateral_gram", &litefpn::cpu::lateral_gram_cpu);
  m.impl("_lateral_up2_fuse_fwd", &litefpn::cpu::lateral_up2_fuse_fwd_cpu);
  m.impl("_lateral_grad_z", &litefpn::cpu::lateral_grad_z_cpu);
}
