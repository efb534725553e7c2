"""The kernels' contracts (csrc/ops.cpp) as float64 PyTorch, registered as the test-only backend
"contract": the operators' glue math (statistics, BN folding, chain rule in litefpn_kernels.ops)
is then tested apart from any compiled kernel, through the same registry every backend uses
(the passes around the kernels: litefpn_kernels/ops/_passes.py, as for triton).

Importing this module registers the backend (tests/conftest.py does).
"""
import torch
import torch.nn.functional as F

from litefpn_kernels.backends import registry
from litefpn_kernels.eager import fusion_weights, up2, up2_fuse
from litefpn_kernels.ops import _passes
from litefpn_kernels.ops._tensor import acc_dtype, empty_in_format

NAME = "contract"


def _acc(t):
    return acc_dtype(t.dtype)


def _like(t, value):
    """`value` in t's dtype and memory format (the kernels' output rule)."""
    return empty_in_format(t, value.shape).copy_(value)


def _d(t):
    return None if t is None else t.double()


def _per_c(v):
    return v.double()[:, None, None]


# ----------------------------------------------------------------------------- up2_fuse
def up2_fuse_fwd(coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, eps):
    out = up2_fuse(coarse.double(), fine.double(), _d(w_coarse), _d(w_fine), eps, _d(gate_coarse),
                   _d(gate_fine))
    return torch.empty_like(fine).copy_(out)


def _coef(n_c, w_a, w_b, gate, eps, which, device):
    """Per-(n, c) factor alpha*gate_coarse (which=0) or beta*gate_fine (which=1), float64."""
    coef = torch.ones(n_c, dtype=torch.float64, device=device)
    if gate is not None:
        coef = coef * gate.double()
    if w_a is not None:
        coef = coef * fusion_weights(w_a.double(), w_b.double(), eps)[which]
    return coef[:, :, None, None]


def up2_fuse_bwd_coarse(grad_out, coarse, w_coarse, w_fine, gate_coarse, eps, need_sum):
    g = grad_out.double()
    # Up2^T by eager's own backward kernel (autograd is off inside a custom op)
    grad = torch.ops.aten.upsample_bilinear2d_backward(
        g, list(g.shape[2:]), list(coarse.shape), False, 2.0, 2.0)
    grad = torch.empty_like(coarse).copy_(
        grad * _coef(coarse.shape[:2], w_coarse, w_fine, gate_coarse, eps, 0, coarse.device))
    acc = _acc(coarse)
    sums = ((g * up2(coarse.double())).sum((2, 3)).to(acc) if need_sum
            else coarse.new_empty((0,), dtype=acc))
    return grad, sums


def up2_fuse_bwd(grad_out, coarse, fine, w_coarse, w_fine, gate_coarse, gate_fine, eps,
                 need_sums):
    grad_coarse, sum_coarse = up2_fuse_bwd_coarse(grad_out, coarse, w_coarse, w_fine,
                                                  gate_coarse, eps, need_sums)
    g = grad_out.double()
    grad_fine = torch.empty_like(fine).copy_(
        g * _coef(coarse.shape[:2], w_coarse, w_fine, gate_fine, eps, 1, fine.device))
    acc = _acc(fine)
    sum_fine = ((g * fine.double()).sum((2, 3)).to(acc) if need_sums
                else fine.new_empty((0,), dtype=acc))
    return grad_coarse, grad_fine, sum_coarse, sum_fine


# ----------------------------------------------------------------------------- lateral_up2_fuse
def lateral_gram(a, b, a_center, b_center):
    a64, b64 = a.double(), b.double()
    if a_center is not None:
        a64 = a64 - a_center.double()[:, None, None]
    if b_center is not None:
        b64 = b64 - b_center.double()[:, None, None]
    return (torch.einsum("nihw,njhw->nij", a64, b64).to(_acc(a)),
            a64.sum((2, 3)).to(_acc(a)))


def lateral_fwd(coarse, z, weight, bias, w_coarse, w_fine, gate_coarse, gate_fine, eps):
    y = torch.einsum("ck,nkhw->nchw", weight.double(), z.double()) + bias.double()[:, None, None]
    out = up2_fuse(coarse.double(), y, _d(w_coarse), _d(w_fine), eps, _d(gate_coarse),
                   _d(gate_fine))
    return _like(z, out)


def grad_z64(grad_out, z, weight, scale, quad, shift):
    """The `_lateral_grad_z` contract in float64 (the kernel tests compare against this)."""
    g = grad_out.double()
    if scale is not None:
        g = g * scale.double()[:, :, None, None]
    out = torch.einsum("ck,nchw->nkhw", weight.double(), g)
    if quad is not None:
        out = out - torch.einsum("kj,njhw->nkhw", quad.double(), z.double())
    if shift is not None:
        out = out + shift.double()[:, None, None]
    return out


def lateral_grad_z(grad_out, z, weight, scale, quad, shift):
    return torch.empty_like(z).copy_(grad_z64(grad_out, z, weight, scale, quad, shift))


# ----------------------------------------------------------------------------- bn_silu
def _bn_silu_dz(grad_out, x, scale, shift):
    a = x.double() * _per_c(scale) + _per_c(shift)
    s = torch.sigmoid(a)
    return grad_out.double() * s * (1 + a * (1 - s))


def bn_silu_stats(x, center):
    v = x.double() - _per_c(center)
    return v.sum((0, 2, 3)).to(_acc(x)), (v * v).sum((0, 2, 3)).to(_acc(x))


def bn_silu_fwd(x, scale, shift):
    return _like(x, F.silu(x.double() * _per_c(scale) + _per_c(shift)))


def bn_silu_bwd_sums(grad_out, x, scale, shift, center):
    dz = _bn_silu_dz(grad_out, x, scale, shift)
    return (dz.sum((0, 2, 3)).to(_acc(x)),
            (dz * (x.double() - _per_c(center))).sum((0, 2, 3)).to(_acc(x)))


def bn_silu_bwd(grad_out, x, scale, shift, k_dz, k_x, k_0):
    dz = _bn_silu_dz(grad_out, x, scale, shift)
    return _like(x, dz * _per_c(k_dz) + x.double() * _per_c(k_x) + _per_c(k_0))


# ----------------------------------------------------------------------------- registration
registry.register_backend(NAME, lambda op, device: None)


@registry.register("up2_fuse", NAME)
def _():
    return _passes.up2_fuse(fwd=up2_fuse_fwd, bwd=up2_fuse_bwd)


@registry.register("lateral_up2_fuse", NAME)
def _():
    return _passes.lateral_up2_fuse(gram=lateral_gram, fwd=lateral_fwd, grad_z=lateral_grad_z,
                                    bwd_coarse=up2_fuse_bwd_coarse)


@registry.register("bn_silu", NAME)
def _():
    return _passes.bn_silu(stats=bn_silu_stats, fwd=bn_silu_fwd, bwd_sums=bn_silu_bwd_sums,
                           bwd=bn_silu_bwd)
