"""Gradients of the fusion weights and gates, for every op and backend: the only place that turns
the kernels' per-(n, c) sums into them (softplus chain rule)."""
import torch
import torch.nn.functional as F


def fusion_coefs(w_coarse, w_fine, eps, acc):
    """(alpha, beta) as one [2] tensor in `acc`: eager.fusion_weights' values, as a vector."""
    return _softplus_parts(w_coarse, w_fine, eps, acc)[2]


def _softplus_parts(w_coarse, w_fine, eps, acc):
    """-> (w, sp, coefs, denom): the weights as one [2] vector, their softplus, sp / denom and
    denom = sum(sp) + eps. One small op per step: a fused call's glue is what costs at small
    sizes."""
    w = torch.cat((w_coarse, w_fine)).to(acc)
    sp = F.softplus(w)
    denom = sp.sum() + eps
    return w, sp, sp / denom, denom


def fusion_param_grads(sum_coarse, sum_fine, w_coarse, w_fine, gate_coarse, gate_fine, eps,
                       need):
    """Gradients of (w_coarse, w_fine, gate_coarse, gate_fine) from the per-(n, c) sums.

    sum_coarse[n, c] = sum_hw grad*Up2(coarse), sum_fine[n, c] = sum_hw grad*fine. With
    out = alpha*gc*Up2(coarse) + beta*gf*fine:  d/dgc = alpha*sum_coarse, and with
    (alpha, beta) = sp/D, sp = softplus((w_coarse, w_fine)), D = sum(sp) + eps and
    t = (sum_nc gc*sum_coarse, sum_nc gf*sum_fine):  d/dsp = (t*D - t.sp)/D^2, then softplus'
    own backward. The (n, c) reductions are torch sums over a fixed shape: deterministic (the
    second stage of the kernels' two-stage reduction).
    """
    need_wc, need_wf, need_gc, need_gf = need
    acc = sum_coarse.dtype
    coefs = None
    if w_coarse is not None:
        w, sp, coefs, denom = _softplus_parts(w_coarse, w_fine, eps, acc)  # coefs: alpha, beta
    grad_gc = grad_gf = grad_wc = grad_wf = None
    # (copies, never views of the sums or of each other: a custom op's outputs may not alias)
    if need_gc:
        grad_gc = (sum_coarse.to(gate_coarse.dtype, copy=True) if coefs is None
                   else (coefs[0] * sum_coarse).to(gate_coarse.dtype))
    if need_gf:
        grad_gf = (sum_fine.to(gate_fine.dtype, copy=True) if coefs is None
                   else (coefs[1] * sum_fine).to(gate_fine.dtype))
    if need_wc or need_wf:
        t = torch.stack((sum_coarse if gate_coarse is None else sum_coarse * gate_coarse.to(acc),
                         sum_fine if gate_fine is None else sum_fine * gate_fine.to(acc)))
        t = t.sum((1, 2))
        d_sp = (t * denom - (t * sp).sum()) / (denom * denom)
        # F.softplus' backward itself (beta 1, threshold 20): eager's gradient, bit for bit
        grad_w = torch.ops.aten.softplus_backward(d_sp, w, 1, 20)
        grad_wc = grad_w[:1].to(w_coarse.dtype, copy=True) if need_wc else None
        grad_wf = grad_w[1:].to(w_fine.dtype, copy=True) if need_wf else None
    return grad_wc, grad_wf, grad_gc, grad_gf
