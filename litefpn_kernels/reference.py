"""LiteFPN-128c, the neck of Lite-HRNet-18, in plain PyTorch: the spec (DESIGN.md section 1).

Submodules are ordinary `nn.Conv2d` / `nn.BatchNorm2d` / `nn.Parameter` children with the names
of the spec (`l2..l5`, `s2..s5` each with `.conv` / `.bn`, `fuse4`, `fuse3`, `fuse2` holding
`weight_a` / `weight_b` and `gate`), so one state_dict serves every backend and a plain copy.

Data flow (hr_fusion="add", the spec's mode A):

    P5 = l5(B4); P4 = l4(B3); P3 = l3(B2); Hr = l2(B1)
    P5s = s5(P5);                U5 = Up2(P5s)
    P4_td = s4(fuse4(U5, P4));   U4 = Up2(P4_td)
    P3_td = s3(fuse3(U4, P3));   U3 = Up2(P3_td)
    Hf = s2(fuse2(Hr, U3))                      # A = Hr, B = U3 at the 1/4 level

With hr_fusion="concat" (mode B): Hf = s2(cat([Hr, U3])), s2 a 3x3 conv 2C -> C.
With pan=True a bottom-up path follows: N3 = pan_s3(pan_fuse3(down3(Hf), P3_td)),
N4 = pan_s4(pan_fuse4(down4(N3), P4_td)), N5 = pan_s5(pan_fuse5(down5(N4), P5)).
"""
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends, ops
from .functional import FUSION_EPS, fusion_weights, up2

FUSE_MODES = ("add", "weighted")
GATES = (None, "se", "coord")
HR_FUSIONS = ("add", "concat")
DOWNS = ("dwconv", "avgpool")
#: the backends the module accepts; the fused ones run the glue through `litefpn_kernels.ops`.
MODULE_BACKENDS = ("auto",) + backends.BACKENDS

#: BatchNorm gamma of the post-fusion smooths s4, s3, s2 (and the PAN smooths); 1.0 elsewhere.
SMOOTH_BN_GAMMA = 0.9


class LiteFPNOutput(NamedTuple):
    """Hf at 1/4 and the top-down pyramid; n3..n5 only with pan=True."""
    hf: Tensor
    p3_td: Tensor
    p4_td: Tensor
    p5: Tensor
    n3: Optional[Tensor] = None
    n4: Optional[Tensor] = None
    n5: Optional[Tensor] = None


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


class ConvBN(nn.Module):
    """Conv (bias=False) + BatchNorm, optionally + SiLU. Lateral 1x1s have no activation."""

    def __init__(self, in_ch, out_ch, kernel_size=1, stride=1, groups=1, act=False,
                 bn_gamma=1.0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride,
                              padding=kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=1e-5, momentum=0.1)
        self.act = nn.SiLU() if act else nn.Identity()
        self.bn_gamma = bn_gamma
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_normal_(self.conv.weight)
        self.bn.reset_parameters()
        nn.init.constant_(self.bn.weight, self.bn_gamma)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def _gate_conv(in_ch, out_ch):
    """1x1 conv of a gate: Kaiming normal weight, keeps its bias (zero-initialised)."""
    conv = nn.Conv2d(in_ch, out_ch, 1, bias=True)
    nn.init.kaiming_normal_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class SEGate(nn.Module):
    """Squeeze-excitation over GAP(cat(A, B)): the first C gates gate A, the last C gate B."""

    def __init__(self, channels):
        super().__init__()
        hidden = max(channels // 4, 1)
        self.fc1 = _gate_conv(2 * channels, hidden)
        self.fc2 = _gate_conv(hidden, 2 * channels)

    def gates(self, a: Tensor, b: Tensor):
        """The [N, C] gates of A and B. Only the spatial means of A and B are needed."""
        pooled = torch.cat([a.mean((2, 3), keepdim=True), b.mean((2, 3), keepdim=True)], 1)
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(pooled)))).flatten(1)
        return g.chunk(2, dim=1)

    def forward(self, a, b):
        g_a, g_b = self.gates(a, b)
        return a * g_a[:, :, None, None], b * g_b[:, :, None, None]


class CoordAtt(nn.Module):
    """Coordinate attention (Hou et al., CVPR 2021) for one input.

    Pool along W and along H, a shared 1x1 conv + BN + h-swish on the concatenation, then one
    1x1 conv + sigmoid per direction; out = x * a_h * a_w. Hidden width max(8, C // 32) as in
    the paper.
    """

    def __init__(self, channels, reduction=32):
        super().__init__()
        hidden = max(8, channels // reduction)
        self.conv1 = _gate_conv(channels, hidden)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act = nn.Hardswish()
        self.conv_h = _gate_conv(hidden, channels)
        self.conv_w = _gate_conv(hidden, channels)

    def forward(self, x):
        h, w = x.shape[2], x.shape[3]
        pool_h = x.mean(3, keepdim=True)                       # [N, C, H, 1]
        pool_w = x.mean(2, keepdim=True).transpose(2, 3)       # [N, C, W, 1]
        y = self.act(self.bn1(self.conv1(torch.cat([pool_h, pool_w], dim=2))))
        y_h, y_w = torch.split(y, [h, w], dim=2)
        a_h = torch.sigmoid(self.conv_h(y_h))                  # [N, C, H, 1]
        a_w = torch.sigmoid(self.conv_w(y_w.transpose(2, 3)))  # [N, C, 1, W]
        return x * a_h * a_w


class CoordGate(nn.Module):
    """Coordinate-attention gate for the two inputs of a fusion, one CoordAtt each."""

    def __init__(self, channels):
        super().__init__()
        self.a = CoordAtt(channels)
        self.b = CoordAtt(channels)

    def forward(self, a, b):
        return self.a(a), self.b(b)


class Fuse(nn.Module):
    """Fuse(A, B): A + B, or the softplus-normalised weighted sum; optionally gated first."""

    def __init__(self, channels, fuse="add", gate=None, eps=FUSION_EPS):
        super().__init__()
        _check_choice("fuse", fuse, FUSE_MODES)
        _check_choice("gate", gate, GATES)
        self.fuse, self.eps = fuse, eps
        if fuse == "weighted":
            self.weight_a = nn.Parameter(torch.ones(1))
            self.weight_b = nn.Parameter(torch.ones(1))
        self.gate = {None: None, "se": SEGate, "coord": CoordGate}[gate]
        if self.gate is not None:
            self.gate = self.gate(channels)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if self.gate is not None:
            a, b = self.gate(a, b)
        if self.fuse == "weighted":
            w_a, w_b = fusion_weights(self.weight_a, self.weight_b, self.eps)
            return w_a * a + w_b * b
        return a + b


class Down(nn.Module):
    """2x downsampling of the PAN path: depthwise 3x3 stride-2 conv + BN, or AvgPool2d(2),
    optionally after a fixed 3x3 binomial blur (anti-aliasing, replicate padding)."""

    def __init__(self, channels, down="dwconv", anti_alias=False):
        super().__init__()
        _check_choice("down", down, DOWNS)
        self.anti_alias = anti_alias
        if anti_alias:
            k = torch.tensor([1.0, 2.0, 1.0])
            blur = (k[:, None] * k[None, :]) / 16.0
            # a fixed filter, not a parameter: not in the state_dict
            self.register_buffer("blur", blur.expand(channels, 1, 3, 3).clone(), persistent=False)
        if down == "dwconv":
            self.sample = ConvBN(channels, channels, 3, stride=2, groups=channels)
        else:
            self.sample = nn.AvgPool2d(2)

    def forward(self, x):
        if self.anti_alias:
            x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.blur.to(x.dtype),
                         groups=x.shape[1])
        return self.sample(x)


# ----------------------------------------------------------------------------- fused-path steps
def _bn_args(bn: nn.BatchNorm2d):
    """(running_mean, running_var, training, momentum) exactly as nn.BatchNorm2d.forward derives
    them for F.batch_norm, including its num_batches_tracked bookkeeping."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            factor = 1.0 / float(bn.num_batches_tracked)
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return (bn.running_mean if track else None, bn.running_var if track else None, training,
            factor)


def _conv_bn(m: ConvBN, x: Tensor, backend: str = "eager") -> Tensor:
    """ConvBN on the fused path. Training BatchNorm + SiLU (the smooths) runs as one `bn_silu`
    on backends that have its kernels (no stored BN output); eval BatchNorm is folded into the
    convolution (one pass instead of two), and without autograd the SiLU then runs in place."""
    bn, silu = m.bn, isinstance(m.act, nn.SiLU)
    if bn.training or bn.running_mean is None:
        if silu and backend != "eager" and backend in ops.BN_SILU_BACKENDS:
            running_mean, running_var, training, momentum = _bn_args(bn)
            return ops.bn_silu(m.conv(x), bn.weight, bn.bias, running_mean, running_var,
                               training, momentum, bn.eps, backend=backend)
        return m(x)
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    conv = m.conv
    weight = conv.weight * scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype)
    bias = (bn.bias - bn.running_mean * scale).to(conv.weight.dtype)
    y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if silu and not torch.is_grad_enabled():
        return F.silu(y, inplace=True)
    return m.act(y)


def _autocast_input(t: Tensor) -> Tensor:
    """What an eager convolution would see of `t` under autocast (the fused operators take one
    dtype for all their activations)."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return t.to(torch.get_autocast_dtype(dev))
    return t


def _fused_level(lateral: ConvBN, fuse: Fuse, coarse: Tensor, z: Tensor, lateral_is_a: bool,
                 backend: str) -> Tensor:
    """fuse(Up2(coarse), lateral(z)) (or fuse(lateral(z), Up2(coarse)) with lateral_is_a) on the
    fused operators; the fusion weights and gates stay attached to the input the spec gives them.

    No gate: one lateral_up2_fuse. SE gate: the gate needs GAP of the lateral's BN output
    before the fused epilogue, so the lateral runs as conv + BN and up2_fuse does Up2 + gates +
    weights (GAP(Up2 x) = GAP(x), so the upsampled map is still never written). Coord gate
    (spatial, not per-channel): plain composition.
    """
    if isinstance(fuse.gate, CoordGate):
        up, lat = up2(coarse), _conv_bn(lateral, z)
        return fuse(lat, up) if lateral_is_a else fuse(up, lat)
    w_a = w_b = None
    if fuse.fuse == "weighted":
        w_a, w_b = fuse.weight_a, fuse.weight_b
    w_lat, w_up = (w_a, w_b) if lateral_is_a else (w_b, w_a)
    if fuse.gate is None:
        bn = lateral.bn
        running_mean, running_var, training, momentum = _bn_args(bn)
        return ops.lateral_up2_fuse(
            coarse, _autocast_input(z), lateral.conv.weight, bn.weight, bn.bias, running_mean,
            running_var, training, momentum, bn.eps, w_up, w_lat, eps=fuse.eps, backend=backend)
    lat = _conv_bn(lateral, z)
    g_a, g_b = fuse.gate.gates(lat, coarse) if lateral_is_a else fuse.gate.gates(coarse, lat)
    g_lat, g_up = (g_a, g_b) if lateral_is_a else (g_b, g_a)
    return ops.up2_fuse(coarse, lat, w_up, w_lat, eps=fuse.eps, gate_coarse=g_up,
                        gate_fine=g_lat, backend=backend)


class LiteFPN(nn.Module):
    """The LiteFPN neck. `forward([b1, b2, b3, b4])` -> `LiteFPNOutput`.

    Args:
        in_channels: channels of B1..B4 (spec: 32, 64, 128, 256; Lite-HRNet-18: 40, 80, 160, 320).
        channels: width of the neck (spec: 128).
        fuse: "add" or "weighted" (softplus-normalised, BiFPN style).
        gate: None, "se" or "coord": a gate on both inputs of each fusion.
        hr_fusion: "add" (mode A: fuse2 then s2) or "concat" (mode B: s2 is a 3x3 2C -> C conv).
        pan: add the bottom-up path (N3, N4, N5); down: "dwconv" or "avgpool"; anti_alias: blur
            before downsampling.
        backend: "auto", "eager", "cpu", "triton" or "cuda": where the glue (Up2 + fuse + the
            1x1 laterals) runs; "eager" is this plain composition, the others the fused operators
            of `litefpn_kernels.ops`. Switch later with `neck.backend = ...` or `convert`.
    """

    def __init__(self, in_channels: Sequence[int] = (32, 64, 128, 256), channels: int = 128,
                 fuse: str = "add", gate: Optional[str] = None, hr_fusion: str = "add",
                 pan: bool = False, down: str = "dwconv", anti_alias: bool = False,
                 backend: str = "auto"):
        super().__init__()
        in_channels = tuple(in_channels)
        if len(in_channels) != 4 or not all(isinstance(c, int) and c > 0 for c in in_channels):
            raise ValueError(f"in_channels must be four positive ints (B1..B4), got {in_channels}")
        if not isinstance(channels, int) or channels <= 0:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        _check_choice("fuse", fuse, FUSE_MODES)
        _check_choice("gate", gate, GATES)
        _check_choice("hr_fusion", hr_fusion, HR_FUSIONS)
        _check_choice("down", down, DOWNS)
        if not isinstance(pan, bool) or not isinstance(anti_alias, bool):
            raise ValueError(f"pan and anti_alias must be bools, got {pan!r}, {anti_alias!r}")
        self.in_channels, self.channels = in_channels, channels
        self.fuse_mode, self.gate_mode, self.hr_fusion = fuse, gate, hr_fusion
        self.pan, self.down_mode, self.anti_alias = pan, down, anti_alias
        self.backend = backend

        c1, c2, c3, c4 = in_channels
        c = channels
        self.l5, self.l4 = ConvBN(c4, c), ConvBN(c3, c)
        self.l3, self.l2 = ConvBN(c2, c), ConvBN(c1, c)
        self.s5 = ConvBN(c, c, 3, act=True)
        self.fuse4, self.fuse3 = Fuse(c, fuse, gate), Fuse(c, fuse, gate)
        self.s4 = ConvBN(c, c, 3, act=True, bn_gamma=SMOOTH_BN_GAMMA)
        self.s3 = ConvBN(c, c, 3, act=True, bn_gamma=SMOOTH_BN_GAMMA)
        if hr_fusion == "add":
            self.fuse2 = Fuse(c, fuse, gate)
            self.s2 = ConvBN(c, c, 3, act=True, bn_gamma=SMOOTH_BN_GAMMA)
        else:
            self.s2 = ConvBN(2 * c, c, 3, act=True, bn_gamma=SMOOTH_BN_GAMMA)
        if pan:
            for level in (3, 4, 5):
                setattr(self, f"down{level}", Down(c, down, anti_alias))
                setattr(self, f"pan_fuse{level}", Fuse(c, fuse, gate))
                setattr(self, f"pan_s{level}",
                        ConvBN(c, c, 3, act=True, bn_gamma=SMOOTH_BN_GAMMA))

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str):
        _check_choice("backend", value, MODULE_BACKENDS)
        self._backend = value

    def extra_repr(self):
        return (f"in_channels={self.in_channels}, channels={self.channels}, "
                f"fuse={self.fuse_mode!r}, gate={self.gate_mode!r}, "
                f"hr_fusion={self.hr_fusion!r}, pan={self.pan}, backend={self.backend!r}")

    def _check_inputs(self, feats):
        if not isinstance(feats, (list, tuple)) or len(feats) != 4:
            got = f"{len(feats)} items" if isinstance(feats, (list, tuple)) else type(feats).__name__
            raise ValueError(f"LiteFPN expects four feature maps [b1, b2, b3, b4], got {got}")
        for i, f in enumerate(feats):
            name = f"b{i + 1}"
            if not isinstance(f, Tensor) or f.dim() != 4:
                shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
                raise ValueError(f"{name} must be a 4-D [N, C, H, W] tensor, got {shape}")
            if f.shape[1] != self.in_channels[i]:
                raise ValueError(f"{name} must have {self.in_channels[i]} channels "
                                 f"(in_channels[{i}]), got {f.shape[1]}")
            if f.dtype != feats[0].dtype:
                raise ValueError(f"{name} has dtype {f.dtype} but b1 has {feats[0].dtype}")
            if f.device != feats[0].device:
                raise ValueError(f"{name} is on {f.device} but b1 is on {feats[0].device}")
            if f.shape[0] != feats[0].shape[0]:
                raise ValueError(f"{name} has batch {f.shape[0]} but b1 has {feats[0].shape[0]}")
            if i > 0:
                above = feats[i - 1]
                if (above.shape[2], above.shape[3]) != (2 * f.shape[2], 2 * f.shape[3]):
                    raise ValueError(
                        f"{name} must be exactly half of b{i} spatially: b{i} is "
                        f"{tuple(above.shape[2:])}, so {name} must be "
                        f"{(above.shape[2] / 2, above.shape[3] / 2)}, got {tuple(f.shape[2:])}")

    def forward(self, feats: Sequence[Tensor]) -> LiteFPNOutput:
        self._check_inputs(feats)
        backend = backends.resolve(self.backend, feats[0].device)
        if backend == "eager":
            return self._forward_eager(feats)
        return self._forward_fused(feats, backend)

    def _forward_fused(self, feats, backend):
        """The same network with its glue on the fused operators (README, "What is fused")."""
        b1, b2, b3, b4 = feats

        def smooth(m, x):
            return _conv_bn(m, x, backend)

        p5 = _conv_bn(self.l5, b4)
        p4_td = smooth(self.s4, _fused_level(self.l4, self.fuse4, smooth(self.s5, p5), b3,
                                             False, backend))
        p3_td = smooth(self.s3, _fused_level(self.l3, self.fuse3, p4_td, b2, False, backend))
        if self.hr_fusion == "add":
            hf = smooth(self.s2, _fused_level(self.l2, self.fuse2, p3_td, b1, True, backend))
        else:
            hf = smooth(self.s2, torch.cat([_conv_bn(self.l2, b1), up2(p3_td)], dim=1))
        if not self.pan:
            return LiteFPNOutput(hf, p3_td, p4_td, p5)
        n3 = smooth(self.pan_s3, self.pan_fuse3(self.down3(hf), p3_td))
        n4 = smooth(self.pan_s4, self.pan_fuse4(self.down4(n3), p4_td))
        n5 = smooth(self.pan_s5, self.pan_fuse5(self.down5(n4), p5))
        return LiteFPNOutput(hf, p3_td, p4_td, p5, n3, n4, n5)

    def _forward_eager(self, feats):
        b1, b2, b3, b4 = feats
        p5 = self.l5(b4)
        p4_td = self.s4(self.fuse4(up2(self.s5(p5)), self.l4(b3)))
        p3_td = self.s3(self.fuse3(up2(p4_td), self.l3(b2)))
        hr, u3 = self.l2(b1), up2(p3_td)
        if self.hr_fusion == "add":
            hf = self.s2(self.fuse2(hr, u3))
        else:
            hf = self.s2(torch.cat([hr, u3], dim=1))
        if not self.pan:
            return LiteFPNOutput(hf, p3_td, p4_td, p5)
        n3 = self.pan_s3(self.pan_fuse3(self.down3(hf), p3_td))
        n4 = self.pan_s4(self.pan_fuse4(self.down4(n3), p4_td))
        n5 = self.pan_s5(self.pan_fuse5(self.down5(n4), p5))
        return LiteFPNOutput(hf, p3_td, p4_td, p5, n3, n4, n5)


def convert(module: nn.Module, backend: str) -> nn.Module:
    """Switch every LiteFPN inside `module` to `backend` ("eager" switches back); returns
    `module`. Parameters and buffers are untouched: the state_dict is the same on every
    backend."""
    _check_choice("backend", backend, MODULE_BACKENDS)
    for m in module.modules():
        if isinstance(m, LiteFPN):
            m.backend = backend
    return module
