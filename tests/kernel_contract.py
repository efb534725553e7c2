"""The lateral and bn_silu kernels' contracts (csrc/ops.cpp) as float64 PyTorch, for testing the operator's
glue math (statistics, BN folding, chain rule in ops.py) apart from any compiled kernel.

Installed in place of a backend's kernels with `use_contract(monkeypatch)`.
"""
import torch

from litefpn_kernels import ops
from litefpn_kernels.functional import up2, up2_fuse_reference


def _acc(t):
    return ops.acc_dtype(t.dtype)


def _fmt(t):
    cl = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def gram(a, b, a_center, b_center):
    a64, b64 = a.double(), b.double()
    if a_center is not None:
        a64 = a64 - a_center.double()[:, None, None]
    if b_center is not None:
        b64 = b64 - b_center.double()[:, None, None]
    return (torch.einsum("nihw,njhw->nij", a64, b64).to(_acc(a)),
            a64.sum((2, 3)).to(_acc(a)))


def fwd(coarse, z, weight, bias, w_coarse, w_fine, gate_coarse, gate_fine, eps):
    y = torch.einsum("ck,nkhw->nchw", weight.double(), z.double()) + bias.double()[:, None, None]
    d = lambda t: None if t is None else t.double()  # noqa: E731
    out = up2_fuse_reference(coarse.double(), y, d(w_coarse), d(w_fine), eps, d(gate_coarse),
                             d(gate_fine))
    return out.to(z.dtype).contiguous(memory_format=_fmt(z))


def grad_z(grad_out, z, weight, scale, quad, shift):
    g = grad_out.double()
    if scale is not None:
        g = g * scale.double()[:, :, None, None]
    out = torch.einsum("ck,nchw->nkhw", weight.double(), g)
    if quad is not None:
        out = out - torch.einsum("kj,njhw->nkhw", quad.double(), z.double())
    if shift is not None:
        out = out + shift.double()[:, None, None]
    return torch.empty_like(z).copy_(out)


def bwd_coarse(grad_out, coarse, w_coarse, w_fine, gate_coarse, eps, need_sum):
    g = grad_out.double()
    up = up2(coarse.double())
    # Up2^T by eager's own backward kernel (autograd is off inside a custom op)
    grad = torch.ops.aten.upsample_bilinear2d_backward(
        g, list(g.shape[2:]), list(coarse.shape), False, 2.0, 2.0)
    coef = torch.ones(coarse.shape[:2], dtype=torch.float64, device=coarse.device)
    if gate_coarse is not None:
        coef = coef * gate_coarse.double()
    if w_coarse is not None:
        sp_c = torch.nn.functional.softplus(w_coarse.double())
        sp_f = torch.nn.functional.softplus(w_fine.double())
        coef = coef * sp_c / (sp_c + sp_f + eps)
    grad = torch.empty_like(coarse).copy_(grad * coef[:, :, None, None])
    acc = _acc(coarse)
    sums = (g * up.detach()).sum((2, 3)).to(acc) if need_sum else coarse.new_empty((0,), dtype=acc)
    return grad, sums


def _per_c(v):
    return v.double()[:, None, None]


def _bn_silu_dz(grad_out, x, scale, shift):
    a = x.double() * _per_c(scale) + _per_c(shift)
    s = torch.sigmoid(a)
    return grad_out.double() * s * (1 + a * (1 - s))


def bn_silu_stats(x, center):
    v = x.double() - _per_c(center)
    return v.sum((0, 2, 3)).to(_acc(x)), (v * v).sum((0, 2, 3)).to(_acc(x))


def bn_silu_fwd(x, scale, shift):
    y = torch.nn.functional.silu(x.double() * _per_c(scale) + _per_c(shift))
    return y.to(x.dtype).contiguous(memory_format=_fmt(x))


def bn_silu_bwd_sums(grad_out, x, scale, shift, center):
    dz = _bn_silu_dz(grad_out, x, scale, shift)
    return (dz.sum((0, 2, 3)).to(_acc(x)),
            (dz * (x.double() - _per_c(center))).sum((0, 2, 3)).to(_acc(x)))


def bn_silu_bwd(grad_out, x, scale, shift, k_dz, k_x, k_0):
    dz = _bn_silu_dz(grad_out, x, scale, shift)
    g = dz * _per_c(k_dz) + x.double() * _per_c(k_x) + _per_c(k_0)
    return g.to(x.dtype).contiguous(memory_format=_fmt(x))


class _Contract:
    gram, fwd, grad_z, bwd_coarse = staticmethod(gram), staticmethod(fwd), \
        staticmethod(grad_z), staticmethod(bwd_coarse)


class _BnSiluContract:
    stats, fwd, bwd_sums, bwd = staticmethod(bn_silu_stats), staticmethod(bn_silu_fwd), \
        staticmethod(bn_silu_bwd_sums), staticmethod(bn_silu_bwd)


def use_contract(monkeypatch):
    """Every backend's lateral and bn_silu kernels become the float64 contracts above."""
    monkeypatch.setattr(ops, "_lateral_kernels", lambda backend: _Contract)
    monkeypatch.setattr(ops, "_bn_silu_kernels", lambda backend: _BnSiluContract)
