"""The `eager` backend: the spec's math as plain PyTorch compositions, written once.

`litefpn_kernels.nn` (the module's eager steps) and the public operators in `litefpn_kernels.ops`
(`backend="eager"`) both use these, so there is exactly one definition of Up2, of the
softplus-normalised fusion weights and of each operator's composition. Every fused backend is
tested against these functions.
"""
from typing import Optional, Tuple

import torch.nn.functional as F
from torch import Tensor

#: eps of the BiFPN-style weight normalisation (spec: 1e-4).
FUSION_EPS = 1e-4


def up2(x: Tensor) -> Tensor:
    """Bilinear 2x upsampling exactly as the spec fixes it (align_corners=False)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def softplus_terms(w_a: Tensor, w_b: Tensor, eps: float = FUSION_EPS
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """(sp(w_a), sp(w_b), sp(w_a) + sp(w_b) + eps): the pieces of `fusion_weights`, which the
    fusion-weight gradients (`ops/_fusion.py`) also need."""
    sp_a, sp_b = F.softplus(w_a), F.softplus(w_b)
    return sp_a, sp_b, sp_a + sp_b + eps


def fusion_weights(w_a: Tensor, w_b: Tensor, eps: float = FUSION_EPS) -> Tuple[Tensor, Tensor]:
    """softplus-normalised weights: sp(w_a)/(sp(w_a)+sp(w_b)+eps), and likewise for w_b."""
    sp_a, sp_b, denom = softplus_terms(w_a, w_b, eps)
    return sp_a / denom, sp_b / denom


def up2_fuse(coarse: Tensor, fine: Tensor, w_coarse: Optional[Tensor] = None,
             w_fine: Optional[Tensor] = None, eps: float = FUSION_EPS,
             gate_coarse: Optional[Tensor] = None, gate_fine: Optional[Tensor] = None) -> Tensor:
    """The `up2_fuse` operator as a plain composition: alpha*gc*Up2(coarse) + beta*gf*fine.

    Computed in the input dtype's natural PyTorch promotion, then returned in `fine`'s dtype
    (the fused kernels accumulate in fp32 and write the input dtype; the [1]-shaped fp32
    weights must not widen a bf16 activation to fp32).
    """
    a, b = up2(coarse), fine
    if gate_coarse is not None:
        a = a * gate_coarse[:, :, None, None]
    if gate_fine is not None:
        b = b * gate_fine[:, :, None, None]
    if w_coarse is not None:
        alpha, beta = fusion_weights(w_coarse, w_fine, eps)
        a, b = alpha * a, beta * b
    return (a + b).to(fine.dtype)


def lateral_up2_fuse(coarse: Tensor, z: Tensor, conv_weight: Tensor,
                     bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                     running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     training: bool, momentum: float = 0.1, bn_eps: float = 1e-5,
                     w_coarse: Optional[Tensor] = None, w_fine: Optional[Tensor] = None,
                     eps: float = FUSION_EPS, gate_coarse: Optional[Tensor] = None,
                     gate_fine: Optional[Tensor] = None) -> Tensor:
    """One top-down level as a plain composition: up2_fuse(coarse, BN(conv1x1(z)))."""
    y = F.batch_norm(F.conv2d(z, conv_weight), running_mean, running_var, bn_weight, bn_bias,
                     training, momentum, bn_eps)
    return up2_fuse(coarse, y, w_coarse, w_fine, eps, gate_coarse, gate_fine)


def bn_silu(x: Tensor, bn_weight: Tensor, bn_bias: Tensor, running_mean: Optional[Tensor],
            running_var: Optional[Tensor], training: bool, momentum: float = 0.1,
            bn_eps: float = 1e-5) -> Tensor:
    """SiLU(BatchNorm2d(x)) with F.batch_norm's semantics (running statistics updated in place)."""
    return F.silu(F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training,
                               momentum, bn_eps))
