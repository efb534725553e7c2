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
