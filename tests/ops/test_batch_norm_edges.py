"""BatchNorm edge cases of bn_silu and lateral_up2_fuse against eager on every backend:
activation checkpointing (both modes), bn_eps <= 0, and an Inf at the statistics' pilot."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from litefpn_kernels import ops
from tests.support.inputs import bn_silu_inputs, lateral_up2_fuse_inputs

#: the fixture skips a backend lacking this op; bn_silu rows additionally need bn_silu kernels
OP = "lateral_up2_fuse"


@pytest.fixture
def backend(cpu_backend):
    return cpu_backend


def _need_bn_silu(backend):
    from litefpn_kernels import backends
    reason = backends.unavailable_reason("bn_silu", backend, "cpu")
    if reason is not None:
        pytest.skip(reason)


def _bn_silu(backend, x, kw):
    return ops.bn_silu(x, kw["bn_weight"], kw["bn_bias"], kw["running_mean"], kw["running_var"],
                       True, 0.1, kw.get("bn_eps", 1e-5), backend=backend)


def _lateral(backend, coarse, z, kw, training=True):
    return ops.lateral_up2_fuse(coarse, z, kw["conv_weight"], kw["bn_weight"], kw["bn_bias"],
                                kw["running_mean"], kw["running_var"], training, 0.1,
                                kw.get("bn_eps", 1e-5), kw["w_coarse"], kw["w_fine"],
                                backend=backend)


def _clone(kw):
    return {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in kw.items()}


# ----------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("op", ["bn_silu", "lateral_up2_fuse"])
def test_checkpoint_updates_running_stats_like_eager(backend, op, reentrant):
    """Under torch.utils.checkpoint the recomputation updates the running statistics a second
    time in eager (aten's batch_norm mutates inside the op); the fused ops must do the same.
    The op is the last of the region, where non-reentrant recomputation stops early."""
    if op == "bn_silu":
        _need_bn_silu(backend)
        x, kw = bn_silu_inputs((2, 5, 3, 4), torch.float64, requires_grad=True)
        inputs, fn = (x,), _bn_silu
    else:
        coarse, z, kw = lateral_up2_fuse_inputs((2, 3, 4, 2, 3), torch.float64, "cpu",
                                                requires_grad=True)
        inputs, fn = (coarse, z), _lateral
    results = {}
    for name in ("eager", backend):
        k = _clone(kw)
        xs = [t.detach().clone().requires_grad_() for t in inputs]
        out = checkpoint(functools.partial(fn, name), *xs, k, use_reentrant=reentrant)
        out.backward(torch.ones_like(out))
        results[name] = (out, [t.grad for t in xs], k)
    (out_e, grads_e, k_e), (out_f, grads_f, k_f) = results["eager"], results[backend]
    tol = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out_f, out_e, **tol)
    for a, b in zip(grads_f, grads_e):
        torch.testing.assert_close(a, b, **tol)
    for name in kw:
        if kw[name].requires_grad:
            torch.testing.assert_close(k_f[name].grad, k_e[name].grad, **tol)
        else:  # running statistics: updated twice (forward, recomputation) on both
            torch.testing.assert_close(k_f[name], k_e[name], **tol)
    assert not torch.allclose(k_e["running_mean"], kw["running_mean"])


# ----------------------------------------------------------------------------- eps
@pytest.mark.parametrize("bn_eps", [0.0, -1e-5])
@pytest.mark.parametrize("op", ["bn_silu", "lateral_up2_fuse"])
def test_bn_eps_not_positive_is_rejected_in_training_like_eager(backend, op, bn_eps):
    if op == "bn_silu":
        _need_bn_silu(backend)
        x, kw = bn_silu_inputs((2, 3, 2, 2), torch.float32)
        call = lambda k: _bn_silu(backend, x, k)  # noqa: E731
    else:
        coarse, z, kw = lateral_up2_fuse_inputs((2, 3, 4, 2, 3), torch.float32, "cpu")
        call = lambda k: _lateral(backend, coarse, z, k)  # noqa: E731
    y = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError) as want:
        F.batch_norm(y, None, None, training=True, eps=bn_eps)
    with pytest.raises(ValueError) as got:
        call({**kw, "bn_eps": bn_eps})
    assert str(got.value) == str(want.value)
    assert str(want.value) == f"batch_norm eps must be positive during training, but got {bn_eps}"


def test_bn_eps_zero_is_accepted_in_eval_like_eager(backend):
    coarse, z, kw = lateral_up2_fuse_inputs((2, 3, 4, 2, 3), torch.float64, "cpu")
    kw["bn_eps"] = 0.0
    got = _lateral(backend, coarse, z, kw, training=False)
    want = _lateral("eager", coarse, z, kw, training=False)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if backend != "eager":
        _need_bn_silu(backend)
        x, kb = bn_silu_inputs((2, 3, 2, 2), torch.float64)
        args = (x, kb["bn_weight"], kb["bn_bias"], kb["running_mean"], kb["running_var"], False,
                0.1, 0.0)
        torch.testing.assert_close(ops.bn_silu(*args, backend=backend),
                                   ops.bn_silu(*args, backend="eager"), rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- Inf at the pilot
def _same_nonfinite(got, want, what):
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (what, got, want)
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)), (what, got, want)
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), (what, got, want)
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("op", ["bn_silu", "lateral_up2_fuse"])
def test_nonfinite_pilot_propagates_like_eager(backend, op, value):
    """The statistics are centred on x[0, :, 0, 0]: a non-finite value there must give eager's
    running statistics and output (e.g. running_mean +-Inf, not NaN)."""
    if op == "bn_silu":
        _need_bn_silu(backend)
        x, kw = bn_silu_inputs((2, 3, 2, 3), torch.float64)
        x[0, 1, 0, 0] = value
        run = lambda name, k: _bn_silu(name, x, k)  # noqa: E731
    else:
        coarse, z, kw = lateral_up2_fuse_inputs((2, 3, 2, 2, 3), torch.float64, "cpu")
        with torch.no_grad():
            kw["conv_weight"].zero_()
            kw["conv_weight"][:, 1] = 1.0  # each output channel reads z's channel 1 alone:
            z[0, 1, 0, 0] = value          # an Inf in z is then an Inf of y, not Inf - Inf
        run = lambda name, k: _lateral(name, coarse, z, k)  # noqa: E731
    k_e, k_f = _clone(kw), _clone(kw)
    out_e, out_f = run("eager", k_e), run(backend, k_f)
    for name in ("running_mean", "running_var"):
        _same_nonfinite(k_f[name], k_e[name], name)
    _same_nonfinite(out_f, out_e, "output")
