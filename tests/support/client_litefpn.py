"""A stand-in for the one public eager LiteFPN of this spec, the `LiteFPN` of
TomokotoKiyoshi/Sider_CAPTCHA_Solver (`src/models/stage5_lite_fpn.py`, built on its
`modules/conv_bn_act.py`), written here from its structure for the patching tests
(`litefpn_kernels.patch`); no code of that project is imported or copied.

What the patcher relies on, kept as in that module: the submodule names (`lateral_1_32`,
`lateral_1_16`, `lateral_1_8`, `lateral_1_4`, `smooth_p5`, `fuse_1_16`, `fuse_1_8`, `fuse_1_4`,
each fusion with `.smooth` and `weight_a`/`weight_b` or SE `fc1`/`fc2`), the `ConvBNAct` with
`.conv`/`.bn`/`.act` (in-place SiLU), the fusion types "add" / "weighted" / "attention", the
argument order of each fusion (A = the upsampled map, except at 1/4 where A = the lateral `hr`)
and the return value: `hf`, or `(hf, [p3_td, p4_td, p5])` with `return_pyramid=True`.
"""
from typing import List

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNAct(nn.Module):
    ACTS = {"silu": lambda: nn.SiLU(inplace=True), "relu": lambda: nn.ReLU(inplace=True),
            "none": nn.Identity}

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1,
                 act_type="silu", bias=False, bn_eps=1e-5, bn_momentum=0.1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=(kernel_size - 1) // 2, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum)
        self.act = self.ACTS[act_type]()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class FusionModule(nn.Module):
    def __init__(self, channels=128, fusion_type="add"):
        super().__init__()
        self.fusion_type = fusion_type
        if fusion_type == "weighted":
            self.weight_a = nn.Parameter(torch.ones(1))
            self.weight_b = nn.Parameter(torch.ones(1))
            self.epsilon = 1e-4
        elif fusion_type == "attention":
            self.global_pool = nn.AdaptiveAvgPool2d(1)
            self.fc1 = nn.Conv2d(2 * channels, channels // 4, 1)
            self.fc2 = nn.Conv2d(channels // 4, 2 * channels, 1)
            self.sigmoid = nn.Sigmoid()
        self.smooth = ConvBNAct(channels, channels, 3, act_type="silu")

    def forward(self, a, b):
        if self.fusion_type == "add":
            fused = a + b
        elif self.fusion_type == "weighted":
            w_a, w_b = F.softplus(self.weight_a), F.softplus(self.weight_b)
            total = w_a + w_b + self.epsilon
            fused = (w_a / total) * a + (w_b / total) * b
        elif self.fusion_type == "attention":
            attn = self.sigmoid(self.fc2(F.relu(self.fc1(self.global_pool(
                torch.cat([a, b], dim=1))))))
            attn_a, attn_b = torch.split(attn, a.shape[1], dim=1)
            fused = a * attn_a + b * attn_b
        else:
            raise ValueError(f"unknown fusion type {self.fusion_type!r}")
        return self.smooth(fused)


def _up2(x):
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class LiteFPN(nn.Module):
    def __init__(self, in_channels: List[int] = (32, 64, 128, 256), fpn_channels: int = 128,
                 fusion_type: str = "add", return_pyramid: bool = False):
        super().__init__()
        self.fpn_channels, self.fusion_type = fpn_channels, fusion_type
        self.return_pyramid = return_pyramid
        c = fpn_channels
        self.lateral_1_32 = ConvBNAct(in_channels[3], c, 1, act_type="none")
        self.lateral_1_16 = ConvBNAct(in_channels[2], c, 1, act_type="none")
        self.lateral_1_8 = ConvBNAct(in_channels[1], c, 1, act_type="none")
        self.lateral_1_4 = ConvBNAct(in_channels[0], c, 1, act_type="none")
        self.smooth_p5 = ConvBNAct(c, c, 3, act_type="silu")
        self.fuse_1_16 = FusionModule(c, fusion_type)
        self.fuse_1_8 = FusionModule(c, fusion_type)
        self.fuse_1_4 = FusionModule(c, fusion_type)

    def forward(self, features):
        b1, b2, b3, b4 = features[0], features[1], features[2], features[3]
        p5 = self.lateral_1_32(b4)
        p4 = self.lateral_1_16(b3)
        p3 = self.lateral_1_8(b2)
        hr = self.lateral_1_4(b1)
        p4_td = self.fuse_1_16(_up2(self.smooth_p5(p5)), p4)
        p3_td = self.fuse_1_8(_up2(p4_td), p3)
        hf = self.fuse_1_4(hr, _up2(p3_td))
        if self.return_pyramid:
            return hf, [p3_td, p4_td, p5]
        return hf


class Model(nn.Module):
    """A model holding the neck as a child (the patcher replaces children in place)."""

    def __init__(self, **neck_kwargs):
        super().__init__()
        self.neck = LiteFPN(**neck_kwargs)
        self.head = nn.Conv2d(neck_kwargs.get("fpn_channels", 128), 2, 1)

    def forward(self, feats):
        out = self.neck(feats)
        hf = out[0] if isinstance(out, tuple) else out
        return self.head(hf), out
