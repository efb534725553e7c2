"""The passes of bn_silu, lateral_up2_fuse and up2_fuse's backward in PyTorch: one kernel with
BatchNorm's [C]- and [C, Cin]-sized math, or the fusion weights' chain rule, around it. For the
GPU backends (`cuda`, `triton`) and the tests' `contract` backend, whose kernels are launched
from Python. The `cpu` backend runs the same formulas in C++ (csrc/cpu/passes.cpp, the same
names, the same order of operations), so that a pass is one call from Python;
tests/ops/test_passes.py compares the two.

Each function takes a backend's kernels (the contracts of csrc/ops.cpp) and returns the op's
kernel set (`registry.Up2FuseKernels`, `BnSiluKernels`, `LateralUp2FuseKernels`).
"""
import torch

from ..backends import registry
from ._batch_norm import centred_moments, count, pilot
from ._fusion import fusion_coefs, fusion_param_grads
from ._tensor import acc_dtype, sum_shape, to_acc_contiguous


def affine(bn_weight, bn_bias, mean, var, bn_eps, acc):
    """(scale, shift, r) with BN(x) = x*scale + shift, r = 1/sqrt(var + eps)."""
    r = torch.rsqrt(to_acc_contiguous(var, acc) + bn_eps)
    scale = (to_acc_contiguous(bn_weight, acc) * r).contiguous()
    return scale, (to_acc_contiguous(bn_bias, acc)
                   - to_acc_contiguous(mean, acc) * scale).contiguous(), r


def weight2d(conv_weight, acc):
    return to_acc_contiguous(conv_weight.reshape(conv_weight.shape[0], conv_weight.shape[1]), acc)


def fine_factor(n, c, w_coarse, w_fine, gate_fine, eps, acc, device):
    """m[n, c] = beta*gate_fine, the factor on BN's output in the fused sum ([N, C],
    contiguous)."""
    if w_coarse is None:
        return (to_acc_contiguous(gate_fine, acc) if gate_fine is not None
                else torch.ones((n, c), dtype=acc, device=device))
    beta = fusion_coefs(w_coarse, w_fine, eps, acc)[1]
    return (beta.expand(n, c) if gate_fine is None else gate_fine.to(acc) * beta).contiguous()


def _no_autocast(fn):
    """A pass runs its math in the accumulation dtype: under autocast, torch.mm / torch.mv would
    run in the autocast dtype (the public ops handle autocast at their inputs)."""
    def pass_(*args):
        with torch.autocast(args[0].device.type, enabled=False):
            return fn(*args)
    return pass_


def _param_grads(need, sum_coarse, sum_fine, w_coarse, w_fine, gate_coarse, gate_fine, eps,
                 empty):
    """The fusion parameters' gradients, an `empty` [0] where not needed."""
    grads = (None,) * 4
    if any(need):
        grads = fusion_param_grads(sum_coarse, sum_fine, w_coarse, w_fine, gate_coarse,
                                   gate_fine, eps, need)
    return tuple(empty() if g is None else g for g in grads)


# ----------------------------------------------------------------------------- up2_fuse
def up2_fuse(fwd, bwd):
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
        return (grad_coarse, grad_fine, *_param_grads(
            need, sum_coarse, sum_fine, w_coarse, w_fine, gate_coarse, gate_fine, eps,
            lambda: fine.new_empty((0,), dtype=acc)))

    return registry.Up2FuseKernels(fwd=fwd, grad=_no_autocast(grad))


# ----------------------------------------------------------------------------- bn_silu
def bn_silu(stats, fwd, bwd_sums, bwd):
    def moments(x):
        acc = acc_dtype(x.dtype)
        if x.numel() == 0:
            zeros = x.new_zeros((x.shape[1],), dtype=acc)
            return zeros, zeros.clone()
        center = pilot(x, acc)
        s1, s2 = stats(x, center)
        return centred_moments(s1, s2, center, count(x))

    def apply(x, bn_weight, bn_bias, mean, var, bn_eps):
        scale, shift, _ = affine(bn_weight, bn_bias, mean, var, bn_eps, acc_dtype(x.dtype))
        return fwd(x, scale, shift)

    def grad_sums(grad_out, x, bn_weight, bn_bias, mean, var, bn_eps):
        acc = acc_dtype(x.dtype)
        scale, shift, r = affine(bn_weight, bn_bias, mean, var, bn_eps, acc)
        if x.numel() == 0:
            return torch.zeros_like(scale), torch.zeros_like(scale), torch.zeros_like(scale)
        s1, s2 = bwd_sums(grad_out, x, scale, shift, to_acc_contiguous(mean, acc))
        return s1, s2, r * s2

    def grad_x(grad_out, x, bn_weight, bn_bias, mean, var, bn_eps, s1, s2, n, training):
        if x.numel() == 0:
            return torch.zeros_like(x)
        acc = acc_dtype(x.dtype)
        scale, shift, r = affine(bn_weight, bn_bias, mean, var, bn_eps, acc)
        if training:  # grad_x = scale*(dz - s1/n - (x - mean)*r^2*s2/n)
            k_x = scale * r * r * s2 / -n
            k_0 = -to_acc_contiguous(mean, acc) * k_x - scale * s1 / n
        else:
            k_x = k_0 = torch.zeros_like(scale)
        return bwd(grad_out, x, scale, shift, scale, k_x, k_0)

    return registry.BnSiluKernels(*map(_no_autocast, (moments, apply, grad_sums, grad_x)))


# ----------------------------------------------------------------------------- lateral_up2_fuse
def lateral_up2_fuse(gram, fwd, grad_z, bwd_coarse):
    def moments(z, conv_weight):
        acc = acc_dtype(z.dtype)
        c_in = z.shape[1]
        if z.numel() == 0:
            mean_z = z.new_zeros((c_in,), dtype=acc)
            cov_z = z.new_zeros((c_in, c_in), dtype=acc)
        else:
            center = pilot(z, acc)
            g, colsum = gram(z, z, center, center)
            n = count(z)
            d = colsum.sum(0) / n
            cov_z = g.sum(0) / n - torch.outer(d, d)
            mean_z = center + d
        w = weight2d(conv_weight, acc)
        return mean_z, cov_z, torch.mv(w, mean_z), (torch.mm(w, cov_z) * w).sum(1).clamp_min(0)

    def apply(coarse, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, bn_eps, w_coarse,
              w_fine, gate_coarse, gate_fine, eps):
        acc = acc_dtype(z.dtype)
        scale, shift, _ = affine(bn_weight, bn_bias, stat_mean, stat_var, bn_eps, acc)
        return fwd(coarse, z, (scale[:, None] * weight2d(conv_weight, acc)).contiguous(), shift,
                   to_acc_contiguous(w_coarse, acc), to_acc_contiguous(w_fine, acc),
                   to_acc_contiguous(gate_coarse, acc), to_acc_contiguous(gate_fine, acc), eps)

    def folded(z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z, training, bn_eps,
               w_coarse, w_fine, gate_fine, eps):
        """(W, W' = diag(gamma r) W, gamma*r, BN's folded shift, r, m, zc): the operands both
        backward passes share; zc is the centre of z's sums (mean_z in training, a pilot of z
        in eval)."""
        acc = acc_dtype(z.dtype)
        weight = weight2d(conv_weight, acc)
        gamma_r, shift, r = affine(bn_weight, bn_bias, stat_mean, stat_var, bn_eps, acc)
        m = fine_factor(z.shape[0], conv_weight.shape[0], w_coarse, w_fine, gate_fine, eps, acc,
                        z.device)
        if training:
            zc = to_acc_contiguous(mean_z, acc)
        else:  # an empty batch has no pilot value (and no sums to centre)
            zc = pilot(z, acc) if z.numel() else z.new_zeros((z.shape[1],), dtype=acc)
        return weight, gamma_r[:, None] * weight, gamma_r, shift, r, m, zc

    def grad_sums(grad_out, z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z,
                  training, bn_eps, w_coarse, w_fine, gate_fine, eps, need_sums):
        acc = acc_dtype(z.dtype)
        n, c, c_in = z.shape[0], conv_weight.shape[0], conv_weight.shape[1]
        if z.numel() == 0:
            new = lambda *shape: z.new_zeros(shape, dtype=acc)  # noqa: E731
            return new(c, c_in), new(c), new(c), new(*((n, c) if need_sums else (0,)))
        weight, scaled_w, _, shift, r, m, zc = folded(
            z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z, training, bn_eps,
            w_coarse, w_fine, gate_fine, eps)
        mean_y = to_acc_contiguous(stat_mean, acc)
        a_n, s_n = gram(grad_out, z, None, zc)
        a_sum = (m[:, :, None] * a_n).sum(0)  # [N, C, Cin], [N, C] -> [C, Cin]
        s = (m * s_n).sum(0)
        d_gamma = r * ((weight * a_sum).sum(1) + (torch.mv(weight, zc) - mean_y) * s)
        if need_sums:  # sum_p g * BN(conv(z)) = rowsum(W' o A_n) + (W' zc + b') * s_n
            sum_fine = (scaled_w * a_n).sum(2) + (torch.mv(scaled_w, zc) + shift) * s_n
        else:
            sum_fine = z.new_empty((0,), dtype=acc)
        return a_sum, s, d_gamma, sum_fine

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
            weight, scaled_w, gamma_r, _, r, m, zc = folded(
                z, conv_weight, bn_weight, bn_bias, stat_mean, stat_var, mean_z, training,
                bn_eps, w_coarse, w_fine, gate_fine, eps)
            if training:
                frac = count(z) / count_all
                grad_w = a_sum - (d_gamma_all * r * frac)[:, None] * torch.mm(weight, cov_z)
                if delta_z.numel() > 0:
                    grad_w = grad_w - torch.outer(s_all * frac, delta_z)
                    local_dy = (s - frac * s_all
                                - frac * r * d_gamma_all * torch.mv(weight, delta_z))
                    grad_w = grad_w + torch.outer(local_dy, zc)
                grad_w = gamma_r[:, None] * grad_w
                quad = torch.mm(weight.t(),
                                (gamma_r * r * d_gamma_all / count_all)[:, None] * weight)
                shift = torch.mv(quad, zc) - torch.mv(scaled_w.t(), s_all) / count_all
                gz = grad_z(grad_out, z, scaled_w, m, quad.contiguous(), shift.contiguous())
            else:
                grad_w = gamma_r[:, None] * (a_sum + torch.outer(s, zc))
                gz = grad_z(grad_out, z, scaled_w, m, None, None)
            grad_coarse, sum_coarse = bwd_coarse(
                grad_out, coarse, to_acc_contiguous(w_coarse, acc),
                to_acc_contiguous(w_fine, acc), to_acc_contiguous(gate_coarse, acc), eps,
                need_sums)
        return (grad_coarse, gz, grad_w, *_param_grads(
            need, sum_coarse, sum_fine, w_coarse, w_fine, gate_coarse, gate_fine, eps,
            lambda: z.new_empty((0,), dtype=acc)))

    return registry.LateralUp2FuseKernels(
        *map(_no_autocast, (moments, apply, grad_sums, grad_inputs)))
