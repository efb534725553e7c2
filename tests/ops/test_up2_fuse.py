"""litefpn::up2_fuse on every backend against the eager composition (litefpn_kernels/eager.py).

The `contract` rows run the operator's glue on float64 PyTorch versions of the kernels
(tests/support/contract.py)."""
import os
import subprocess
import sys

import pytest
import torch

from litefpn_kernels import backends, eager, ops
from tests.support.helpers import CPU, CPU_ISAS, TOL, layout, need, run_with_cpu_isa
from tests.support.inputs import up2_fuse_inputs as make_inputs

OP = "up2_fuse"

# coarse shapes [N, C, H, W]: odd, 1, non-powers of two
SHAPES = [(2, 3, 4, 5), (1, 2, 1, 1), (2, 4, 3, 1), (1, 3, 1, 6), (2, 5, 7, 3)]


def reference64(coarse, fine, kw):
    """The eager composition in float64 from the same (possibly low-precision) inputs."""
    up = {k: v.double() for k, v in kw.items()}
    return eager.up2_fuse(coarse.double(), fine.double(), up.get("w_coarse"),
                              up.get("w_fine"), 1e-4, up.get("gate_coarse"), up.get("gate_fine"))


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "strided"])
def test_forward_matches_eager(backend_device, dtype, kind):
    backend, device = backend_device
    for i, shape in enumerate(SHAPES):
        for weighted, gates in ((False, False), (True, False), (True, True), (False, True)):
            coarse, fine, kw = make_inputs(shape, dtype, device, kind, weighted, gates, seed=i)
            out = ops.up2_fuse(coarse, fine, **kw, backend=backend)
            assert out.dtype == dtype and out.shape == fine.shape
            torch.testing.assert_close(out.double(), reference64(coarse, fine, kw), **TOL[dtype])
            if kind == "channels_last":
                assert out.is_contiguous(memory_format=torch.channels_last)
            elif kind == "contiguous":
                assert out.is_contiguous()


def test_forward_eps_and_extreme_weights(backend_device):
    """softplus above its threshold (20) and a large eps follow F.softplus exactly."""
    backend, device = backend_device
    coarse, fine, _ = make_inputs((1, 2, 3, 4), torch.float64, device, weighted=False)
    for wc, wf, eps in ((25.0, -30.0, 1e-4), (0.0, 0.0, 0.5), (-5.0, 21.0, 0.0)):
        kw = dict(w_coarse=torch.tensor([wc], dtype=torch.float64, device=device),
                  w_fine=torch.tensor([wf], dtype=torch.float64, device=device))
        out = ops.up2_fuse(coarse, fine, **kw, eps=eps, backend=backend)
        ref = eager.up2_fuse(coarse, fine, kw["w_coarse"], kw["w_fine"], eps)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_nan_and_inf_propagate_like_eager(backend_device):
    backend, device = backend_device
    coarse, fine, kw = make_inputs((1, 2, 4, 4), torch.float32, device)
    coarse[0, 0, 1, 2] = float("nan")
    fine[0, 1, 3, 3] = float("inf")
    out = ops.up2_fuse(coarse, fine, **kw, backend=backend)
    ref = eager.up2_fuse(coarse, fine, kw["w_coarse"], kw["w_fine"])
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_weights_in_fp32_with_low_precision_activations(backend_device):
    """fp32 parameters with bf16 activations (AMP): the output keeps the activation dtype."""
    backend, device = backend_device
    coarse, fine, kw = make_inputs((2, 3, 4, 5), torch.bfloat16, device)
    assert kw["w_coarse"].dtype == torch.float32
    out = ops.up2_fuse(coarse, fine, **kw, backend=backend)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference64(coarse, fine, kw), **TOL[torch.bfloat16])


def test_empty_batch(backend_device):
    backend, device = backend_device
    coarse, fine, kw = make_inputs((0, 3, 4, 5), torch.float32, device, gates=True,
                                   requires_grad=True)
    out = ops.up2_fuse(coarse, fine, **kw, backend=backend)
    assert out.shape == (0, 3, 8, 10)
    out.sum().backward()
    assert coarse.grad.shape == coarse.shape and kw["w_coarse"].grad.shape == (1,)
    assert kw["w_coarse"].grad.item() == 0


# ----------------------------------------------------------------------------- backward
def _grads(fn, coarse, fine, kw, grad):
    out = fn(coarse, fine, kw)
    leaves = [coarse, fine] + list(kw.values())
    return torch.autograd.grad(out, leaves, grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "strided"])
def test_backward_matches_eager(backend_device, dtype, kind):
    backend, device = backend_device
    for i, shape in enumerate(SHAPES):
        for weighted, gates in ((False, False), (True, False), (True, True)):
            coarse, fine, kw = make_inputs(shape, dtype, device, kind, weighted, gates, seed=i,
                                           requires_grad=True)
            grad = layout(torch.randn(fine.shape, dtype=dtype, device=device), kind)
            got = _grads(lambda c, f, k: ops.up2_fuse(c, f, **k, backend=backend),
                         coarse, fine, kw, grad)
            want = _grads(lambda c, f, k: reference64(c, f, k), coarse, fine, kw, grad.double())
            names = ["coarse", "fine"] + list(kw)
            for name, a, b, t in zip(names, got, want, [coarse, fine] + list(kw.values())):
                assert a.dtype == t.dtype and a.shape == t.shape, name
                tol = TOL[dtype] if name in ("coarse", "fine") else TOL[
                    torch.float64 if dtype == torch.float64 else torch.float32]
                scale = max(1.0, b.abs().max().item())  # sums over many pixels: relative
                torch.testing.assert_close(a.double() / scale, b.double() / scale, **tol,
                                           msg=lambda m: f"{name} ({shape}): {m}")


def test_backward_with_expanded_grad(backend_device):
    """out.sum().backward() hands the kernel a zero-stride gradient."""
    backend, device = backend_device
    coarse, fine, kw = make_inputs((2, 3, 4, 5), torch.float64, device, gates=True,
                                   requires_grad=True)
    got = _grads(lambda c, f, k: ops.up2_fuse(c, f, **k, backend=backend).sum(), coarse, fine,
                 kw, None)
    want = _grads(lambda c, f, k: reference64(c, f, k).sum(), coarse, fine, kw, None)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_only_some_inputs_need_grad(backend_device):
    backend, device = backend_device
    coarse, fine, kw = make_inputs((2, 3, 4, 5), torch.float64, device, gates=True)
    kw["w_fine"].requires_grad_()
    coarse.requires_grad_()
    out = ops.up2_fuse(coarse, fine, **kw, backend=backend)
    out.backward(torch.ones_like(out))
    ref_c = coarse.detach().clone().requires_grad_()
    ref_w = kw["w_fine"].detach().clone().requires_grad_()
    ref = reference64(ref_c, fine, {**kw, "w_fine": ref_w})
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(coarse.grad, ref_c.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kw["w_fine"].grad, ref_w.grad, rtol=1e-11, atol=1e-11)
    assert fine.grad is None and kw["w_coarse"].grad is None


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_gradcheck_full_tiny(backend_device, kind):
    backend, device = backend_device
    for shape in ((1, 2, 1, 1), (1, 2, 2, 3)):
        coarse, fine, kw = make_inputs(shape, torch.float64, device, kind, gates=True,
                                       requires_grad=True)
        fn = lambda c, f, wc, wf, gc, gf: ops.up2_fuse(  # noqa: E731
            c, f, wc, wf, gate_coarse=gc, gate_fine=gf, backend=backend)
        args = (coarse, fine, kw["w_coarse"], kw["w_fine"], kw["gate_coarse"], kw["gate_fine"])
        assert torch.autograd.gradcheck(fn, args)


def test_gradcheck_fast_mode_medium(backend_device):
    backend, device = backend_device
    coarse, fine, kw = make_inputs((2, 8, 9, 7), torch.float64, device, "channels_last",
                                   gates=True, requires_grad=True)
    fn = lambda c, f, wc, wf, gc, gf: ops.up2_fuse(  # noqa: E731
        c, f, wc, wf, gate_coarse=gc, gate_fine=gf, backend=backend)
    args = (coarse, fine, kw["w_coarse"], kw["w_fine"], kw["gate_coarse"], kw["gate_fine"])
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_backward_is_bitwise_deterministic(backend_device, kind):
    backend, device = backend_device
    coarse, fine, kw = make_inputs((2, 16, 12, 10), torch.float32, device, kind, gates=True,
                                   requires_grad=True)
    grad = torch.randn(fine.shape, device=device)
    first = _grads(lambda c, f, k: ops.up2_fuse(c, f, **k, backend=backend), coarse, fine, kw,
                   grad)
    for _ in range(2):
        again = _grads(lambda c, f, k: ops.up2_fuse(c, f, **k, backend=backend), coarse, fine,
                       kw, grad)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_cpu_backend_independent_of_thread_count():
    device = need(OP, "cpu", "cpu")
    coarse, fine, kw = make_inputs((2, 16, 12, 10), torch.float32, device, "channels_last",
                                   gates=True, requires_grad=True)
    grad = torch.randn(fine.shape)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_grads(lambda c, f, k: ops.up2_fuse(c, f, **k, backend="cpu"),
                                  coarse, fine, kw, grad))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------- op machinery
def test_opcheck(backend_device):
    backend, device = backend_device
    for kind, gates in (("contiguous", False), ("channels_last", True)):
        coarse, fine, kw = make_inputs((2, 3, 3, 4), torch.float64, device, kind, gates=gates,
                                       requires_grad=True)
        args = (coarse, fine, kw["w_coarse"], kw["w_fine"], kw.get("gate_coarse"),
                kw.get("gate_fine"), 1e-4, backend)
        torch.library.opcheck(torch.ops.litefpn.up2_fuse.default, args)
        coarse, fine, _ = make_inputs((2, 3, 3, 4), torch.float32, device, kind, weighted=False,
                                      requires_grad=True)
        torch.library.opcheck(torch.ops.litefpn.up2_fuse.default,
                              (coarse, fine, None, None, None, None, 1e-4, backend))


def test_torch_compile_fullgraph(backend_device):
    backend, device = backend_device
    torch._dynamo.reset()

    def f(c, fi, wc, wf, gc, gf):
        return torch.relu(ops.up2_fuse(c, fi, wc, wf, gate_coarse=gc, gate_fine=gf,
                                       backend=backend)) * 2

    compiled = torch.compile(f, fullgraph=True)
    coarse, fine, kw = make_inputs((2, 3, 4, 5), torch.float32, device, gates=True,
                                   requires_grad=True)
    args = (coarse, fine, kw["w_coarse"], kw["w_fine"], kw["gate_coarse"], kw["gate_fine"])
    out = compiled(*args)
    ref = f(*args)
    torch.testing.assert_close(out, ref)
    got = torch.autograd.grad(out.sum(), args)
    want = torch.autograd.grad(ref.sum(), args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_eager_backend_is_the_reference():
    coarse, fine, kw = make_inputs((2, 3, 4, 5), torch.float32, CPU, gates=True)
    out = ops.up2_fuse(coarse, fine, **kw, backend="eager")
    ref = eager.up2_fuse(coarse, fine, kw["w_coarse"], kw["w_fine"], 1e-4,
                             kw["gate_coarse"], kw["gate_fine"])
    assert torch.equal(out, ref)


def test_auto_picks_a_working_backend_on_cpu():
    coarse, fine, kw = make_inputs((2, 3, 4, 5), torch.float32, CPU)
    expected = "cpu" if backends.unavailable_reason(OP, "cpu", CPU) is None else "eager"
    assert backends.resolve(OP, "auto", CPU) == expected
    torch.testing.assert_close(ops.up2_fuse(coarse, fine, **kw),
                               ops.up2_fuse(coarse, fine, **kw, backend="eager"))


@pytest.mark.skipif(backends.unavailable_reason(OP, "cpu", CPU) is not None,
                    reason="C++ extension not built")
def test_int64_indexing_past_2_pow_31_elements():
    """fine with > 2**31 elements (fp16, ~4 GiB): offsets need 64-bit arithmetic."""
    n, c, h, w = 1, 2, 16384, 16385  # fine: 2 * 32768 * 32770 = 2.15e9 elements
    assert 4 * n * c * h * w > 2**31
    coarse = torch.randn(n, c, h, w, dtype=torch.float16)
    fine = torch.empty(n, c, 2 * h, 2 * w, dtype=torch.float16)
    fine.fill_(0.5)
    wc, wf = torch.tensor([1.0]), torch.tensor([2.0])
    out = ops.up2_fuse(coarse, fine, wc, wf, backend="cpu")
    del fine
    # check the last rows of the last channel (offsets past 2**31) against the reference
    tail_c = coarse[:, -1:, -3:]
    ref = eager.up2_fuse(tail_c, torch.full((n, 1, 6, 2 * w), 0.5, dtype=torch.float16),
                             wc, wf)
    torch.testing.assert_close(out[:, -1:, -4:], ref[:, :, -4:], **TOL[torch.float16])
    torch.testing.assert_close(out[:, :1, :4], eager.up2_fuse(
        coarse[:, :1, :3], torch.full((n, 1, 6, 2 * w), 0.5, dtype=torch.float16), wc, wf)[:, :, :4],
        **TOL[torch.float16])


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument():
    coarse, fine, kw = make_inputs((2, 3, 4, 5), torch.float32, CPU)
    up = ops.up2_fuse
    cases = [
        (lambda: up(coarse[0], fine), ValueError, "coarse must be a 4-D"),
        (lambda: up(coarse, fine[0]), ValueError, "fine must be a 4-D"),
        (lambda: up(coarse, fine[:1]), ValueError, "fine has batch 1 but coarse has batch 2"),
        (lambda: up(coarse, fine[:, :2]), ValueError, "fine has 2 channels but coarse has 3"),
        (lambda: up(coarse, fine[..., :9]), ValueError, "exactly 2x coarse"),
        (lambda: up(coarse, fine.double()), TypeError, "fine has dtype torch.float64"),
        (lambda: up(coarse, fine.to("meta")), ValueError, "fine is on meta"),
        (lambda: up(coarse.int(), fine.int()), TypeError, "coarse has unsupported dtype"),
        (lambda: up(coarse, fine, kw["w_coarse"]), ValueError, "w_coarse and w_fine"),
        (lambda: up(coarse, fine, None, kw["w_fine"]), ValueError, "w_coarse and w_fine"),
        (lambda: up(coarse, fine, torch.ones(2), kw["w_fine"]), ValueError, "w_coarse must be a tensor of shape \\[1\\]"),
        (lambda: up(coarse, fine, kw["w_coarse"], torch.ones(1, 1)), ValueError, "w_fine must be a tensor of shape \\[1\\]"),
        (lambda: up(coarse, fine, kw["w_coarse"], torch.ones(1, dtype=torch.long)), TypeError, "w_fine must be floating"),
        (lambda: up(coarse, fine, gate_coarse=torch.ones(2, 4)), ValueError, "gate_coarse must have shape \\[N, C\\]"),
        (lambda: up(coarse, fine, gate_fine=torch.ones(3)), ValueError, "gate_fine must have shape"),
        (lambda: up(coarse, fine, gate_fine=torch.ones(2, 3, device="meta")), ValueError, "gate_fine is on meta"),
        (lambda: up(coarse, fine, eps=-1.0), ValueError, "eps"),
        (lambda: up(coarse, fine, backend="tpu"), ValueError, "backend must be 'auto' or one of"),
        (lambda: up(coarse, fine, backend="cuda"), RuntimeError, "backend='cuda' is not available"),
    ]
    for fn, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            fn()


def test_direct_op_call_validates_too():
    coarse, fine, _ = make_inputs((2, 3, 4, 5), torch.float32, CPU)
    with pytest.raises(ValueError, match="exactly 2x coarse"):
        torch.ops.litefpn.up2_fuse(coarse, fine[..., :9], None, None, None, None, 1e-4, "eager")


@pytest.mark.parametrize("isa", CPU_ISAS[:-1])
def test_cpu_narrower_isa_builds(isa):
    """The cpu tests of this file pass on the kernels compiled for the narrower instruction sets
    too (LITEFPN_CPU_ISA=default: the build's baseline; avx2), not only on the widest one this
    CPU has, which is what runs otherwise."""
    proc = run_with_cpu_isa(isa, ["-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider",
                                  "-k", "cpu and not triton and not narrower"], 600)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_cpu_isa_env_caps_the_choice_and_rejects_unknown_values():
    """LITEFPN_CPU_ISA caps the kernel variant (csrc/cpu/common/cpu_isa.h); a value that names no
    variant is an error naming the variable, not a silent fallback."""
    need(OP, "cpu", CPU)
    if os.environ.get("LITEFPN_CPU_ISA"):
        pytest.skip("this process runs under a LITEFPN_CPU_ISA cap already")
    script = ("import torch, litefpn_kernels; from litefpn_kernels import ops; "
              "print(torch.ops.litefpn._cpu_isa()); "
              "ops.up2_fuse(torch.ones(1, 2, 2, 2), torch.ones(1, 2, 4, 4), backend='cpu')")

    def run(cap):
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env=dict(os.environ, LITEFPN_CPU_ISA=cap), timeout=120)

    widest = torch.ops.litefpn._cpu_isa()
    for cap in CPU_ISAS:
        proc = run(cap)
        assert proc.returncode == 0, proc.stderr[-2000:]
        want = min(cap, widest, key=CPU_ISAS.index)
        assert proc.stdout.strip() == want, (cap, proc.stdout)
    proc = run("sse9")
    assert proc.returncode != 0 and "LITEFPN_CPU_ISA" in proc.stderr and "sse9" in proc.stderr
