import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is present; the variable
# must be set before any @triton.jit decorator runs, i.e. before litefpn_kernels.triton imports.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


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


def pytest_configure(config):
    # `make test` builds the extension first; there a missing _C is a broken build, not a skip.
    if os.environ.get("LITEFPN_REQUIRE_EXT") == "1":
        from litefpn_kernels import backends
        if backends.extension() is None:
            raise pytest.UsageError("LITEFPN_REQUIRE_EXT=1 but litefpn_kernels._C is not built")
