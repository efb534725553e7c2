"""One input factory per operator (and the neck's feature maps), shared by the op, kernel, module
and GPU-harness tests. Values are drawn in float64 from a seeded generator, then cast, so every
dtype and device sees the same numbers."""
import torch

from .helpers import layout


def up2_fuse_inputs(shape, dtype, device, kind="contiguous", weighted=True, gates=False, seed=0,
                requires_grad=False):
    """coarse, fine and the keyword arguments of up2_fuse (weights and gates in fp32/fp64)."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    coarse = layout(rand(n, c, h, w).to(device=device, dtype=dtype), kind)
    fine = layout(rand(n, c, 2 * h, 2 * w).to(device=device, dtype=dtype), kind)
    kw = {}
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if weighted:
        kw["w_coarse"] = (rand(1) + 1).to(device=device, dtype=acc)
        kw["w_fine"] = (rand(1) - 0.5).to(device=device, dtype=acc)
    if gates:
        kw["gate_coarse"] = torch.sigmoid(rand(n, c)).to(device=device, dtype=acc)
        kw["gate_fine"] = torch.sigmoid(rand(n, c)).to(device=device, dtype=acc)
    tensors = [coarse, fine] + list(kw.values())
    for t in tensors:
        t.requires_grad_(requires_grad)
    return coarse, fine, kw


def lateral_up2_fuse_inputs(shape, dtype, device, kind="contiguous", weighted=True, gates=False, seed=0,
                z_mean=0.0, requires_grad=False):
    """coarse, z and the keyword arguments of lateral_up2_fuse (parameters in fp32/fp64)."""
    g = torch.Generator().manual_seed(seed)
    n, c_in, c, h, w = shape
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    small = lambda t: t.to(device=device, dtype=acc)  # noqa: E731
    coarse = layout(rand(n, c, h, w).to(device=device, dtype=dtype), kind)
    z = layout((rand(n, c_in, 2 * h, 2 * w) + z_mean).to(device=device, dtype=dtype), kind)
    kw = dict(conv_weight=small(rand(c, c_in, 1, 1) / c_in ** 0.5),
              bn_weight=small(1 + 0.2 * rand(c)), bn_bias=small(0.1 * rand(c)),
              running_mean=small(0.1 * rand(c)), running_var=small(1 + rand(c).abs()))
    if weighted:
        kw["w_coarse"] = small(rand(1) + 1)
        kw["w_fine"] = small(rand(1) - 0.5)
    if gates:
        kw["gate_coarse"] = small(torch.sigmoid(rand(n, c)))
        kw["gate_fine"] = small(torch.sigmoid(rand(n, c)))
    for t in [coarse, z] + [v for k, v in kw.items() if not k.startswith("running")]:
        t.requires_grad_(requires_grad)
    return coarse, z, kw


def bn_silu_inputs(shape, dtype, kind="contiguous", seed=0, mean=0.0, requires_grad=False,
                   device="cpu"):
    """x and the BatchNorm keyword arguments of bn_silu (vectors in fp32/fp64)."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = layout((torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + mean).to(device, dtype),
               kind)
    vec = lambda t: t.to(device, acc)  # noqa: E731
    kw = dict(bn_weight=vec(1 + 0.3 * torch.randn(c, generator=g, dtype=torch.float64)),
              bn_bias=vec(0.2 * torch.randn(c, generator=g, dtype=torch.float64)),
              running_mean=vec(0.1 * torch.randn(c, generator=g, dtype=torch.float64)),
              running_var=vec(1 + torch.rand(c, generator=g, dtype=torch.float64)))
    for t in (x, kw["bn_weight"], kw["bn_bias"]):
        t.requires_grad_(requires_grad)
    return x, kw


def make_feats(batch=2, top=(4, 6), in_channels=(8, 12, 16, 24), dtype=torch.float32,
               device="cpu", channels_last=False, seed=0, requires_grad=False):
    """B1..B4 with B4 of spatial size `top` (the 1/32 level) and each level twice the next."""
    g = torch.Generator().manual_seed(seed)
    h, w = top
    feats = []
    for i, c in enumerate(in_channels):
        scale = 2 ** (3 - i)
        t = torch.randn(batch, c, h * scale, w * scale, generator=g, dtype=torch.float64)
        t = t.to(device=device, dtype=dtype)
        if channels_last:
            t = t.to(memory_format=torch.channels_last)
        feats.append(t.requires_grad_(requires_grad))
    return feats
