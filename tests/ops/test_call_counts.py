"""What one fused call launches, counted (torch.profiler): on the CPU backend, the extension's ops
(`litefpn::_*`: a kernel, or a pass: one kernel with BatchNorm's small math or the fusion
weights' chain rule in C++ around it, csrc/cpu/passes.cpp), and the other ATen ops run
around them from Python (the glue), which cost more than the kernels at small sizes (and are a
launch each on a GPU). The ceilings are today's counts: lower them when the glue shrinks, never
raise them without a reason in the commit. Also: in plain eager the ops skip the custom-op
wrapper (`ops/_dispatch.py`) and give bit-for-bit what the custom ops give; and each pass of the
GPU backends (ops/_passes.py with the Triton steps) launches a handful of kernels."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from litefpn_kernels import ops
from litefpn_kernels.backends import compiled, triton_kernels
from tests.support.call_counts import gpu_launches, split, top_level_calls
from tests.support.helpers import need
from tests.support.inputs import bn_silu_inputs, lateral_up2_fuse_inputs, up2_fuse_inputs


def _up2(gates):
    coarse, fine, kw = up2_fuse_inputs((2, 8, 4, 6), torch.float32, "cpu", gates=gates,
                                       requires_grad=True)
    return (lambda: ops.up2_fuse(coarse, fine, **kw, backend="cpu")), [coarse, fine, *kw.values()]


def _lateral(training):
    coarse, z, kw = lateral_up2_fuse_inputs((2, 4, 8, 4, 6), torch.float32, "cpu",
                                            requires_grad=True)
    return ((lambda: ops.lateral_up2_fuse(coarse, z, training=training, **kw, backend="cpu")),
            [coarse, z, *kw.values()])


def _bn_silu(training):
    x, kw = bn_silu_inputs((2, 8, 6, 10), torch.float32, requires_grad=True)
    return (lambda: ops.bn_silu(x, **kw, training=training, backend="cpu")), [x, *kw.values()]


#: case -> (make -> (call, its tensors), (extension ops, glue) forward, (extension ops, glue)
#: backward); glue: ceilings. Training's forward glue is F.batch_norm's running-statistics update
#: (mul_, add_ per statistic) and views; the backward's are views.
CASES = {
    "up2_fuse-weighted": (lambda: _up2(False), (1, 0), (1, 4)),
    "up2_fuse-gated": (lambda: _up2(True), (1, 0), (1, 6)),
    "lateral_up2_fuse-train": (lambda: _lateral(True), (2, 7), (2, 8)),
    "lateral_up2_fuse-eval": (lambda: _lateral(False), (1, 3), (2, 8)),
    "bn_silu-train": (lambda: _bn_silu(True), (2, 5), (2, 3)),
    "bn_silu-eval": (lambda: _bn_silu(False), (1, 0), (2, 3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_calls_per_fused_op(case):
    need(case.split("-")[0], "cpu", torch.device("cpu"))
    make, (fwd_ext, fwd_glue), (bwd_ext, bwd_glue) = CASES[case]
    call, tensors = make()
    call().sum().backward()  # first call: lazy imports and caches
    for t in tensors:
        t.grad = None  # else autograd's own accumulation (add_) would count
    out = []
    fwd = top_level_calls(lambda: out.append(call()))
    grad = torch.ones_like(out[0])
    bwd = top_level_calls(lambda: out[0].backward(grad))
    assert not any(name.startswith("litefpn::") and not name.startswith("litefpn::_")
                   for name in fwd + bwd), f"a custom-op wrapper ran in plain eager: {fwd + bwd}"
    for what, calls, ext, glue in (("forward", fwd, fwd_ext, fwd_glue),
                                   ("backward", bwd, bwd_ext, bwd_glue)):
        got_ext, got_glue = split(calls)
        assert got_ext == ext, f"{what}: {dict(calls)}"
        assert got_glue <= glue, f"{what}: {got_glue} glue ops > {glue}: {dict(calls)}"


class _Intercept(TorchDispatchMode):
    """A dispatch mode that changes nothing: its presence makes the ops take the custom ops."""
    seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func.name()))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", list(CASES))
def test_direct_call_equals_custom_op(case):
    """Output, every gradient and the running statistics, bit for bit, from the direct call
    (plain eager) and from the custom ops (taken under a dispatch mode)."""
    need(case.split("-")[0], "cpu", torch.device("cpu"))
    _Intercept.seen.clear()
    results = []
    for intercept in (False, True):
        call, tensors = CASES[case][0]()  # fresh inputs and running statistics per path
        with _Intercept() if intercept else contextlib.nullcontext():
            out = call()
            out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        results.append([out.detach()] + [t.grad if t.requires_grad else t for t in tensors])
    assert any(n.startswith("litefpn::") and not n.startswith("litefpn::_")
               for n in _Intercept.seen), "the intercepted run did not reach the custom ops"
    for direct, custom in zip(*results):
        assert torch.equal(direct, custom)


# ----------------------------------------------------------------------------- GPU passes
def _gpu_passes(op, monkeypatch):
    """The `cuda` backend's passes (compiled.kernel_set(op, "CUDA"): ops/_passes.py with the
    Triton steps) around the CPU twins of its kernels, each Triton step's launch recorded as one
    "triton::" event (the interpreter's own tensor calls inside it are not launches)."""
    if not (triton_kernels.TRITON_IMPORTABLE and triton_kernels.interpreting()):
        pytest.skip("the Triton steps run on CPU tensors in the interpreter (TRITON_INTERPRET=1)")
    need(op, "cpu", torch.device("cpu"))
    from litefpn_kernels.triton import steps
    launch = steps._launch

    def recorded(kernel, grid, *args, **meta):
        with torch.profiler.record_function(f"triton::{kernel.fn.__name__}"):
            launch(kernel, grid, *args, **meta)
    monkeypatch.setattr(steps, "_launch", recorded)
    return compiled.kernel_set(op, "CUDA", steps=steps)


def _gpu_bn_silu(k, training):
    x, kw = bn_silu_inputs((2, 8, 6, 10), torch.float32)
    g = torch.randn_like(x)
    stats = k.moments(x) if training else (kw["running_mean"], kw["running_var"])
    p = (kw["bn_weight"], kw["bn_bias"], *stats, 1e-3)
    s1, s2, _ = k.grad_sums(g, x, *p)
    return dict(moments=lambda: k.moments(x), apply=lambda: k.apply(x, *p),
                grad_sums=lambda: k.grad_sums(g, x, *p),
                grad_x=lambda: k.grad_x(g, x, *p, s1, s2, 120, training))


def _gpu_lateral(k, training):
    coarse, z, kw = lateral_up2_fuse_inputs((2, 4, 8, 4, 6), torch.float32, "cpu", gates=True)
    fuse = (kw["w_coarse"], kw["w_fine"], kw["gate_coarse"], kw["gate_fine"])
    cw, g = kw["conv_weight"], torch.randn(2, 8, 8, 12)
    mean_z, cov_z, mean, var = k.moments(z, cw)
    if not training:
        mean, var = kw["running_mean"], kw["running_var"]
    bn = (cw, kw["bn_weight"], kw["bn_bias"], mean, var)
    sums_args = (g, z, *bn, mean_z, training, 1e-3, fuse[0], fuse[1], fuse[3], 1e-4, True)
    a_sum, s, d_gamma, sum_fine = k.grad_sums(*sums_args)
    args = (g, coarse, z, *bn, mean_z, cov_z, z.new_empty((0,)), a_sum, s, s, d_gamma,
            sum_fine, 2 * 8 * 12, training, 1e-3, *fuse, 1e-4, True, True, True, True)
    return dict(moments=lambda: k.moments(z, cw),
                apply=lambda: k.apply(coarse, z, *bn, 1e-3, *fuse, 1e-4),
                grad_sums=lambda: k.grad_sums(*sums_args), grad_inputs=lambda: k.grad_inputs(*args))


def _gpu_up2(k, training):
    coarse, fine, kw = up2_fuse_inputs((2, 8, 4, 6), torch.float32, "cpu", gates=True)
    fuse = (kw["w_coarse"], kw["w_fine"], kw["gate_coarse"], kw["gate_fine"])
    g = torch.randn_like(fine)
    return dict(grad=lambda: k.grad(g, coarse, fine, *fuse, 1e-4, True, True, True, True))


#: case -> (passes, {pass: ceiling on its GPU launches}): the op's kernels (1-2 a pass) plus the
#: Triton steps (1-3) plus cuBLAS for the lateral's [C, Cin] products. With the PyTorch steps
#: instead, the same passes launch 7-68 (lateral grad_inputs: 68).
GPU_CASES = {
    "bn_silu-train": (_gpu_bn_silu, dict(moments=3, apply=2, grad_sums=3, grad_x=2)),
    "bn_silu-eval": (_gpu_bn_silu, dict(apply=2, grad_sums=3, grad_x=2)),
    "lateral_up2_fuse-train": (_gpu_lateral, dict(moments=5, apply=2, grad_sums=3,
                                                  grad_inputs=8)),
    "lateral_up2_fuse-eval": (_gpu_lateral, dict(apply=2, grad_sums=4, grad_inputs=6)),
    "up2_fuse-gated": (_gpu_up2, dict(grad=2)),
}


@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_launches_per_pass(case, monkeypatch):
    """What each pass of the GPU backends launches, counted through the CPU twins of their
    kernels: a handful, so a fused call's [C]-sized math costs a few launches, not dozens."""
    make, ceilings = GPU_CASES[case]
    op, mode = case.split("-")
    passes = make(_gpu_passes(op, monkeypatch), mode == "train")
    for name, ceiling in ceilings.items():
        calls = top_level_calls(passes[name])
        assert gpu_launches(calls) <= ceiling, f"{name}: {dict(calls)}"
        assert any(n.startswith("triton::") for n in calls), f"{name}: no Triton step ran"
