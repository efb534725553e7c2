"""litefpn_kernels: fused kernels for the LiteFPN-128c neck of Lite-HRNet-18.

    from litefpn_kernels import LiteFPN, ops
    neck = LiteFPN()                        # the spec's module, plain PyTorch
    out = neck([b1, b2, b3, b4])            # LiteFPNOutput(hf, p3_td, p4_td, p5)
    y = ops.up2_fuse(coarse, fine, w_c, w_f, backend="auto")

Layout (docs/design.md): `ops/` the operators (one module per op), `backends/` the kernel
registry, `eager` the plain-PyTorch backend, `triton/` the Triton kernels, `nn/` the module.
"""
__version__ = "0.1.0"  # the one copy: pyproject.toml reads it (dynamic version)

from . import backends, eager, ops
from .nn import LiteFPN, LiteFPNOutput, convert
from .ops import bn_silu, lateral_up2_fuse, up2_fuse
from .patch import apply_litefpn_kernels, client_state_dict_to_litefpn

__all__ = ["LiteFPN", "LiteFPNOutput", "__version__", "apply_litefpn_kernels", "backends",
           "bn_silu", "client_state_dict_to_litefpn", "convert", "eager", "lateral_up2_fuse",
           "ops", "up2_fuse"]
