"""The LiteFPN module: `blocks` (the spec's building blocks), `lite_fpn` (LiteFPN, its topology
written once, and `convert`), `fused_steps` (how each step runs per backend)."""
from .blocks import ConvBN, CoordAtt, CoordGate, Down, Fuse, SEGate
from .lite_fpn import LiteFPN, LiteFPNOutput, convert

__all__ = ["ConvBN", "CoordAtt", "CoordGate", "Down", "Fuse", "LiteFPN", "LiteFPNOutput",
           "SEGate", "convert"]
