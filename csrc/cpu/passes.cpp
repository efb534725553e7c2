// CPU passes of bn_silu, lateral_up2_fuse and up2_fuse's backward (schemas: csrc/ops.cpp,
// "Passes"): one kernel of the op with BatchNorm's [C]- and [C, Cin]-sized math and the fusion
// weights' chain rule around it, so that a pass is one call from Python.
//
// Why: that math is cheap but small, and as PyTorch calls it cost more than the kernels on
// small maps. Measured here (2-core VM, batch 4, the training example's shapes): ~25 ATen calls
// a pass, 2-3 us each even from C++, and each fused call paid 150-250 us of them, from Python,
// against 10-60 us of kernels. Here it runs as loops over the vectors' data; only the
// [C, Cin] x [Cin, Cin] products and the sums over the batch of per-image grams stay ATen calls.
//
// The formulas are those of litefpn_kernels/ops/_passes.py, which builds the same passes in
// PyTorch for the GPU backends (their kernels are launched from Python, or are Triton), in the
// same order of operations; the ops' docstrings (ops/bn_silu.py, ops/lateral_up2_fuse.py) derive
// them. Every loop is over a fixed order: results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "litefpn_math.h"

namespace litefpn {
namespace cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Pair = std::tuple<Tensor, Tensor>;
using Four = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// ----------------------------------------------------------------------------- the kernels
// Called through the dispatcher (their schemas are in ops.cpp, their CPU kernels in the other
// files of this folder).
template <typename Fn>
c10::TypedOperatorHandle<Fn> kernel(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

Pair bn_stats_k(const Tensor& x, const Tensor& center) {
  static auto op = kernel<Pair(const Tensor&, const Tensor&)>("litefpn::_bn_silu_stats");
  return op.call(x, center);
}

Tensor bn_fwd_k(const Tensor& x, const Tensor& scale, const Tensor& shift) {
  static auto op =
      kernel<Tensor(const Tensor&, const Tensor&, const Tensor&)>("litefpn::_bn_silu_fwd");
  return op.call(x, scale, shift);
}

Pair bn_bwd_sums_k(const Tensor& g, const Tensor& x, const Tensor& scale, const Tensor& shift,
                   const Tensor& center) {
  static auto op =
      kernel<Pair(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&)>(
          "litefpn::_bn_silu_bwd_sums");
  return op.call(g, x, scale, shift, center);
}

Tensor bn_bwd_k(const Tensor& g, const Tensor& x, const Tensor& scale, const Tensor& shift,
                const Tensor& k_dz, const Tensor& k_x, const Tensor& k_0) {
  static auto op = kernel<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const Tensor&, const Tensor&, const Tensor&)>(
      "litefpn::_bn_silu_bwd");
  return op.call(g, x, scale, shift, k_dz, k_x, k_0);
}

Pair gram_k(const Tensor& a, const Tensor& b, const OptTensor& a_center,
            const OptTensor& b_center) {
  static auto op = kernel<Pair(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&)>(
      "litefpn::_lateral_gram");
  return op.call(a, b, a_center, b_center);
}

Tensor lateral_fwd_k(const Tensor& coarse, const Tensor& z, const Tensor& weight,
                     const Tensor& bias, const OptTensor& w_c, const OptTensor& w_f,
                     const OptTensor& g_c, const OptTensor& g_f, double eps) {
  static auto op = kernel<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const OptTensor&, const OptTensor&, const OptTensor&,
                                 const OptTensor&, double)>("litefpn::_lateral_up2_fuse_fwd");
  return op.call(coarse, z, weight, bias, w_c, w_f, g_c, g_f, eps);
}

Tensor grad_z_k(const Tensor& g, const Tensor& z, const Tensor& weight, const OptTensor& scale,
                const OptTensor& quad, const OptTensor& shift) {
  static auto op = kernel<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                 const OptTensor&, const OptTensor&)>("litefpn::_lateral_grad_z");
  return op.call(g, z, weight, scale, quad, shift);
}

Four up2_bwd_k(const Tensor& g, const Tensor& coarse, const Tensor& fine, const OptTensor& w_c,
                const OptTensor& w_f, const OptTensor& g_c, const OptTensor& g_f, double eps,
                bool need_sums) {
  static auto op = kernel<Four(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                               const OptTensor&, const OptTensor&, const OptTensor&, double,
                               bool)>("litefpn::_up2_fuse_bwd");
  return op.call(g, coarse, fine, w_c, w_f, g_c, g_f, eps, need_sums);
}

Pair bwd_coarse_k(const Tensor& g, const Tensor& coarse, const OptTensor& w_c,
                  const OptTensor& w_f, const OptTensor& g_c, double eps, bool need_sum) {
  static auto op = kernel<Pair(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                               const OptTensor&, double, bool)>("litefpn::_up2_fuse_bwd_coarse");
  return op.call(g, coarse, w_c, w_f, g_c, eps, need_sum);
}

// ----------------------------------------------------------------------------- tensors
at::ScalarType acc_of(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// `t` in dtype `acc`, contiguous; no call where it already is (each no-op is still a dispatch).
Tensor to_acc(const Tensor& t, at::ScalarType acc) {
  Tensor r = t.scalar_type() == acc ? t : t.to(acc);
  return r.is_contiguous() ? r : r.contiguous();
}

OptTensor to_acc(const OptTensor& t, at::ScalarType acc) {
  if (!t.has_value()) return t;
  return to_acc(*t, acc);
}

// `t` (in the accumulation dtype) in `dtype`.
Tensor as_dtype(const Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

int64_t count(const Tensor& x) { return x.size(0) * x.size(2) * x.size(3); }

// Shape of the per-(n, c) sums a backward returns: [N, C], or [0] when not needed
// (litefpn_kernels/ops/_tensor.py, sum_shape).
std::vector<int64_t> sum_shape(bool need_sums, int64_t n, int64_t c) {
  return need_sums ? std::vector<int64_t>{n, c} : std::vector<int64_t>{0};
}

// The loops below index these operands by channel: a wrong size is an error, never a stray read
// (the public ops check their arguments first; these checks guard direct calls).
void expect_numel(const Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.numel() == n, "litefpn pass: ", name, " must have ", n, " elements, got shape ",
              t.sizes());
}

template <typename T>
const T* cp(const Tensor& t) { return t.const_data_ptr<T>(); }

template <typename T>
T* mp(Tensor& t) { return t.mutable_data_ptr<T>(); }

// x[0, :, 0, 0], non-finite values replaced by 0: the centre of the moment sums (a value of
// x's own keeps fp32 sums accurate when the mean is large against the spread).
template <typename acc_t>
Tensor pilot(const Tensor& x) {
  Tensor p = at::empty({x.size(1)}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* out = mp<acc_t>(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pilot", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < x.size(1); ++c) {
      const acc_t v = static_cast<acc_t>(in[c * x.stride(1)]);
      out[c] = std::isfinite(v) ? v : acc_t(0);
    }
  });
  return p;
}

// BatchNorm's [C] operands in acc_t, contiguous (no copy where they already are), and its fold
// of channel c: r = 1/sqrt(var + eps), scale = w*r, shift = b - mean*scale.
template <typename acc_t>
struct BnFold {
  Tensor w, b, mean, var;
  const acc_t *pw, *pb, *pm, *pv;  // their data
  acc_t eps;
  BnFold(const Tensor& bn_weight, const Tensor& bn_bias, const Tensor& mean_, const Tensor& var_,
         double bn_eps, at::ScalarType acc, int64_t C)
      : w(to_acc(bn_weight, acc)), b(to_acc(bn_bias, acc)), mean(to_acc(mean_, acc)),
        var(to_acc(var_, acc)), pw(cp<acc_t>(w)), pb(cp<acc_t>(b)), pm(cp<acc_t>(mean)),
        pv(cp<acc_t>(var)), eps(acc_t(bn_eps)) {
    expect_numel(w, C, "bn_weight");
    expect_numel(b, C, "bn_bias");
    expect_numel(mean, C, "mean");
    expect_numel(var, C, "var");
  }
  void at_channel(int64_t c, acc_t& scale, acc_t& shift, acc_t& r) const {
    r = acc_t(1) / std::sqrt(pv[c] + eps);
    scale = pw[c] * r;
    shift = pb[c] - pm[c] * scale;
  }
  // -> (scale, shift, r) as [C] tensors
  std::tuple<Tensor, Tensor, Tensor> vectors() const {
    Tensor scale = at::empty_like(var), shift = at::empty_like(var), r = at::empty_like(var);
    acc_t *ps = mp<acc_t>(scale), *pt = mp<acc_t>(shift), *pr = mp<acc_t>(r);
    for (int64_t c = 0; c < var.numel(); ++c) at_channel(c, ps[c], pt[c], pr[c]);
    return {scale, shift, r};
  }
};

// Inside a pass: no autograd (nothing here is differentiated) and no autocast (the math is in
// the accumulation dtype; under bf16 autocast at::mm would otherwise run in bf16).
struct InnerOps {
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

#define LITEFPN_DISPATCH_ACC(acc, ...) AT_DISPATCH_FLOATING_TYPES(acc, "litefpn_pass", __VA_ARGS__)

// ----------------------------------------------------------------------------- bn_silu
Pair bn_silu_moments(const Tensor& x) {
  const auto acc = acc_of(x);
  const int64_t C = x.size(1);
  if (x.numel() == 0) {
    Tensor zeros = at::zeros({C}, x.options().dtype(acc));
    return {zeros, zeros.clone()};
  }
  Pair out;
  LITEFPN_DISPATCH_ACC(acc, [&] {
    using acc_t = scalar_t;
    Tensor center = pilot<acc_t>(x);
    auto [s1, s2] = bn_stats_k(x, center);
    Tensor mean = at::empty_like(s1), var = at::empty_like(s2);
    const acc_t n = acc_t(count(x));
    const acc_t *p1 = cp<acc_t>(s1), *p2 = cp<acc_t>(s2), *pc = cp<acc_t>(center);
    acc_t *pm = mp<acc_t>(mean), *pv = mp<acc_t>(var);
    for (int64_t c = 0; c < C; ++c) {  // mean = center + s1/n, var = max(s2/n - (s1/n)^2, 0)
      const acc_t d = p1[c] / n;
      const acc_t v = p2[c] / n - d * d;
      pm[c] = pc[c] + d;
      pv[c] = v < acc_t(0) ? acc_t(0) : v;  // NaN stays NaN, as clamp_min
    }
    out = {mean, var};
  });
  return out;
}

Tensor bn_silu_apply(const Tensor& x, const Tensor& bn_weight, const Tensor& bn_bias,
                     const Tensor& mean, const Tensor& var, double bn_eps) {
  Tensor out;
  LITEFPN_DISPATCH_ACC(acc_of(x), [&] {
    auto [scale, shift, r] = BnFold<scalar_t>(bn_weight, bn_bias, mean, var, bn_eps,
                                              acc_of(x), x.size(1)).vectors();
    out = bn_fwd_k(x, scale, shift);
  });
  return out;
}

// -> (s1, s2, grad_bn_weight = r*s2) over this batch.
std::tuple<Tensor, Tensor, Tensor> bn_silu_grad_sums(const Tensor& grad_out, const Tensor& x,
                                                     const Tensor& bn_weight,
                                                     const Tensor& bn_bias, const Tensor& mean,
                                                     const Tensor& var, double bn_eps) {
  std::tuple<Tensor, Tensor, Tensor> out;
  LITEFPN_DISPATCH_ACC(acc_of(x), [&] {
    using acc_t = scalar_t;
    const BnFold<acc_t> bn(bn_weight, bn_bias, mean, var, bn_eps, acc_of(x), x.size(1));
    auto [scale, shift, r] = bn.vectors();
    if (x.numel() == 0) {
      out = {at::zeros_like(scale), at::zeros_like(scale), at::zeros_like(scale)};
      return;
    }
    auto [s1, s2] = bn_bwd_sums_k(grad_out, x, scale, shift, bn.mean);
    Tensor d_weight = at::empty_like(s2);
    const acc_t *pr = cp<acc_t>(r), *p2 = cp<acc_t>(s2);
    acc_t* pd = mp<acc_t>(d_weight);
    for (int64_t c = 0; c < x.size(1); ++c) pd[c] = pr[c] * p2[c];
    out = {s1, s2, d_weight};
  });
  return out;
}

Tensor bn_silu_grad_x(const Tensor& grad_out, const Tensor& x, const Tensor& bn_weight,
                      const Tensor& bn_bias, const Tensor& mean, const Tensor& var,
                      double bn_eps, const Tensor& s1, const Tensor& s2, int64_t n,
                      bool training) {
  if (x.numel() == 0) return at::zeros_like(x);
  Tensor out;
  LITEFPN_DISPATCH_ACC(acc_of(x), [&] {
    using acc_t = scalar_t;
    const auto acc = acc_of(x);
    const BnFold<acc_t> bn(bn_weight, bn_bias, mean, var, bn_eps, acc, x.size(1));
    const Tensor s1a = to_acc(s1, acc), s2a = to_acc(s2, acc);
    expect_numel(s1a, x.size(1), "s1");
    expect_numel(s2a, x.size(1), "s2");
    Tensor scale = at::empty_like(bn.var), shift = at::empty_like(bn.var);
    Tensor k_x = at::empty_like(bn.var), k_0 = at::empty_like(bn.var);
    acc_t *ps = mp<acc_t>(scale), *pt = mp<acc_t>(shift), *px = mp<acc_t>(k_x);
    acc_t* p0 = mp<acc_t>(k_0);
    const acc_t *p1 = cp<acc_t>(s1a), *p2 = cp<acc_t>(s2a);
    for (int64_t c = 0; c < x.size(1); ++c) {
      acc_t r;
      bn.at_channel(c, ps[c], pt[c], r);
      px[c] = p0[c] = acc_t(0);
      if (training) {  // grad_x = scale*(dz - s1/n - (x - mean)*r^2*s2/n)
        px[c] = ps[c] * r * r * p2[c] / -acc_t(n);
        p0[c] = -bn.pm[c] * px[c] - ps[c] * p1[c] / acc_t(n);
      }
    }
    out = bn_bwd_k(grad_out, x, scale, shift, scale, k_x, k_0);
  });
  return out;
}

// ----------------------------------------------------------------------------- fusion
// alpha, beta (eager.fusion_weights) from the raw weights, and the per-(n, c) factors.
template <typename acc_t>
struct Fusion {
  bool weighted = false;
  acc_t w[2] = {0, 0}, sp[2] = {0, 0}, denom = 0, coef[2] = {1, 1};  // coef: alpha, beta
  Fusion(const OptTensor& w_c, const OptTensor& w_f, double eps, at::ScalarType acc) {
    if (!w_c.has_value()) return;
    TORCH_CHECK(w_f.has_value(), "litefpn pass: w_coarse and w_fine go together");
    expect_numel(*w_c, 1, "w_coarse");
    expect_numel(*w_f, 1, "w_fine");
    weighted = true;
    w[0] = cp<acc_t>(to_acc(*w_c, acc))[0];
    w[1] = cp<acc_t>(to_acc(*w_f, acc))[0];
    sp[0] = softplus(w[0]);
    sp[1] = softplus(w[1]);
    denom = sp[0] + sp[1] + acc_t(eps);
    coef[0] = sp[0] / denom;
    coef[1] = sp[1] / denom;
  }
};

// m[n, c] = beta*gate_fine[n, c]: the factor on BN's output in the fused sum ([N, C]).
template <typename acc_t>
Tensor fine_factor(int64_t n, int64_t c, const Fusion<acc_t>& fusion, const OptTensor& g_f,
                   const at::TensorOptions& opts) {
  Tensor m = at::empty({n, c}, opts);
  acc_t* pm = mp<acc_t>(m);
  if (!g_f.has_value()) {
    for (int64_t i = 0; i < n * c; ++i) pm[i] = fusion.coef[1];
    return m;
  }
  const Tensor gate = to_acc(*g_f, opts.dtype().toScalarType());
  expect_numel(gate, n * c, "gate_fine");
  const acc_t* pg = cp<acc_t>(gate);
  for (int64_t i = 0; i < n * c; ++i) pm[i] = fusion.weighted ? pg[i] * fusion.coef[1] : pg[i];
  return m;
}

// Gradients of (w_coarse, w_fine, gate_coarse, gate_fine) from the per-(n, c) sums
// sum_c = sum_hw g*Up2(coarse), sum_f = sum_hw g*fine; [0] where not needed (derivation:
// litefpn_kernels/ops/_fusion.py, fusion_param_grads).
template <typename acc_t>
std::array<Tensor, 4> fusion_param_grads(const Tensor& sum_c, const Tensor& sum_f,
                                         const Fusion<acc_t>& fusion, const OptTensor& w_c,
                                         const OptTensor& w_f, const OptTensor& g_c,
                                         const OptTensor& g_f, const std::array<bool, 4>& need) {
  const auto acc = sum_c.scalar_type();
  std::array<Tensor, 4> grads;
  for (Tensor& g : grads) g = at::empty({0}, sum_c.options());
  const int64_t nc = sum_c.numel();
  expect_numel(sum_f, nc, "sum_fine");
  const std::array<const Tensor*, 2> sums = {&sum_c, &sum_f};
  const std::array<const OptTensor*, 2> gates = {&g_c, &g_f};
  double t[2] = {0, 0};  // sum_nc gate*sum, in double (N*C terms)
  for (int side = 0; side < 2; ++side) {
    const Tensor gate = gates[side]->has_value() ? to_acc(**gates[side], acc) : Tensor();
    if (gate.defined()) expect_numel(gate, nc, side ? "gate_fine" : "gate_coarse");
    const acc_t* s = cp<acc_t>(*sums[side]);
    if (need[2 + side]) {  // d/dgate = coef*sum
      Tensor g = at::empty_like(*sums[side]);
      acc_t* pg = mp<acc_t>(g);
      for (int64_t i = 0; i < nc; ++i) pg[i] = fusion.coef[side] * s[i];
      grads[2 + side] = as_dtype(g, (*gates[side])->scalar_type());
    }
    const acc_t* pgate = gate.defined() ? cp<acc_t>(gate) : nullptr;
    for (int64_t i = 0; i < nc; ++i) t[side] += pgate ? s[i] * pgate[i] : s[i];
  }
  if (need[0] || need[1]) {  // d/dsp = (t*D - t.sp)/D^2, then softplus' backward
    const acc_t tc = acc_t(t[0]), tf = acc_t(t[1]);
    const acc_t dot = tc * fusion.sp[0] + tf * fusion.sp[1];
    const std::array<const OptTensor*, 2> ws = {&w_c, &w_f};
    for (int side = 0; side < 2; ++side) {
      if (!need[side]) continue;
      const acc_t d_sp = ((side ? tf : tc) * fusion.denom - dot) / (fusion.denom * fusion.denom);
      const acc_t x = fusion.w[side], e = std::exp(x);
      Tensor g = at::empty({1}, sum_c.options());
      mp<acc_t>(g)[0] = x > acc_t(20) ? d_sp : d_sp * e / (e + acc_t(1));
      grads[side] = as_dtype(g, (*ws[side])->scalar_type());
    }
  }
  return grads;
}

// ----------------------------------------------------------------------------- up2_fuse
using Six = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// -> (grad_coarse, grad_fine, grad_w_coarse, grad_w_fine, grad_gate_coarse, grad_gate_fine), the
// last four [0] where not needed: the backward pass and the fusion parameters' gradients.
Six up2_fuse_grad(const Tensor& grad_out, const Tensor& coarse, const Tensor& fine,
                  const OptTensor& w_c, const OptTensor& w_f, const OptTensor& g_c,
                  const OptTensor& g_f, double eps, bool need_wc, bool need_wf, bool need_gc,
                  bool need_gf) {
  const InnerOps inner_ops;
  const auto acc = acc_of(fine);
  const auto opts = fine.options().dtype(acc);
  const bool need_sums = need_wc || need_wf || need_gc || need_gf;
  Six out;
  LITEFPN_DISPATCH_ACC(acc, [&] {
    using acc_t = scalar_t;
    Tensor grad_coarse, grad_fine, sum_c, sum_f;
    if (fine.numel() == 0) {
      const auto shape = sum_shape(need_sums, coarse.size(0), coarse.size(1));
      grad_coarse = at::zeros_like(coarse);
      grad_fine = at::zeros_like(fine);
      sum_c = at::zeros(shape, opts);
      sum_f = at::zeros(shape, opts);
    } else {
      std::tie(grad_coarse, grad_fine, sum_c, sum_f) =
          up2_bwd_k(grad_out, coarse, fine, to_acc(w_c, acc), to_acc(w_f, acc), to_acc(g_c, acc),
                    to_acc(g_f, acc), eps, need_sums);
    }
    std::array<Tensor, 4> p;
    if (need_sums) {
      p = fusion_param_grads<acc_t>(sum_c, sum_f, Fusion<acc_t>(w_c, w_f, eps, acc), w_c, w_f,
                                    g_c, g_f, {need_wc, need_wf, need_gc, need_gf});
    } else {
      for (Tensor& t : p) t = at::empty({0}, opts);
    }
    out = {grad_coarse, grad_fine, p[0], p[1], p[2], p[3]};
  });
  return out;
}

// ----------------------------------------------------------------------------- lateral_up2_fuse
// conv_weight: [C, Cin, 1, 1] for a z of Cin channels.
void check_conv_weight(const Tensor& conv_weight, const Tensor& z) {
  TORCH_CHECK(conv_weight.dim() == 4 && conv_weight.size(1) == z.size(1) &&
                  conv_weight.size(2) == 1 && conv_weight.size(3) == 1,
              "litefpn pass: conv_weight must be [C, ", z.size(1), ", 1, 1], got shape ",
              conv_weight.sizes());
}

// The 1x1 weight as [C, Cin] in acc (a view where it already is).
Tensor weight2d(const Tensor& conv_weight, at::ScalarType acc) {
  return to_acc(conv_weight.reshape({conv_weight.size(0), conv_weight.size(1)}), acc);
}

// diag(scale) w for a [C, Cin] w: BatchNorm folded into the 1x1 weight (W' = diag(gamma r) W).
template <typename acc_t>
Tensor scale_rows(const Tensor& w, const Tensor& scale) {
  const int64_t C = w.size(0), c_in = w.size(1);
  Tensor out = at::empty_like(w);
  const acc_t *pw = cp<acc_t>(w), *ps = cp<acc_t>(scale);
  acc_t* po = mp<acc_t>(out);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t k = 0; k < c_in; ++k) po[c * c_in + k] = ps[c] * pw[c * c_in + k];
  }
  return out;
}

// y[r] = sum_k a[r, k] v[k] for a row-major [rows, cols] a.
template <typename acc_t>
void matvec(const acc_t* a, const acc_t* v, int64_t rows, int64_t cols, acc_t* y) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t s = 0;
    for (int64_t k = 0; k < cols; ++k) s += a[r * cols + k] * v[k];
    y[r] = s;
  }
}

// -> (mean_z [Cin], biased cov_z [Cin, Cin], mean_y [C], biased var_y [C]) of y = W z.
Four lateral_moments(const Tensor& z, const Tensor& conv_weight) {
  const InnerOps inner_ops;
  const auto acc = acc_of(z);
  check_conv_weight(conv_weight, z);
  const int64_t c_in = z.size(1), C = conv_weight.size(0);
  Four out;
  LITEFPN_DISPATCH_ACC(acc, [&] {
    using acc_t = scalar_t;
    const auto opts = z.options().dtype(acc);
    Tensor mean_z = at::zeros({c_in}, opts), cov_z;
    if (z.numel() == 0) {
      cov_z = at::zeros({c_in, c_in}, opts);
    } else {
      Tensor center = pilot<acc_t>(z);
      auto [gram, colsum] = gram_k(z, z, center, center);
      cov_z = gram.sum(0);  // the sums over the batch: ATen's (parallel over the cells)
      Tensor col = colsum.sum(0);
      const acc_t n = acc_t(count(z));
      std::vector<acc_t> d(c_in);
      const acc_t *pcol = cp<acc_t>(col), *pc = cp<acc_t>(center);
      acc_t* pm = mp<acc_t>(mean_z);
      for (int64_t i = 0; i < c_in; ++i) {
        d[i] = pcol[i] / n;
        pm[i] = pc[i] + d[i];
      }
      acc_t* cov = mp<acc_t>(cov_z);
      for (int64_t i = 0; i < c_in; ++i) {
        for (int64_t j = 0; j < c_in; ++j) cov[i * c_in + j] = cov[i * c_in + j] / n - d[i] * d[j];
      }
    }
    const Tensor w = weight2d(conv_weight, acc);
    Tensor mean_y = at::empty({C}, opts), var_y = at::empty({C}, opts);
    matvec(cp<acc_t>(w), cp<acc_t>(mean_z), C, c_in, mp<acc_t>(mean_y));
    const Tensor w_cov = at::mm(w, cov_z);  // var_y = rowsum((W cov) o W), clamped at 0
    const acc_t *pwc = cp<acc_t>(w_cov), *pw = cp<acc_t>(w);
    acc_t* pv = mp<acc_t>(var_y);
    for (int64_t c = 0; c < C; ++c) {
      acc_t v = 0;
      for (int64_t k = 0; k < c_in; ++k) v += pwc[c * c_in + k] * pw[c * c_in + k];
      pv[c] = v < acc_t(0) ? acc_t(0) : v;
    }
    out = {mean_z, cov_z, mean_y, var_y};
  });
  return out;
}

Tensor lateral_apply(const Tensor& coarse, const Tensor& z, const Tensor& conv_weight,
                     const Tensor& bn_weight, const Tensor& bn_bias, const Tensor& stat_mean,
                     const Tensor& stat_var, double bn_eps, const OptTensor& w_c,
                     const OptTensor& w_f, const OptTensor& g_c, const OptTensor& g_f,
                     double eps) {
  const InnerOps inner_ops;
  check_conv_weight(conv_weight, z);
  const auto acc = acc_of(z);
  Tensor out;
  LITEFPN_DISPATCH_ACC(acc, [&] {
    using acc_t = scalar_t;
    const Tensor w = weight2d(conv_weight, acc);
    auto [scale, shift, r] =
        BnFold<acc_t>(bn_weight, bn_bias, stat_mean, stat_var, bn_eps, acc, w.size(0)).vectors();
    out = lateral_fwd_k(coarse, z, scale_rows<acc_t>(w, scale), shift, to_acc(w_c, acc),
                        to_acc(w_f, acc), to_acc(g_c, acc), to_acc(g_f, acc), eps);
  });
  return out;
}

// The operands both backward passes share: W, W' = diag(gamma r) W, gamma*r, BN's folded shift,
// r, m (beta*gate_fine, [N, C]) and zc, the centre of z's sums (mean_z in training, a pilot of
// z in eval).
template <typename acc_t>
struct Folded {
  Tensor weight, scaled_w, gamma_r, shift, r, m, zc;
  Folded(const Tensor& z, const Tensor& conv_weight, const Tensor& bn_weight,
         const Tensor& bn_bias, const Tensor& stat_mean, const Tensor& stat_var,
         const Tensor& mean_z, bool training, double bn_eps, const Fusion<acc_t>& fusion,
         const OptTensor& g_f) {
    const auto acc = acc_of(z);
    weight = weight2d(conv_weight, acc);
    const int64_t C = weight.size(0), c_in = weight.size(1);
    std::tie(gamma_r, shift, r) =
        BnFold<acc_t>(bn_weight, bn_bias, stat_mean, stat_var, bn_eps, acc, C).vectors();
    scaled_w = scale_rows<acc_t>(weight, gamma_r);
    m = fine_factor<acc_t>(z.size(0), C, fusion, g_f, weight.options());
    zc = training ? to_acc(mean_z, acc) : pilot<acc_t>(z);
    expect_numel(zc, c_in, "mean_z");
  }
};

// -> (A [C, Cin], s [C], d_gamma [C], sum_fine [N, C] or [0]): the g z^T pass (contract:
// `lateral_up2_fuse_backward_sums` in litefpn_kernels/ops/lateral_up2_fuse.py).
Four lateral_grad_sums(const Tensor& grad_out, const Tensor& z, const Tensor& conv_weight,
                       const Tensor& bn_weight, const Tensor& bn_bias, const Tensor& stat_mean,
                       const Tensor& stat_var, const Tensor& mean_z, bool training,
                       double bn_eps, const OptTensor& w_c, const OptTensor& w_f,
                       const OptTensor& g_f, double eps, bool need_sums) {
  const InnerOps inner_ops;
  check_conv_weight(conv_weight, z);
  const int64_t N = z.size(0), C = conv_weight.size(0), c_in = conv_weight.size(1);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(1) == C,
              "litefpn pass: grad_out must have conv_weight's ", C, " channels, got shape ",
              grad_out.sizes());
  const auto acc = acc_of(z);
  const auto opts = z.options().dtype(acc);
  const auto sums_shape = sum_shape(need_sums, N, C);
  if (z.numel() == 0) {
    return {at::zeros({C, c_in}, opts), at::zeros({C}, opts), at::zeros({C}, opts),
            at::zeros(sums_shape, opts)};
  }
  Four out;
  LITEFPN_DISPATCH_ACC(acc, [&] {
    using acc_t = scalar_t;
    const Fusion<acc_t> fusion(w_c, w_f, eps, acc);
    const Folded<acc_t> f(z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z,
                          training, bn_eps, fusion, g_f);
    const Tensor mean_y = to_acc(stat_mean, acc);
    auto [a_n, s_n] = gram_k(grad_out, z, std::nullopt, f.zc);  // [N, C, Cin], [N, C]
    Tensor a_sum = at::empty({C, c_in}, opts), s = at::empty({C}, opts);
    Tensor d_gamma = at::empty({C}, opts), sum_fine = at::empty(sums_shape, opts);
    const acc_t *an = cp<acc_t>(a_n), *sn = cp<acc_t>(s_n), *m = cp<acc_t>(f.m);
    const acc_t *w = cp<acc_t>(f.weight), *sw = cp<acc_t>(f.scaled_w), *zc = cp<acc_t>(f.zc);
    const acc_t *r = cp<acc_t>(f.r), *shift = cp<acc_t>(f.shift), *my = cp<acc_t>(mean_y);
    acc_t *pa = mp<acc_t>(a_sum), *ps = mp<acc_t>(s), *pd = mp<acc_t>(d_gamma);
    acc_t* pf = need_sums ? mp<acc_t>(sum_fine) : nullptr;
    at::parallel_for(0, C, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, N * c_in)),
                     [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        acc_t* a = pa + c * c_in;  // A = sum_n m_n A_n, s = sum_n m_n s_n
        for (int64_t k = 0; k < c_in; ++k) a[k] = 0;
        acc_t sc = 0;
        for (int64_t n = 0; n < N; ++n) {
          const acc_t mn = m[n * C + c];
          const acc_t* ank = an + (n * C + c) * c_in;
          for (int64_t k = 0; k < c_in; ++k) a[k] += mn * ank[k];
          sc += mn * sn[n * C + c];
        }
        ps[c] = sc;
        acc_t wa = 0, wz = 0, swz = 0;  // d_gamma = r*(rowsum(W o A) + (W zc - mean_y)*s)
        for (int64_t k = 0; k < c_in; ++k) {
          wa += w[c * c_in + k] * a[k];
          wz += w[c * c_in + k] * zc[k];
          swz += sw[c * c_in + k] * zc[k];
        }
        pd[c] = r[c] * (wa + (wz - my[c]) * sc);
        if (!need_sums) continue;  // sum_fine = rowsum(W' o A_n) + (W' zc + b')*s_n
        for (int64_t n = 0; n < N; ++n) {
          const acc_t* ank = an + (n * C + c) * c_in;
          acc_t dot = 0;
          for (int64_t k = 0; k < c_in; ++k) dot += sw[c * c_in + k] * ank[k];
          pf[n * C + c] = dot + (swz + shift[c]) * sn[n * C + c];
        }
      }
    });
    out = {a_sum, s, d_gamma, sum_fine};
  });
  return out;
}

using Seven = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// -> (grad_coarse, grad_z, grad_W [C, Cin], grad_w_coarse, grad_w_fine, grad_gate_coarse,
// grad_gate_fine), the last four [0] where not needed: the grad_z and grad_coarse passes
// (contract and formulas: `lateral_up2_fuse_backward` in litefpn_kernels/ops/
// lateral_up2_fuse.py). `sum_fine` is the grad_sums pass's.
Seven lateral_grad_inputs(
    const Tensor& grad_out, const Tensor& coarse, const Tensor& z, const Tensor& conv_weight,
    const Tensor& bn_weight, const Tensor& bn_bias, const Tensor& stat_mean,
    const Tensor& stat_var, const Tensor& mean_z, const Tensor& cov_z, const Tensor& delta_z,
    const Tensor& a_sum, const Tensor& s, const Tensor& s_all, const Tensor& d_gamma_all,
    const Tensor& sum_fine, int64_t count_all, bool training, double bn_eps,
    const OptTensor& w_c, const OptTensor& w_f, const OptTensor& g_c, const OptTensor& g_f,
    double eps, bool need_wc, bool need_wf, bool need_gc, bool need_gf) {
  const InnerOps inner_ops;
  const auto acc = acc_of(z);
  const auto opts = z.options().dtype(acc);
  check_conv_weight(conv_weight, z);
  const int64_t N = coarse.size(0), C = conv_weight.size(0), c_in = conv_weight.size(1);
  const std::array<bool, 4> need = {need_wc, need_wf, need_gc, need_gf};
  expect_numel(a_sum, C * c_in, "a_sum");
  expect_numel(s, C, "s");
  expect_numel(s_all, C, "s_all");
  expect_numel(d_gamma_all, C, "d_gamma_all");
  if (training && z.numel() > 0) expect_numel(cov_z, c_in * c_in, "cov_z");
  if (delta_z.numel() > 0) expect_numel(delta_z, c_in, "delta_z");
  const bool need_sums = need_wc || need_wf || need_gc || need_gf;
  Seven out;
  LITEFPN_DISPATCH_ACC(acc, [&] {
    using acc_t = scalar_t;
    const Fusion<acc_t> fusion(w_c, w_f, eps, acc);
    Tensor grad_coarse, grad_z, grad_w = at::empty({C, c_in}, opts), sum_coarse;
    if (z.numel() == 0) {
      grad_coarse = at::zeros_like(coarse);
      grad_z = at::zeros_like(z);
      grad_w.zero_();
      sum_coarse = at::zeros(sum_shape(need_sums, N, C), opts);
    } else {
      const Folded<acc_t> f(z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z,
                            training, bn_eps, fusion, g_f);
      const acc_t *w = cp<acc_t>(f.weight), *gr = cp<acc_t>(f.gamma_r), *r = cp<acc_t>(f.r);
      const acc_t *a = cp<acc_t>(a_sum), *zc = cp<acc_t>(f.zc);
      acc_t* gw = mp<acc_t>(grad_w);
      if (training) {
        const Tensor s_a = to_acc(s, acc), s_all_a = to_acc(s_all, acc);
        const Tensor d_all_a = to_acc(d_gamma_all, acc);
        const acc_t *sl = cp<acc_t>(s_a), *sa = cp<acc_t>(s_all_a), *da = cp<acc_t>(d_all_a);
        const acc_t frac = acc_t(double(count(z)) / double(count_all)), M = acc_t(count_all);
        const Tensor w_cov = at::mm(f.weight, cov_z);
        const bool synced = delta_z.numel() > 0;
        const Tensor delta = synced ? to_acc(delta_z, acc) : Tensor();
        const acc_t* pdelta = synced ? cp<acc_t>(delta) : nullptr;
        std::vector<acc_t> w_delta(C, acc_t(0));
        if (synced) matvec(w, pdelta, C, c_in, w_delta.data());
        Tensor vw = at::empty_like(f.weight);  // diag(gamma r^2 d_gamma_all / M) W
        const acc_t* pwc = cp<acc_t>(w_cov);
        acc_t* pvw = mp<acc_t>(vw);
        for (int64_t c = 0; c < C; ++c) {
          // grad_W = gamma*r*(A - f*(d_gamma_all*r) (W cov_z) [- f*s_all delta_z^T
          //          + local_dy mean_z^T])
          const acc_t k_cov = da[c] * r[c] * frac;
          const acc_t local_dy = sl[c] - frac * sa[c] - frac * r[c] * da[c] * w_delta[c];
          const acc_t k_v = gr[c] * r[c] * da[c] / M;
          for (int64_t k = 0; k < c_in; ++k) {
            acc_t g = a[c * c_in + k] - k_cov * pwc[c * c_in + k];
            if (synced) {
              g = g - sa[c] * frac * pdelta[k];
              g = g + local_dy * zc[k];
            }
            gw[c * c_in + k] = gr[c] * g;
            pvw[c * c_in + k] = k_v * w[c * c_in + k];
          }
        }
        Tensor quad = at::mm(f.weight.t(), vw);  // Q = W^T diag(...) W, [Cin, Cin]
        Tensor shift = at::empty({c_in}, opts);  // Q mean_z - W'^T s_all / M
        acc_t* pshift = mp<acc_t>(shift);
        const acc_t* sw = cp<acc_t>(f.scaled_w);
        matvec(cp<acc_t>(quad), zc, c_in, c_in, pshift);
        std::vector<acc_t> t(c_in, acc_t(0));  // W'^T s_all, accumulated row by row of W'
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t k = 0; k < c_in; ++k) t[k] += sw[c * c_in + k] * sa[c];
        }
        for (int64_t k = 0; k < c_in; ++k) pshift[k] -= t[k] / M;
        grad_z = grad_z_k(grad_out, z, f.scaled_w, f.m, quad, shift);
      } else {  // grad_W = gamma*r*(A + s zc^T), grad_z = W'^T (m g)
        const Tensor s_a = to_acc(s, acc);
        const acc_t* sl = cp<acc_t>(s_a);
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t k = 0; k < c_in; ++k) {
            gw[c * c_in + k] = gr[c] * (a[c * c_in + k] + sl[c] * zc[k]);
          }
        }
        grad_z = grad_z_k(grad_out, z, f.scaled_w, f.m, std::nullopt, std::nullopt);
      }
      std::tie(grad_coarse, sum_coarse) = bwd_coarse_k(grad_out, coarse, to_acc(w_c, acc),
                                                       to_acc(w_f, acc), to_acc(g_c, acc), eps,
                                                       need_sums);
    }
    std::array<Tensor, 4> p;
    if (need_sums) {
      p = fusion_param_grads<acc_t>(sum_coarse, to_acc(sum_fine, acc), fusion, w_c, w_f, g_c,
                                    g_f, need);
    } else {
      for (Tensor& t : p) t = at::empty({0}, opts);
    }
    out = {grad_coarse, grad_z, grad_w, p[0], p[1], p[2], p[3]};
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace litefpn

TORCH_LIBRARY_IMPL(litefpn, CPU, m) {
  m.impl("_up2_fuse_grad", &litefpn::cpu::up2_fuse_grad);
  m.impl("_bn_silu_moments", &litefpn::cpu::bn_silu_moments);
  m.impl("_bn_silu_apply", &litefpn::cpu::bn_silu_apply);
  m.impl("_bn_silu_grad_sums", &litefpn::cpu::bn_silu_grad_sums);
  m.impl("_bn_silu_grad_x", &litefpn::cpu::bn_silu_grad_x);
  m.impl("_lateral_moments", &litefpn::cpu::lateral_moments);
  m.impl("_lateral_apply", &litefpn::cpu::lateral_apply);
  m.impl("_lateral_grad_sums", &litefpn::cpu::lateral_grad_sums);
  m.impl("_lateral_grad_inputs", &litefpn::cpu::lateral_grad_inputs);
}
