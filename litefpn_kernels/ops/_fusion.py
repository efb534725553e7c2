"""Gradients of the fusion weights and gates, for every op and backend: the only place that turns
the kernels' per-(n, c) sums into them (softplus chain rule)."""
import torch

from ..eager import softplus_terms


def fusion_param_grads(sum_coarse, sum_fine, w_coarse, w_fine, gate_coarse, gate_fine, eps,
                       need):
    """Gradients of (w_coarse, w_fine, gate_coarse, gate_fine) from the per-(n, c) sums.

    sum_coarse[n, c] = sum_hw grad*Up2(coarse), sum_fine[n, c] = sum_hw grad*fine. With
    out = alpha*gc*Up2(coarse) + beta*gf*fine:  d/dgc = alpha*sum_coarse, d/dalpha =
    sum_nc gc*sum_coarse, and alpha, beta = sp_c/D, sp_f/D with D = sp_c + sp_f + eps.
    The (n, c) reductions are torch sums over a fixed shape: deterministic (the second stage of
    the kernels' two-stage reduction).
    """
    need_wc, need_wf, need_gc, need_gf = need
    acc = sum_coarse.dtype
    alpha = beta = None
    if w_coarse is not None:
        sp_c, sp_f, denom = softplus_terms(w_coarse.to(acc), w_fine.to(acc), eps)
        alpha, beta = sp_c / denom, sp_f / denom
    grad_gc = grad_gf = grad_wc = grad_wf = None
    if need_gc:
        grad_gc = (sum_coarse if alpha is None else alpha * sum_coarse).to(gate_coarse.dtype)
    if need_gf:
        grad_gf = (sum_fine if beta is None else beta * sum_fine).to(gate_fine.dtype)
    if need_wc or need_wf:
        t_c = (sum_coarse if gate_coarse is None else sum_coarse * gate_coarse.to(acc)).sum()
        t_f = (sum_fine if gate_fine is None else sum_fine * gate_fine.to(acc)).sum()
        d_sp_c = (t_c * (denom - sp_c) - t_f * sp_f) / (denom * denom)
        d_sp_f = (t_f * (denom - sp_f) - t_c * sp_c) / (denom * denom)
        # d softplus / dw exactly as F.softplus' backward: 1 above the threshold (20).
        dsp = lambda w: torch.where(w > 20, torch.ones_like(w), torch.sigmoid(w))  # noqa: E731
        grad_wc = (d_sp_c * dsp(w_coarse.to(acc))).to(w_coarse.dtype) if need_wc else None
        grad_wf = (d_sp_f * dsp(w_fine.to(acc))).to(w_fine.dtype) if need_wf else None
    return grad_wc, grad_wf, grad_gc, grad_gf
