"""The passes of bn_silu, lateral_up2_fuse and up2_fuse's backward: one kernel with BatchNorm's
[C]- and [C, Cin]-sized math, or the fusion weights' chain rule, around it. For the GPU backends
(`cuda`, `triton`) and the tests' `contract` backend, whose kernels are launched from Python.
The `cpu` backend runs the same formulas in C++ (csrc/cpu/passes.cpp, the same names, the same
order of operations), so that a pass is one call from Python.

Each function takes a backend's kernels (the contracts of csrc/ops.cpp) and `steps`, the small
math: `_steps` (PyTorch ops, the reference) or `litefpn_kernels.triton.steps` (the same
functions as a launch or two each, what the GPU backends use); it returns the op's kernel set
(`registry.Up2FuseKernels`, `BnSiluKernels`, `LateralUp2FuseKernels`).
tests/ops/test_passes.py compares the C++ passes and the Triton steps with the PyTorch steps.
"""
import torch

from ..backends import registry
from . import _steps
from ._batch_norm import count
from ._tensor import acc_dtype, sum_shape, to_acc_contiguous


def _no_autocast(fn):
    """A pass runs its math in the accumulation dtype: under autocast, torch.mm / torch.mv would
    run in the autocast dtype (the public ops handle autocast at their inputs)."""
    def pass_(*args):
        with torch.autocast(args[0].device.type, enabled=False):
            return fn(*args)
    return pass_


# ----------------------------------------------------------------------------- up2_fuse
def up2_fuse(fwd, bwd, steps=_steps):
    def grad(grad_out, coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, eps, *need):
        acc = acc_dtype(fine.dtype)
        if fine.numel() == 0:
            sums = fine.new_zeros(sum_shape(coarse, any(need)), dtype=acc)
            grad_coarse, grad_fine, sum_coarse, sum_fine = (
                torch.zeros_like(coarse), torch.zeros_like(fine), sums, sums)
        else:
            grad_coarse, grad_fine, sum_coarse, sum_fine = bwd(
                grad_out, coarse, fine, to_acc_contiguous(w_coarse, acc),
                to_acc_contiguous(w_fine, acc), to_acc_contiguous(gate_coarse, acc),
                to_acc_contiguous(gate_fine, acc), eps, any(need))
        return (grad_coarse, grad_fine, *steps.fusion_grads(
            need, sum_coarse, sum_fine, w_coarse, w_fine, gate_coarse, gate_fine, eps))

    return registry.Up2FuseKernels(fwd=fwd, grad=_no_autocast(grad))


# ----------------------------------------------------------------------------- bn_silu
def bn_silu(stats, fwd, bwd_sums, bwd, steps=_steps):
    def moments(x):
        acc = acc_dtype(x.dtype)
        if x.numel() == 0:
            zeros = x.new_zeros((x.shape[1],), dtype=acc)
            return zeros, zeros.clone()
        center = steps.pilot(x, acc)
        s1, s2 = stats(x, center)
        return steps.moments(s1, s2, center, count(x))

    def apply(x, bn_weight, bn_bias, mean, var, bn_eps):
        scale, shift, _ = steps.bn_affine(bn_weight, bn_bias, mean, var, bn_eps,
                                          acc_dtype(x.dtype))
        return fwd(x, scale, shift)

    def grad_sums(grad_out, x, bn_weight, bn_bias, mean, var, bn_eps):
        acc = acc_dtype(x.dtype)
        scale, shift, r = steps.bn_affine(bn_weight, bn_bias, mean, var, bn_eps, acc)
        if x.numel() == 0:
            return torch.zeros_like(scale), torch.zeros_like(scale), torch.zeros_like(scale)
        s1, s2 = bwd_sums(grad_out, x, scale, shift, to_acc_contiguous(mean, acc))
        return s1, s2, r * s2

    def grad_x(grad_out, x, bn_weight, bn_bias, mean, var, bn_eps, s1, s2, n, training):
        if x.numel() == 0:
            return torch.zeros_like(x)
        scale, shift, k_x, k_0 = steps.bn_grad_coefs(bn_weight, bn_bias, mean, var, bn_eps, s1,
                                                     s2, n, training, acc_dtype(x.dtype))
        return bwd(grad_out, x, scale, shift, scale, k_x, k_0)

    return registry.BnSiluKernels(*map(_no_autocast, (moments, apply, grad_sums, grad_x)))


# ----------------------------------------------------------------------------- lateral_up2_fuse
def lateral_up2_fuse(gram, fwd, grad_z, bwd_coarse, steps=_steps):
    def moments(z, conv_weight):
        acc = acc_dtype(z.dtype)
        c_in = z.shape[1]
        if z.numel() == 0:
            mean_z = z.new_zeros((c_in,), dtype=acc)
            cov_z = z.new_zeros((c_in, c_in), dtype=acc)
        else:
            center = steps.pilot(z, acc)
            g, colsum = gram(z, z, center, center)
            mean_z, cov_z = steps.gram_moments(g, colsum, center, count(z))
        return (mean_z, cov_z, *steps.y_moments(steps.weight2d(conv_weight, acc), mean_z, cov_z))

    def apply(coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, bn_eps, w_coarse,
              w_fine, gate_coarse, gate_fine, eps):
        acc = acc_dtype(z.dtype)
        scaled_w, shift = steps.fold_weight(steps.weight2d(conv_weight, acc), bn_weight, bn_bias,
                                            stat_mean, stat_var, bn_eps)
        return fwd(coarse, z, scaled_w, shift, to_acc_contiguous(w_coarse, acc),
                   to_acc_contiguous(w_fine, acc), to_acc_contiguous(gate_coarse, acc),
                   to_acc_contiguous(gate_fine, acc), eps)

    def centre(z, mean_z, training, acc):
        """zc, the centre of z's sums in the backward: mean_z in training, a pilot of z in eval
        (an empty batch has no pilot value, and no sums to centre)."""
        if training:
            return to_acc_contiguous(mean_z, acc)
        return steps.pilot(z, acc) if z.numel() else z.new_zeros((z.shape[1],), dtype=acc)

    def grad_sums(grad_out, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z,
                  training, bn_eps, w_coarse, w_fine, gate_fine, eps, need_sums):
        acc = acc_dtype(z.dtype)
        n, c, c_in = z.shape[0], conv_weight.shape[0], conv_weight.shape[1]
        if z.numel() == 0:
            new = lambda *shape: z.new_zeros(shape, dtype=acc)  # noqa: E731
            return new(c, c_in), new(c), new(c), new(*((n, c) if need_sums else (0,)))
        zc = centre(z, mean_z, training, acc)
        a_n, s_n = gram(grad_out, z, None, zc)
        return steps.lateral_grad_sums(a_n, s_n, steps.weight2d(conv_weight, acc), bn_weight,
                                       bn_bias, stat_mean, stat_var, bn_eps, zc, w_coarse, w_fine,
                                       gate_fine, eps, need_sums)

    def grad_inputs(grad_out, coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var,
                    mean_z, cov_z, delta_z, a_sum, s, s_all, d_gamma_all, sum_fine, count_all,
                    training, bn_eps, w_coarse, w_fine, gate_coarse, gate_fine, eps, *need):
        acc = acc_dtype(z.dtype)
        c, c_in = conv_weight.shape[0], conv_weight.shape[1]
        need_sums = any(need)
        if z.numel() == 0:
            grad_coarse, gz = torch.zeros_like(coarse), torch.zeros_like(z)
            grad_w = z.new_zeros((c, c_in), dtype=acc)
            sum_coarse = z.new_zeros(sum_shape(coarse, need_sums), dtype=acc)
        else:
            grad_w, scaled_w, quad, shift = steps.lateral_grad_weights(
                steps.weight2d(conv_weight, acc), bn_weight, bn_bias, stat_mean, stat_var,
                bn_eps, centre(z, mean_z, training, acc), cov_z, delta_z, a_sum, s, s_all,
                d_gamma_all, count(z) / count_all if training else 1.0, count_all, training)
            m = steps.fine_factor(z.shape[0], c, w_coarse, w_fine, gate_fine, eps, acc, z.device)
            gz = grad_z(grad_out, z, scaled_w, m, quad, shift)
            grad_coarse, sum_coarse = bwd_coarse(
                grad_out, coarse, to_acc_contiguous(w_coarse, acc),
                to_acc_contiguous(w_fine, acc), to_acc_contiguous(gate_coarse, acc), eps,
                need_sums)
        return (grad_coarse, gz, grad_w, *steps.fusion_grads(
            need, sum_coarse, sum_fine, w_coarse, w_fine, gate_coarse, gate_fine, eps))

    return registry.LateralUp2FuseKernels(
        *map(_no_autocast, (moments, apply, grad_sums, grad_inputs)))
