"""Autograd features the fused kernels lack raise an error naming the op (they used to return a
zero tangent, or fail with PyTorch-internal messages); backend="eager" supports them all."""
import pytest
import torch
import torch.autograd.forward_ad as forward_ad

from litefpn_kernels import ops
from tests.support.helpers import CPU, need

FUSED = ["contract", "cpu", "triton"]


def _up2_fuse(backend):
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64)
    fine = torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64)
    return coarse, lambda c: ops.up2_fuse(c, fine, backend=backend)


def _lateral_up2_fuse(backend):
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64)
    z = torch.randn(2, 4, 4, 6, generator=g, dtype=torch.float64)
    conv_w = torch.randn(3, 4, 1, 1, generator=g, dtype=torch.float64)
    ones, zeros = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    return z, lambda zz: ops.lateral_up2_fuse(coarse, zz, conv_w, ones, zeros, zeros.clone(),
                                              ones.clone(), True, backend=backend)


def _bn_silu(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    ones, zeros = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    return x, lambda xx: ops.bn_silu(xx, ones, zeros, None, None, True, backend=backend)


CASES = {"up2_fuse": _up2_fuse, "lateral_up2_fuse": _lateral_up2_fuse, "bn_silu": _bn_silu}


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("op", list(CASES))
def test_transforms_and_higher_order_raise_naming_the_op(op, backend):
    need(op, backend, CPU)
    x, fn = CASES[op](backend)
    msg = f"litefpn::{op}: .*backend='eager'"
    with pytest.raises(RuntimeError, match=msg):
        torch.func.jvp(fn, (x,), (torch.ones_like(x),))
    with pytest.raises(RuntimeError, match=msg):
        torch.func.grad(lambda t: fn(t).sum())(x)
    with pytest.raises(RuntimeError, match=msg):
        torch.func.vjp(fn, x)
    with forward_ad.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
        fn(forward_ad.make_dual(x, torch.ones_like(x)))
    leaf = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(leaf).pow(2).sum(), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match=f"litefpn::{op}: double backward"):
        g.sum().backward()


@pytest.mark.parametrize("op", list(CASES))
def test_eager_backend_supports_them(op):
    x, fn = CASES[op]("eager")
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    _, tangent = torch.func.jvp(fn, (x,), (direction,))  # (a constant shift is BN-invariant)
    leaf = x.clone().requires_grad_()
    out = fn(leaf)
    (vjp,) = torch.autograd.grad(out, leaf, torch.ones_like(out))
    assert tangent.abs().sum() > 0 and torch.allclose(torch.func.grad(lambda t: fn(t).sum())(x),
                                                      vjp)


def test_plain_fused_backward_unaffected():
    """The guards cost a fused call nothing it needs: one ordinary backward still works."""
    need("up2_fuse", "cpu", CPU)
    x, fn = _up2_fuse("cpu")
    leaf = x.clone().requires_grad_()
    fn(leaf).sum().backward()
    assert leaf.grad is not None
