"""LiteFPN-128c, the neck of Lite-HRNet-18: the spec (docs/design.md section 1) as an nn.Module
whose topology is written once, in `LiteFPN.forward`; the backend only picks how each step runs
(`fused_steps.py`).

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
from torch import Tensor, nn

from .. import backends
from ..eager import up2
from .blocks import (DOWNS, FUSE_MODES, GATES, HR_FUSIONS, SMOOTH_BN_GAMMA, ConvBN, Down, Fuse,
                     check_choice, fused_path)
from .fused_steps import EagerSteps, steps_for


def _check_backend(value):
    """The backends the module accepts: "auto" and every backend name; the fused ones run the
    glue through `litefpn_kernels.ops`."""
    check_choice("backend", value, ("auto",) + backends.names())


class LiteFPNOutput(NamedTuple):
    """Hf at 1/4 and the top-down pyramid; n3..n5 only with pan=True."""
    hf: Tensor
    p3_td: Tensor
    p4_td: Tensor
    p5: Tensor
    n3: Optional[Tensor] = None
    n4: Optional[Tensor] = None
    n5: Optional[Tensor] = None



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
        check_choice("fuse", fuse, FUSE_MODES)
        check_choice("gate", gate, GATES)
        check_choice("hr_fusion", hr_fusion, HR_FUSIONS)
        check_choice("down", down, DOWNS)
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
        _check_backend(value)
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
        # every fused level runs lateral_up2_fuse: the module's backend is resolved for it
        steps = steps_for(backends.resolve("lateral_up2_fuse", self.backend, feats[0].device))
        if steps is not EagerSteps and any(isinstance(m, nn.SyncBatchNorm) for m in self.modules()):
            # every BatchNorm of the fused path, fused or not, follows SyncBatchNorm's
            # semantics (on any device); eager keeps PyTorch's modules (and their CPU error)
            with fused_path():
                return self._forward(steps, feats)
        return self._forward(steps, feats)

    def _forward(self, steps, feats) -> LiteFPNOutput:
        b1, b2, b3, b4 = feats
        p5 = steps.lateral(self.l5, b4)
        p4_td = steps.smooth(self.s4, steps.top_down(self.l4, self.fuse4,
                                                     steps.smooth(self.s5, p5), b3, False))
        p3_td = steps.smooth(self.s3, steps.top_down(self.l3, self.fuse3, p4_td, b2, False))
        if self.hr_fusion == "add":
            hf = steps.smooth(self.s2, steps.top_down(self.l2, self.fuse2, p3_td, b1, True))
        else:
            hf = steps.smooth(self.s2, torch.cat([steps.lateral(self.l2, b1), up2(p3_td)], dim=1))
        if not self.pan:
            return LiteFPNOutput(hf, p3_td, p4_td, p5)
        n3 = steps.smooth(self.pan_s3, self.pan_fuse3(self.down3(hf), p3_td))
        n4 = steps.smooth(self.pan_s4, self.pan_fuse4(self.down4(n3), p4_td))
        n5 = steps.smooth(self.pan_s5, self.pan_fuse5(self.down5(n4), p5))
        return LiteFPNOutput(hf, p3_td, p4_td, p5, n3, n4, n5)


def convert(module: nn.Module, backend: str) -> nn.Module:
    """Switch every LiteFPN inside `module` to `backend` ("eager" switches back); returns
    `module`. Parameters and buffers are untouched: the state_dict is the same on every
    backend."""
    _check_backend(backend)
    for m in module.modules():
        if isinstance(m, LiteFPN):
            m.backend = backend
    return module
