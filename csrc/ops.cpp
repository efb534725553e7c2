// Schemas of the compiled kernels, in one place. Each device folder registers its kernels with
// TORCH_LIBRARY_IMPL(litefpn, CPU|CUDA). The public operators (`litefpn::up2_fuse`, ...) are
// defined in Python (litefpn_kernels/ops/) with their fake kernels and autograd; they call these
// `_*` kernels for the `cpu` and `cuda` backends.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/common/cpu_isa.h"

// `import litefpn_kernels._C` loads this library, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

// Kernels of up2_fuse (out = alpha*Up2(coarse) + beta*fine, optionally gated), and the coarse
// half of its backward that lateral_up2_fuse reuses.
TORCH_LIBRARY_FRAGMENT(litefpn, m) {
  // out = alpha*gate_coarse*Up2(coarse) + beta*gate_fine*fine; alpha, beta from the raw weights
  // (both or neither given), computed inside the kernel.
  m.def("_up2_fuse_fwd(Tensor coarse, Tensor fine, Tensor? w_coarse, Tensor? w_fine, "
        "Tensor? gate_coarse, Tensor? gate_fine, float eps) -> Tensor");
  // -> (grad_coarse, grad_fine, sum_coarse, sum_fine). With need_sums, sum_coarse[n,c] =
  // sum_hw grad_out*Up2(coarse) and sum_fine[n,c] = sum_hw grad_out*fine (fp32, [N, C],
  // unweighted and ungated); otherwise both are empty fp32 tensors of shape [0].
  m.def("_up2_fuse_bwd(Tensor grad_out, Tensor coarse, Tensor fine, Tensor? w_coarse, "
        "Tensor? w_fine, Tensor? gate_coarse, Tensor? gate_fine, float eps, bool need_sums) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // The coarse half of up2_fuse's backward, for lateral_up2_fuse's backward (whose fine side is
  // folded into _lateral_grad_z): grad_coarse = alpha*gc*Up2^T(grad_out) and, with need_sum,
  // sum_coarse[n,c] = sum_hw grad_out*Up2(coarse) (else an empty [0] tensor).
  m.def("_up2_fuse_bwd_coarse(Tensor grad_out, Tensor coarse, Tensor? w_coarse, Tensor? w_fine, "
        "Tensor? gate_coarse, float eps, bool need_sum) -> (Tensor, Tensor)");
}

// Kernels of lateral_up2_fuse (one top-down level: up2_fuse(coarse, BN(conv1x1(z)))). The
// composition of these into passes, incl. BatchNorm statistics, is in the passes below.
TORCH_LIBRARY_FRAGMENT(litefpn, m) {
  // gram[n,i,j] = sum_hw (a[n,i,h,w]-a_center[i]) * (b[n,j,h,w]-b_center[j]),
  // colsum[n,i] = sum_hw (a[n,i,h,w]-a_center[i]). a [N,Ca,H,W], b [N,Cb,H,W], same dtype;
  // centers None (0) or [Ca] / [Cb]; outputs [N,Ca,Cb], [N,Ca] in the accumulation dtype.
  m.def("_lateral_gram(Tensor a, Tensor b, Tensor? a_center, Tensor? b_center) "
        "-> (Tensor, Tensor)");
  // out[n,c,p] = alpha*gc[n,c]*Up2(coarse)[n,c,p] + beta*gf[n,c]*(sum_k weight[c,k]*z[n,k,p] + bias[c])
  // weight [C,Cin], bias [C] (BN folded in); out [N,C,2H,2W] in z's memory format.
  m.def("_lateral_up2_fuse_fwd(Tensor coarse, Tensor z, Tensor weight, Tensor bias, "
        "Tensor? w_coarse, Tensor? w_fine, Tensor? gate_coarse, Tensor? gate_fine, float eps) "
        "-> Tensor");
  // grad_z[n,k,p] = sum_c weight[c,k]*scale[n,c]*grad_out[n,c,p] - sum_j quad[k,j]*z[n,j,p] + shift[k]
  // scale None (1) or [N,C]; quad None or [Cin,Cin]; shift None or [Cin]; grad_z like z.
  m.def("_lateral_grad_z(Tensor grad_out, Tensor z, Tensor weight, Tensor? scale, Tensor? quad, "
        "Tensor? shift) -> Tensor");
}

// Kernels of bn_silu: BatchNorm2d + SiLU, y = silu(x*scale + shift) with scale, shift folded
// from the batch (or running) statistics by the passes (below). x is [N, C, H, W] of float16,
// bfloat16, float32 or float64; "acc" is float64 for float64 x, else float32; every per-channel
// vector is a contiguous [C] tensor of the acc dtype, and all arithmetic is in acc. Sums run in a
// fixed order that depends on the shape only (bitwise the same for any thread count); with
// N*H*W == 0 or C == 0 they are zeros and the outputs are empty.
TORCH_LIBRARY_FRAGMENT(litefpn, m) {
  // s1[c] = sum_nhw (x - center[c]), s2[c] = sum_nhw (x - center[c])^2; [C] acc.
  m.def("_bn_silu_stats(Tensor x, Tensor center) -> (Tensor, Tensor)");
  // a = x*scale[c] + shift[c]; y = a / (1 + exp(-a)) (eager's silu formula, IEEE NaN/Inf
  // behaviour included). y has x's dtype and shape; channels_last if x is channels_last
  // (and not contiguous), else contiguous.
  m.def("_bn_silu_fwd(Tensor x, Tensor scale, Tensor shift) -> Tensor");
  // a as above; sg = 1/(1 + exp(-a)); dz = grad_out*sg*(1 + a*(1 - sg)) (eager's
  // silu_backward); s1[c] = sum_nhw dz, s2[c] = sum_nhw dz*(x - center[c]); [C] acc.
  // grad_out: x's shape and dtype, any strides (zero strides of an expanded tensor included).
  m.def("_bn_silu_bwd_sums(Tensor grad_out, Tensor x, Tensor scale, Tensor shift, "
        "Tensor center) -> (Tensor, Tensor)");
  // grad_x = dz*k_dz[c] + x*k_x[c] + k_0[c], dz as above; grad_x like _bn_silu_fwd's y.
  m.def("_bn_silu_bwd(Tensor grad_out, Tensor x, Tensor scale, Tensor shift, Tensor k_dz, "
        "Tensor k_x, Tensor k_0) -> Tensor");
}

// Passes: one of the kernels above with BatchNorm's [C]- and [C, Cin]-sized math, or the fusion
// weights' chain rule, around it, so that a pass is one call. CPU: csrc/cpu/passes.cpp; the GPU
// backends build the same passes in PyTorch (litefpn_kernels/ops/_passes.py). bn_weight /
// bn_bias / mean / var are [C] in any float dtype; every result vector is in the accumulation
// dtype. The formulas are derived at the Python ops that call them (litefpn_kernels/ops/).
TORCH_LIBRARY_FRAGMENT(litefpn, m) {
  // up2_fuse's backward: -> (grad_coarse, grad_fine, grad_w_coarse, grad_w_fine,
  // grad_gate_coarse, grad_gate_fine), the last four [0] where not needed.
  m.def("_up2_fuse_grad(Tensor grad_out, Tensor coarse, Tensor fine, Tensor? w_coarse, "
        "Tensor? w_fine, Tensor? gate_coarse, Tensor? gate_fine, float eps, bool need_w_coarse, "
        "bool need_w_fine, bool need_gate_coarse, bool need_gate_fine) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // -> (mean, biased var) of x per channel; zeros for an empty batch.
  m.def("_bn_silu_moments(Tensor x) -> (Tensor, Tensor)");
  // silu(BN(x)) with the statistics mean, var.
  m.def("_bn_silu_apply(Tensor x, Tensor bn_weight, Tensor bn_bias, Tensor mean, Tensor var, "
        "float bn_eps) -> Tensor");
  // -> (s1, s2, grad_bn_weight): sum dz, sum dz*(x - mean), r*s2; dz = grad_out*silu'(BN(x)).
  m.def("_bn_silu_grad_sums(Tensor grad_out, Tensor x, Tensor bn_weight, Tensor bn_bias, "
        "Tensor mean, Tensor var, float bn_eps) -> (Tensor, Tensor, Tensor)");
  // -> grad_x from the sums s1, s2 over `count` values per channel.
  m.def("_bn_silu_grad_x(Tensor grad_out, Tensor x, Tensor bn_weight, Tensor bn_bias, "
        "Tensor mean, Tensor var, float bn_eps, Tensor s1, Tensor s2, int count, "
        "bool training) -> Tensor");
  // -> (mean_z, biased cov_z, mean_y, biased var_y) of y = conv1x1(z); zeros for an empty batch.
  m.def("_lateral_moments(Tensor z, Tensor conv_weight) -> (Tensor, Tensor, Tensor, Tensor)");
  // The fused forward with BN (statistics stat_mean, stat_var) folded into the 1x1 weight.
  m.def("_lateral_apply(Tensor coarse, Tensor z, Tensor conv_weight, Tensor bn_weight, "
        "Tensor bn_bias, Tensor stat_mean, Tensor stat_var, float bn_eps, Tensor? w_coarse, "
        "Tensor? w_fine, Tensor? gate_coarse, Tensor? gate_fine, float eps) -> Tensor");
  // -> (A, s, d_gamma, sum_fine): the g z^T pass of the backward.
  m.def("_lateral_grad_sums(Tensor grad_out, Tensor z, Tensor conv_weight, Tensor bn_weight, "
        "Tensor bn_bias, Tensor stat_mean, Tensor stat_var, Tensor mean_z, bool training, "
        "float bn_eps, Tensor? w_coarse, Tensor? w_fine, Tensor? gate_fine, float eps, "
        "bool need_sums) -> (Tensor, Tensor, Tensor, Tensor)");
  // -> (grad_coarse, grad_z, grad_W [C, Cin], grad_w_coarse, grad_w_fine, grad_gate_coarse,
  // grad_gate_fine): the grad_z and grad_coarse passes and the fusion parameters' gradients
  // ([0] where not needed); sum_fine from _lateral_grad_sums.
  m.def("_lateral_grad_inputs(Tensor grad_out, Tensor coarse, Tensor z, Tensor conv_weight, "
        "Tensor bn_weight, Tensor bn_bias, Tensor stat_mean, Tensor stat_var, Tensor mean_z, "
        "Tensor cov_z, Tensor delta_z, Tensor a_sum, Tensor s, Tensor s_all, "
        "Tensor d_gamma_all, Tensor sum_fine, int count_all, bool training, float bn_eps, "
        "Tensor? w_coarse, Tensor? w_fine, Tensor? gate_coarse, Tensor? gate_fine, float eps, "
        "bool need_w_coarse, bool need_w_fine, bool need_gate_coarse, bool need_gate_fine) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_FRAGMENT(litefpn, m) {
  // The instruction set the CPU kernels are picked for (csrc/cpu/common/cpu_isa.h): "default", "avx2"
  // or "avx512"; a kernel family without that variant runs its next narrower one.
  m.def("_cpu_isa() -> str",
        [] { return std::string(litefpn::cpu::cpu_isa_name(litefpn::cpu::cpu_isa())); });
}
