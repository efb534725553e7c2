"""The spec's building blocks as ordinary nn.Modules (DESIGN: docs/design.md section 1): ConvBN,
the fusion Fuse(A, B) with its optional SE / coordinate-attention gate, and the PAN path's Down.

Submodules are plain `nn.Conv2d` / `nn.BatchNorm2d` / `nn.Parameter` children, so one
state_dict serves every backend and a plain copy.
"""
import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..eager import FUSION_EPS, fusion_weights
from ..ops import _distributed

FUSE_MODES = ("add", "weighted")
GATES = (None, "se", "coord")
HR_FUSIONS = ("add", "concat")
DOWNS = ("dwconv", "avgpool")

#: BatchNorm gamma of the post-fusion smooths s4, s3, s2 (and the PAN smooths); 1.0 elsewhere.
SMOOTH_BN_GAMMA = 0.9


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def bn_args(bn: nn.modules.batchnorm._BatchNorm):
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


_FUSED_PATH = threading.local()


@contextlib.contextmanager
def fused_path():
    """While LiteFPN runs its fused path: every nn.SyncBatchNorm that synchronises (`batch_norm`)
    takes SyncBatchNorm's semantics from `litefpn_kernels.ops` (any device), not PyTorch's
    module (GPU only). Outside it, the modules are PyTorch's own."""
    before = getattr(_FUSED_PATH, "on", False)
    _FUSED_PATH.on = True
    try:
        yield
    finally:
        _FUSED_PATH.on = before


def sync_group(bn):
    """bn's process group if it is an nn.SyncBatchNorm that synchronises now (training, an
    initialised group of more than one rank), else None."""
    if not isinstance(bn, nn.SyncBatchNorm):
        return None
    key = _distributed.module_group_key(bn)
    return _distributed.group_of(key) if key else None


def batch_norm(bn, x):
    """bn(x), except for a synchronising nn.SyncBatchNorm on the fused path (`fused_path`)."""
    if isinstance(bn, nn.SyncBatchNorm) and getattr(_FUSED_PATH, "on", False):
        key = _distributed.module_group_key(bn)
        if key:
            running_mean, running_var, _, momentum = bn_args(bn)
            return _distributed.batch_norm(x, bn.weight, bn.bias, running_mean, running_var,
                                           momentum, bn.eps, key)
    return bn(x)


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
        return self.act(batch_norm(self.bn, self.conv(x)))


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
        y = self.act(batch_norm(self.bn1, self.conv1(torch.cat([pool_h, pool_w], dim=2))))
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
        check_choice("fuse", fuse, FUSE_MODES)
        check_choice("gate", gate, GATES)
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
        check_choice("down", down, DOWNS)
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
