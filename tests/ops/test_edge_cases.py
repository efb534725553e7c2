"""Edge cases a differential fuzz of the fused ops against eager found: each test failed before
its fix. Non-finite values must come out as eager's do."""
import pytest
import torch

from litefpn_kernels import ops
from tests.support.helpers import need

#: a test of another op sets its own OP through need()
OP = "up2_fuse"


@pytest.mark.parametrize("eps", [float("inf"), 1e39], ids=["inf", "above-fp32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_up2_fuse_eps_past_fp32_range_like_eager(backend_device, eps, dtype):
    """eps = inf (or past fp32's max) makes both weights 0 in eager; Triton's two-fp32 split of
    eps gave inf + (-inf) = NaN."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 3, 4, 5, generator=g, dtype=dtype).to(device)
    fine = torch.randn(1, 3, 8, 10, generator=g, dtype=dtype).to(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    wc, wf = (torch.tensor([v], dtype=acc, device=device) for v in (0.7, -0.2))
    want = ops.up2_fuse(coarse, fine, wc, wf, eps=eps, backend="eager")
    got = ops.up2_fuse(coarse, fine, wc, wf, eps=eps, backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-30, equal_nan=True)


def _gates_with_inf(n, c, device, dtype):
    g = torch.sigmoid(torch.randn(n, c, generator=torch.Generator().manual_seed(2), dtype=dtype))
    g[0, 0], g[-1, -1] = float("inf"), float("-inf")
    return g.to(device)


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_up2_fuse_infinite_gate_gives_eager_infinities(backend_device, kind):
    """Eager scales Up2(coarse) by the gate after interpolating: an Inf gate gives +-Inf (NaN
    only where Up2 is 0). The cpu kernels folded the gate into the taps: 0*Inf, Inf-Inf = NaN."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(1)
    fmt = torch.channels_last if kind == "channels_last" else torch.contiguous_format
    coarse = torch.randn(2, 3, 4, 5, generator=g).to(device).contiguous(memory_format=fmt)
    fine = torch.randn(2, 3, 8, 10, generator=g).to(device).contiguous(memory_format=fmt)
    gc = _gates_with_inf(2, 3, device, torch.float32)
    gf = torch.ones(2, 3, device=device)
    w = dict(w_coarse=torch.tensor([0.3], device=device), w_fine=torch.tensor([0.1], device=device))
    for kw in ({}, w):
        want = ops.up2_fuse(coarse, fine, **kw, gate_coarse=gc, gate_fine=gf, backend="eager")
        got = ops.up2_fuse(coarse, fine, **kw, gate_coarse=gc, gate_fine=gf, backend=backend)
        assert torch.isinf(want).any()
        torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_lateral_up2_fuse_infinite_gate_gives_eager_infinities(kind):
    """The coarse side of lateral_up2_fuse, as above (eval BatchNorm)."""
    for backend in ("contract", "cpu", "triton"):
        device = need("lateral_up2_fuse", backend, "cpu")
        g = torch.Generator().manual_seed(1)
        fmt = torch.channels_last if kind == "channels_last" else torch.contiguous_format
        coarse = torch.randn(2, 3, 4, 5, generator=g).contiguous(memory_format=fmt)
        z = torch.randn(2, 6, 8, 10, generator=g).contiguous(memory_format=fmt)
        conv_w = torch.randn(3, 6, 1, 1, generator=g) / 6 ** 0.5
        ones, zeros = torch.ones(3), torch.zeros(3)
        gc = _gates_with_inf(2, 3, device, torch.float32)
        args = (coarse, z, conv_w, ones, 0.1 * ones, zeros, ones, False)
        want = ops.lateral_up2_fuse(*args, gate_coarse=gc, gate_fine=ones.expand(2, 3).clone(),
                                    backend="eager")
        got = ops.lateral_up2_fuse(*args, gate_coarse=gc, gate_fine=ones.expand(2, 3).clone(),
                                   backend=backend)
        assert torch.isinf(want).any()
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-5, atol=1e-5)
