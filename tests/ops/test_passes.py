"""Two implementations of the passes' small math against the reference, the passes of
litefpn_kernels/ops/_passes.py with the PyTorch steps (ops/_steps.py), all around the same CPU
kernels:
- `cpu`: the C++ passes (csrc/cpu/passes.cpp: a kernel with BatchNorm's small math, or the
  fusion weights' chain rule, in C++ around it), what the `cpu` backend runs;
- `triton_steps`: the passes of _passes.py with the Triton steps (litefpn_kernels/triton/steps.py,
  in the interpreter), what the GPU backends run.
Every output of every pass, in both dtypes, both layouts, training and eval, weighted / gated
fusion, and the synchronised-BatchNorm branch (delta_z) that a single process reaches only
through these calls."""
import pytest
import torch

from litefpn_kernels.backends import triton_kernels
from litefpn_kernels.ops import _passes
from tests.support.helpers import need
from tests.support.inputs import bn_silu_inputs, lateral_up2_fuse_inputs, up2_fuse_inputs
from tests.support.layouts import layout

o = torch.ops.litefpn

#: the same tolerance as the ops' own tests against eager: float64 tight, float32 at its epsilon
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def _python_passes(op, steps=None):
    """The passes of _passes.py around the CPU kernels, with `steps` (default: PyTorch's)."""
    kw = {} if steps is None else dict(steps=steps)
    if op == "up2_fuse":
        return _passes.up2_fuse(fwd=o._up2_fuse_fwd, bwd=o._up2_fuse_bwd, **kw)
    if op == "bn_silu":
        return _passes.bn_silu(stats=o._bn_silu_stats, fwd=o._bn_silu_fwd,
                               bwd_sums=o._bn_silu_bwd_sums, bwd=o._bn_silu_bwd, **kw)
    return _passes.lateral_up2_fuse(gram=o._lateral_gram, fwd=o._lateral_up2_fuse_fwd,
                                    grad_z=o._lateral_grad_z, bwd_coarse=o._up2_fuse_bwd_coarse,
                                    **kw)


def _candidate(impl, op):
    """The passes under test: the C++ ones (`cpu`), or _passes.py with the Triton steps."""
    need(op, "cpu", "cpu")
    if impl == "cpu":
        if op == "up2_fuse":
            return type("cpp", (), dict(grad=staticmethod(o._up2_fuse_grad)))
        names = ("moments", "apply", "grad_sums",
                 "grad_x" if op == "bn_silu" else "grad_inputs")
        prefix = "_bn_silu_" if op == "bn_silu" else "_lateral_"
        return type("cpp", (), {n: staticmethod(getattr(o, prefix + n)) for n in names})
    if not (triton_kernels.TRITON_IMPORTABLE and triton_kernels.interpreting()):
        pytest.skip("the Triton steps run on CPU tensors in the interpreter (TRITON_INTERPRET=1)")
    from litefpn_kernels.triton import steps
    return _python_passes(op, steps)


IMPLS = ["cpu", "triton_steps"]


def _close(got, want, dtype):
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, (i, a.shape, b.shape, a.dtype, b.dtype)
        torch.testing.assert_close(a, b, **TOL[dtype], msg=f"output {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
@pytest.mark.parametrize("fusion", ["plain", "weighted", "gated", "weighted_gated"])
@pytest.mark.parametrize("impl", IMPLS)
def test_up2_fuse_grad_pass(impl, dtype, kind, fusion):
    got = _candidate(impl, "up2_fuse")
    py = _python_passes("up2_fuse")
    coarse, fine, kw = up2_fuse_inputs((3, 10, 3, 4), dtype, "cpu", kind,
                                       weighted="weighted" in fusion, gates="gated" in fusion)
    fuse = (kw.get("w_coarse"), kw.get("w_fine"), kw.get("gate_coarse"), kw.get("gate_fine"))
    g = layout(torch.randn(fine.shape, dtype=torch.float64).to(dtype), kind)
    have = tuple(p is not None for p in fuse)
    for needs in ((False,) * 4, have, (have[0], False, False, have[3])):
        args = (g, coarse, fine, *fuse, 1e-4, *needs)
        _close(got.grad(*args), py.grad(*args), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("impl", IMPLS)
def test_bn_silu_passes(impl, dtype, kind, training):
    got = _candidate(impl, "bn_silu")
    py = _python_passes("bn_silu")
    x, kw = bn_silu_inputs((3, 20, 5, 7), dtype, kind, mean=2.0)
    g = layout(torch.randn(x.shape, dtype=torch.float64).to(dtype), kind)
    _close(got.moments(x), py.moments(x), dtype)
    mean, var = py.moments(x) if training else (kw["running_mean"], kw["running_var"])
    params = (kw["bn_weight"], kw["bn_bias"], mean, var, 1e-3)
    _close([got.apply(x, *params)], [py.apply(x, *params)], dtype)
    sums = got.grad_sums(g, x, *params)
    _close(sums, py.grad_sums(g, x, *params), dtype)
    _close([got.grad_x(g, x, *params, sums[0], sums[1], 210, training)],
           [py.grad_x(g, x, *params, sums[0], sums[1], 210, training)], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["eval", "train", "train_synced"])
@pytest.mark.parametrize("fusion", ["plain", "weighted", "gated", "weighted_gated"])
@pytest.mark.parametrize("impl", IMPLS)
def test_lateral_passes(impl, dtype, kind, mode, fusion):
    got = _candidate(impl, "lateral_up2_fuse")
    training, synced = mode != "eval", mode == "train_synced"
    py = _python_passes("lateral_up2_fuse")
    coarse, z, kw = lateral_up2_fuse_inputs((3, 12, 10, 3, 4), dtype, "cpu", kind,
                                            weighted="weighted" in fusion,
                                            gates="gated" in fusion, z_mean=1.5)
    fuse = (kw.get("w_coarse"), kw.get("w_fine"), kw.get("gate_coarse"), kw.get("gate_fine"))
    g = layout(torch.randn((3, 10, 6, 8), dtype=torch.float64).to(dtype), kind)
    cw = kw["conv_weight"]
    moments = got.moments(z, cw)
    _close(moments, py.moments(z, cw), dtype)
    if training:
        mean_z, cov_z, stat_mean, stat_var = moments
    else:
        acc = moments[0].dtype
        mean_z, cov_z = z.new_empty((0,), dtype=acc), z.new_empty((0, 0), dtype=acc)
        stat_mean, stat_var = kw["running_mean"], kw["running_var"]
    bn = (cw, kw["bn_weight"], kw["bn_bias"], stat_mean, stat_var)
    _close([got.apply(coarse, z, *bn, 1e-3, *fuse, 1e-4)],
           [py.apply(coarse, z, *bn, 1e-3, *fuse, 1e-4)], dtype)
    need_sums = fusion != "plain"
    sums_args = (g, z, *bn, mean_z, training, 1e-3, fuse[0], fuse[1], fuse[3], 1e-4, need_sums)
    sums = got.grad_sums(*sums_args)
    _close(sums, py.grad_sums(*sums_args), dtype)
    a_sum, s, d_gamma, sum_fine = sums
    count = 3 * 6 * 8
    delta = z.new_empty((0,), dtype=a_sum.dtype)
    s_all, d_all = s, d_gamma
    if synced:  # as if another rank held as many values: the group's sums and count differ
        delta = 0.1 * torch.linspace(-1, 1, 12, dtype=a_sum.dtype)
        s_all, d_all, count = 1.7 * s + 0.3, 1.3 * d_gamma - 0.2, 2 * count
    needs = tuple(p is not None for p in fuse)
    args = (g, coarse, z, *bn, mean_z, cov_z, delta, a_sum, s, s_all, d_all, sum_fine, count,
            training, 1e-3, *fuse, 1e-4, *needs)
    _close(got.grad_inputs(*args), py.grad_inputs(*args), dtype)


@pytest.mark.parametrize("impl", ["cpu", "pytorch"])
def test_lateral_passes_ignore_autocast(impl):
    """The passes' [C, Cin] products stay in the accumulation dtype under autocast (which would
    run torch.mm in bf16): the same bits with and without it."""
    need("lateral_up2_fuse", "cpu", "cpu")
    k = (_python_passes("lateral_up2_fuse") if impl == "pytorch" else
         type("cpu", (), dict(moments=staticmethod(o._lateral_moments)))())
    _, z, kw = lateral_up2_fuse_inputs((2, 24, 16, 3, 4), torch.float32, "cpu", z_mean=1.0)
    plain = k.moments(z, kw["conv_weight"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = k.moments(z, kw["conv_weight"])
    for a, b in zip(plain, autocast):
        assert b.dtype == torch.float32 and torch.equal(a, b)


def test_passes_reject_operands_of_the_wrong_size():
    """The passes index their vector operands by channel: a wrong size is a clear error naming
    the operand, never a read past its end (the public ops check first; this is for direct
    calls)."""
    need("lateral_up2_fuse", "cpu", "cpu")
    x, kw = bn_silu_inputs((2, 6, 3, 3), torch.float32)
    short = kw["bn_weight"][:5]
    with pytest.raises(RuntimeError, match="bn_weight must have 6 elements"):
        o._bn_silu_apply(x, short, kw["bn_bias"], kw["running_mean"], kw["running_var"], 1e-5)
    coarse, z, kw = lateral_up2_fuse_inputs((2, 5, 4, 2, 3), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="conv_weight must be"):
        o._lateral_moments(z, kw["conv_weight"][:, :3])
    with pytest.raises(RuntimeError, match="w_coarse must have"):
        o._lateral_apply(coarse, z, kw["conv_weight"], kw["bn_weight"], kw["bn_bias"],
                         kw["running_mean"], kw["running_var"], 1e-5, kw["w_coarse"].repeat(2),
                         kw["w_fine"], None, None, 1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_passes_at_shapes_with_several_programs(impl):
    """Wider than the cases above: several programs on every axis of the Triton steps (channel
    blocks of 16 and 256, input-channel blocks of 64, N*C blocks of 256) and several batch steps
    of 8 (the last one masked), in training with the group's statistics and both fusion kinds
    at once, float32."""
    dtype, kind = torch.float32, "channels_last"
    got, py = _candidate(impl, "lateral_up2_fuse"), _python_passes("lateral_up2_fuse")
    n, c, c_in = 11, 90, 70
    coarse, z, kw = lateral_up2_fuse_inputs((n, c_in, c, 2, 3), dtype, "cpu", kind,
                                            weighted=True, gates=True, z_mean=1.5)
    fuse = (kw["w_coarse"], kw["w_fine"], kw["gate_coarse"], kw["gate_fine"])
    g = layout(torch.randn((n, c, 4, 6), dtype=torch.float64).to(dtype), kind)
    cw = kw["conv_weight"]
    moments = got.moments(z, cw)
    _close(moments, py.moments(z, cw), dtype)
    mean_z, cov_z, stat_mean, stat_var = moments
    bn = (cw, kw["bn_weight"], kw["bn_bias"], stat_mean, stat_var)
    _close([got.apply(coarse, z, *bn, 1e-3, *fuse, 1e-4)],
           [py.apply(coarse, z, *bn, 1e-3, *fuse, 1e-4)], dtype)
    sums_args = (g, z, *bn, mean_z, True, 1e-3, fuse[0], fuse[1], fuse[3], 1e-4, True)
    a_sum, s, d_gamma, sum_fine = sums = got.grad_sums(*sums_args)
    _close(sums, py.grad_sums(*sums_args), dtype)
    delta = 0.1 * torch.linspace(-1, 1, c_in, dtype=a_sum.dtype)
    args = (g, coarse, z, *bn, mean_z, cov_z, delta, a_sum, s, 1.7 * s + 0.3,
            1.3 * d_gamma - 0.2, sum_fine, 2 * n * 4 * 6, True, 1e-3, *fuse, 1e-4,
            True, True, True, True)
    _close(got.grad_inputs(*args), py.grad_inputs(*args), dtype)

    got, py = _candidate(impl, "bn_silu"), _python_passes("bn_silu")
    x, kw = bn_silu_inputs((2, 300, 3, 2), dtype, kind, mean=2.0)
    g = layout(torch.randn(x.shape, dtype=torch.float64).to(dtype), kind)
    _close(got.moments(x), py.moments(x), dtype)
    params = (kw["bn_weight"], kw["bn_bias"], *py.moments(x), 1e-3)
    sums = got.grad_sums(g, x, *params)
    _close(sums, py.grad_sums(g, x, *params), dtype)
    _close([got.grad_x(g, x, *params, sums[0], sums[1], 12, True)],
           [py.grad_x(g, x, *params, sums[0], sums[1], 12, True)], dtype)
