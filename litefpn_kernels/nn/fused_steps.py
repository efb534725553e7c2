"""The steps of LiteFPN's forward, per backend: `EagerSteps` (the plain modules, the spec) or
`FusedSteps` (the glue on `litefpn_kernels.ops`). `LiteFPN.forward` writes the topology once and
calls these; a backend changes how a step runs, never which steps run.

A step is one of: `lateral(m, x)` (a lateral ConvBN on its own), `smooth(m, x)` (a 3x3
ConvBN + SiLU), `top_down(lateral, fuse, coarse, z, lateral_is_a)` (Fuse of Up2(coarse) and the
lateral of z, one level of the top-down path).
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..backends import compiled, registry
from ..eager import up2
from ..ops._tensor import like_param
from .blocks import ConvBN, CoordGate, Fuse, batch_norm, bn_args, sync_group  # noqa: F401


def coarse_fine(a, b, lateral_is_a: bool):
    """Fuse(A, B) of a top-down level, in the operators' coarse/fine terms: the lateral input
    is `fine`, the upsampled one `coarse`. Maps a pair in (A, B) order to (coarse, fine) order
    (weights, gates) and, being a swap, back again: at the 1/4 level (fuse2) A is the lateral
    (lateral_is_a=True), at the others B is."""
    return (b, a) if lateral_is_a else (a, b)


class EagerSteps:
    """The spec: every step is the plain module."""

    @staticmethod
    def lateral(m: ConvBN, x: Tensor) -> Tensor:
        return m(x)

    smooth = lateral

    @staticmethod
    def top_down(lateral: ConvBN, fuse: Fuse, coarse: Tensor, z: Tensor,
                 lateral_is_a: bool) -> Tensor:
        return fuse(*coarse_fine(up2(coarse), lateral(z), lateral_is_a))


def _autocast_input(t: Tensor) -> Tensor:
    """What an eager convolution would see of `t` under autocast (the fused operators take one
    dtype for all their activations)."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return t.to(torch.get_autocast_dtype(dev))
    return t


class _GradInParamStrides(torch.autograd.Function):
    """Identity on a parameter; its backward hands autograd the gradient in the parameter's
    exact strides. A [C, Cin, 1, 1] weight of a channels_last module has strides (Cin, 1, Cin,
    Cin), and what a backward returns for it is ambiguous in the size-1 dims: on a GPU a fused
    path's 1x1 conv grads came back (Cin, 1, 1, 1) where eager's had the parameter's strides
    (AccumulateGrad keeps either; DDP's bucket views warn about the difference)."""

    @staticmethod
    def forward(param):
        return param.view_as(param)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (param,) = ctx.saved_tensors
        return like_param(grad, param)  # the ops' own parameter-gradient layout rule


def conv_weight(conv: nn.Conv2d) -> Tensor:
    """conv.weight for a functional conv on the fused path: its gradient in its own strides."""
    if not conv.weight.requires_grad or not torch.is_grad_enabled():
        return conv.weight
    return _GradInParamStrides.apply(conv.weight)


def _conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    return F.conv2d(x, conv_weight(conv), conv.bias, conv.stride, conv.padding, conv.dilation,
                    conv.groups)


class FusedSteps:
    """The steps on the fused operators of `backend` (README, "What is fused")."""

    def __init__(self, backend: str):
        self.backend = backend
        # cuda lists bn_silu before _C has its CUDA kernels (csrc/cuda/bn_silu.cu): fuse once it has
        self.fused_bn_silu = registry.has_kernels("bn_silu", backend) and (
            backend != "cuda" or ("bn_silu", "CUDA") in compiled.COMPILED_FOR)

    @staticmethod
    def lateral(m: ConvBN, x: Tensor) -> Tensor:
        return FusedSteps._conv_bn(m, x, fused_bn_silu=None)

    def smooth(self, m: ConvBN, x: Tensor) -> Tensor:
        return self._conv_bn(m, x, self.backend if self.fused_bn_silu else None)

    @staticmethod
    def _conv_bn(m: ConvBN, x: Tensor, fused_bn_silu) -> Tensor:
        """ConvBN on the fused path. Training BatchNorm + SiLU (the smooths) runs as one `bn_silu`
        on backend `fused_bn_silu` (None: not fused; no stored BN output otherwise); eval
        BatchNorm is folded into the convolution (one pass instead of two), and without autograd
        the SiLU then runs in place."""
        bn, silu = m.bn, isinstance(m.act, nn.SiLU)
        if bn.training or bn.running_mean is None:
            if silu and fused_bn_silu is not None:
                group = sync_group(bn)  # before bn_args: nn.SyncBatchNorm's order
                running_mean, running_var, training, momentum = bn_args(bn)
                return ops.bn_silu(_conv(m.conv, x), bn.weight, bn.bias, running_mean,
                                   running_var, training, momentum, bn.eps,
                                   backend=fused_bn_silu, process_group=group)
            # ConvBN.forward; a SyncBatchNorm synchronises there (blocks.batch_norm)
            return m.act(batch_norm(bn, _conv(m.conv, x)))
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        conv = m.conv
        weight = conv_weight(conv) * scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype)
        bias = (bn.bias - bn.running_mean * scale).to(conv.weight.dtype)
        y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        if silu and not torch.is_grad_enabled():
            return F.silu(y, inplace=True)
        return m.act(y)

    def top_down(self, lateral: ConvBN, fuse: Fuse, coarse: Tensor, z: Tensor,
                 lateral_is_a: bool) -> Tensor:
        """fuse(Up2(coarse), lateral(z)) (A/B per `coarse_fine`) on the fused operators; the
        fusion weights and gates stay attached to the input the spec gives them.

        No gate: one lateral_up2_fuse. SE gate: the gate needs GAP of the lateral's BN output
        before the fused epilogue, so the lateral runs as conv + BN and up2_fuse does Up2 +
        gates + weights (GAP(Up2 x) = GAP(x), so the upsampled map is still never written).
        Coord gate (spatial, not per-channel): plain composition.
        """
        if isinstance(fuse.gate, CoordGate):
            return fuse(*coarse_fine(up2(coarse), self.lateral(lateral, z), lateral_is_a))
        w_up = w_lat = None
        if fuse.fuse == "weighted":
            w_up, w_lat = coarse_fine(fuse.weight_a, fuse.weight_b, lateral_is_a)
        if fuse.gate is None:
            bn = lateral.bn
            group = sync_group(bn)
            running_mean, running_var, training, momentum = bn_args(bn)
            return ops.lateral_up2_fuse(
                coarse, _autocast_input(z), lateral.conv.weight, bn.weight, bn.bias, running_mean,
                running_var, training, momentum, bn.eps, w_up, w_lat, eps=fuse.eps,
                backend=self.backend, process_group=group)
        lat = self.lateral(lateral, z)
        g_up, g_lat = coarse_fine(*fuse.gate.gates(*coarse_fine(coarse, lat, lateral_is_a)),
                                  lateral_is_a)
        return ops.up2_fuse(coarse, lat, w_up, w_lat, eps=fuse.eps, gate_coarse=g_up,
                            gate_fine=g_lat, backend=self.backend)


def steps_for(backend: str):
    """The step set of a resolved backend name."""
    return EagerSteps if backend == "eager" else FusedSteps(backend)
