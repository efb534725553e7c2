"""litefpn_kernels: fused kernels for the LiteFPN-128c neck of Lite-HRNet-18."""
from . import backends, functional, ops
from .ops import up2_fuse

__all__ = ["backends", "functional", "ops", "up2_fuse"]
