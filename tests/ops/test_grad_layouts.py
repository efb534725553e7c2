"""Backward of every fused op with grad_out laid out unlike its inputs, on every backend.

A kernel that plans a buffer, grid or stride from one tensor and uses it with another is right
whenever the two share a layout and wrong otherwise (the Triton up2_fuse backward once sized its
partial sums from `fine` and launched by `grad_out`). So each backward here sees inputs
contiguous or channels_last, crossed with grad_out contiguous, channels_last, expanded (stride 0,
the gradient of `.sum()`), a permuted view, and a view at a storage offset - at sizes where the
Triton GPU launch plan (LITEFPN_TRITON_PLAN=gpu) has several programs per axis and several
partial-sum slots, and the two layouts tile differently.

References are float64 compositions of the op on contiguous copies of the same values, so
PyTorch's own layout-dependent batch_norm backward paths are never the yardstick.
"""
import pytest
import torch
import torch.nn.functional as F

from tests.support.helpers import CPU, layout, need
from litefpn_kernels import ops
from litefpn_kernels.triton import up2_fuse as triton_up2

INPUT_LAYOUTS = ["contiguous", "channels_last"]
GRAD_LAYOUTS = ["contiguous", "channels_last", "expanded", "permuted", "offset"]

# (backend, Triton launch plan); the others ignore the plan. A backend without kernels for an
# op here (not built, or none written yet) is skipped with the reason.
BACKENDS = [pytest.param(("contract", None, "cpu"), id="contract"),
            pytest.param(("cpu", None, "cpu"), id="cpu"),
            pytest.param(("triton", "interpreter", "cpu"), id="triton-interpreter-plan"),
            pytest.param(("triton", "gpu", "cpu"), id="triton-gpu-plan"),
            pytest.param(("cuda", None, "cuda"), id="cuda", marks=pytest.mark.cuda),
            pytest.param(("triton", None, "cuda"), id="triton-cuda", marks=pytest.mark.cuda)]

# coarse [N, C, H, W]: with the GPU plan, C=32 and 2W=128 tile NCHW as 128 columns x 16
# channels and channels_last as 64 columns x 32 channels: 2 column strips vs 1, 4 row programs
# per strip, so partial-sum slots differ between the two layouts.
N, C, H, W = 2, 32, 4, 64
CIN = 16
LATERAL_N = 1  # the lateral kernels' GPU plan is the interpreter's slowest; one sample does


@pytest.fixture
def backend(request, monkeypatch):
    """-> (backend name, device); the inputs are made on the CPU and moved there."""
    name, plan, device = request.param
    if plan is not None:
        monkeypatch.setenv("LITEFPN_TRITON_PLAN", plan)
    return name, torch.device(device)


def backend_params():
    return pytest.mark.parametrize("backend", BACKENDS, indirect=True)


def rand(*shape, seed, device=CPU):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64).to(device)


def grad_in_layout(shape, kind, seed, device=CPU):
    """A grad_out of `shape` whose memory layout is `kind` (values are what matters to eager)."""
    if kind == "expanded":
        return torch.full((1, 1, 1, 1), 0.75, dtype=torch.float64, device=device).expand(shape)
    g = rand(*shape, seed=seed).to(device)
    if kind == "channels_last":
        return g.contiguous(memory_format=torch.channels_last)
    if kind == "permuted":  # [N, C, H, W] view of an [H, N, W, C] tensor
        view = g.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2)
    elif kind == "offset":  # starts 3 elements into its storage
        flat = torch.zeros(g.numel() + 3, dtype=torch.float64, device=device)
        view = flat[3:].view(shape)
        view.copy_(g)
    else:
        view = g.contiguous()
    assert torch.equal(view, g)
    return view


def grads_of(fn, inputs, grad_out):
    """Gradients of fn(*inputs) for grad_out, for the inputs that require grad."""
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    out = fn(*inputs)
    return torch.autograd.grad(out, leaves, grad_out)


def reference_grads(fn64, inputs, grad_out):
    """fn64 on contiguous float64 leaf copies of `inputs`."""
    copies = [None if t is None else
              t.detach().double().contiguous().requires_grad_(t.requires_grad) for t in inputs]
    return grads_of(fn64, copies, grad_out.double().contiguous())


def assert_grads_close(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g.double(), w, rtol=1e-9, atol=1e-9,
                                   msg=lambda m: f"gradient #{i}: {m}")


def up2(x):
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def fused_reference(a, b, wc, wf, gc, gf, eps=1e-4):
    """alpha*gc*a + beta*gf*b with softplus-normalised alpha, beta (the spec's weighted fuse)."""
    if gc is not None:
        a, b = a * gc[:, :, None, None], b * gf[:, :, None, None]
    if wc is not None:
        sc, sf = F.softplus(wc), F.softplus(wf)
        a, b = a * (sc / (sc + sf + eps)), b * (sf / (sc + sf + eps))
    return a + b


# ----------------------------------------------------------------------------- up2_fuse
@backend_params()
@pytest.mark.parametrize("in_kind", INPUT_LAYOUTS)
@pytest.mark.parametrize("grad_kind", GRAD_LAYOUTS)
def test_up2_fuse_backward_mixed_layouts(backend, in_kind, grad_kind):
    backend, dev = backend
    need("up2_fuse", backend, dev)
    coarse = layout(rand(N, C, H, W, seed=1, device=dev), in_kind).requires_grad_()
    fine = layout(rand(N, C, 2 * H, 2 * W, seed=2, device=dev), in_kind).requires_grad_()
    g = grad_in_layout(fine.shape, grad_kind, seed=3, device=dev)
    for gates in (False, True):  # weights need the sums; gates add per-(n, c) sums
        wc = (rand(1, seed=4, device=dev) + 1).requires_grad_()
        wf = (rand(1, seed=5, device=dev) - 0.5).requires_grad_()
        gc = torch.sigmoid(rand(N, C, seed=6, device=dev)).requires_grad_(gates) if gates else None
        gf = torch.sigmoid(rand(N, C, seed=7, device=dev)).requires_grad_(gates) if gates else None
        inputs = (coarse, fine, wc, wf, gc, gf)
        got = grads_of(lambda c, f, a, b, p, q: ops.up2_fuse(
            c, f, a, b, gate_coarse=p, gate_fine=q, backend=backend), inputs, g)
        want = reference_grads(lambda c, f, a, b, p, q: fused_reference(up2(c), f, a, b, p, q),
                               inputs, g)
        assert_grads_close(got, want)


@pytest.mark.parametrize("in_kind", INPUT_LAYOUTS)
@pytest.mark.parametrize("grad_kind", ["contiguous", "channels_last", "expanded"])
def test_triton_partials_follow_the_backward_launch(monkeypatch, in_kind, grad_kind):
    """The partial-sum buffer has exactly the slots of the grid that writes it, and a buffer
    planned for another layout is refused rather than summed half-written."""
    monkeypatch.setenv("LITEFPN_TRITON_PLAN", "gpu")
    coarse = layout(rand(N, C, H, W, seed=1), in_kind)
    fine = layout(rand(N, C, 2 * H, 2 * W, seed=2), in_kind)
    g = grad_in_layout(fine.shape, grad_kind, seed=3)
    parts = torch.empty(triton_up2.partials_shape(coarse, g))
    args = (g, coarse, fine, None, None, None, None, 1e-4, True, torch.empty_like(coarse),
            torch.empty_like(fine), parts)
    _, grid, _, _ = triton_up2.plan_backward(*args)
    assert parts.shape[1] * N == grid[0] and parts.shape[1] > 1
    other = layout(g.contiguous(), "contiguous" if in_kind == "channels_last"
                      else "channels_last")
    wrong = torch.empty(triton_up2.partials_shape(coarse, other))
    if wrong.shape != parts.shape:
        with pytest.raises(RuntimeError, match="partials buffer"):
            triton_up2.plan_backward(*args[:-1], wrong)


# ----------------------------------------------------------------------------- lateral_up2_fuse
def lateral_reference(training):
    def fn(coarse, z, conv_w, bn_w, bn_b, wc, wf, gc, gf):
        y = F.conv2d(z, conv_w)
        if training:
            mean = y.mean(dim=(0, 2, 3), keepdim=True)
            var = y.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        else:  # the fixed running statistics of lateral_inputs
            mean = torch.linspace(-0.2, 0.2, y.shape[1], dtype=y.dtype,
                                  device=y.device)[None, :, None, None]
            var = torch.linspace(0.5, 1.5, y.shape[1], dtype=y.dtype,
                                 device=y.device)[None, :, None, None]
        y = (y - mean) / torch.sqrt(var + 1e-5) * bn_w[None, :, None, None] \
            + bn_b[None, :, None, None]
        return fused_reference(up2(coarse), y, wc, wf, gc, gf)
    return fn


@backend_params()
@pytest.mark.parametrize("in_kind", INPUT_LAYOUTS)
@pytest.mark.parametrize("grad_kind", GRAD_LAYOUTS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_lateral_up2_fuse_backward_mixed_layouts(backend, in_kind, grad_kind, training):
    backend, dev = backend
    need("lateral_up2_fuse", backend, dev)
    N = LATERAL_N
    coarse = layout(rand(N, C, H, W, seed=1, device=dev), in_kind).requires_grad_()
    z = layout(rand(N, CIN, 2 * H, 2 * W, seed=2, device=dev), in_kind).requires_grad_()
    conv_w = (rand(C, CIN, 1, 1, seed=3, device=dev) / CIN ** 0.5).requires_grad_()
    bn_w = (1 + 0.2 * rand(C, seed=4, device=dev)).requires_grad_()
    bn_b = (0.1 * rand(C, seed=5, device=dev)).requires_grad_()
    wc = (rand(1, seed=6, device=dev) + 1).requires_grad_()
    wf = (rand(1, seed=7, device=dev) - 0.5).requires_grad_()
    gc = torch.sigmoid(rand(N, C, seed=8, device=dev)).requires_grad_()
    gf = torch.sigmoid(rand(N, C, seed=9, device=dev)).requires_grad_()
    g = grad_in_layout((N, C, 2 * H, 2 * W), grad_kind, seed=10, device=dev)

    def fused(c, zz, cw, bw, bb, a, b, p, q):
        running_mean = torch.linspace(-0.2, 0.2, C, dtype=torch.float64, device=dev)
        running_var = torch.linspace(0.5, 1.5, C, dtype=torch.float64, device=dev)
        return ops.lateral_up2_fuse(c, zz, cw, bw, bb, running_mean, running_var, training,
                                    w_coarse=a, w_fine=b, gate_coarse=p, gate_fine=q,
                                    backend=backend)
    inputs = (coarse, z, conv_w, bn_w, bn_b, wc, wf, gc, gf)
    assert_grads_close(grads_of(fused, inputs, g),
                       reference_grads(lateral_reference(training), inputs, g))


# ----------------------------------------------------------------------------- bn_silu
@backend_params()
@pytest.mark.parametrize("in_kind", INPUT_LAYOUTS)
@pytest.mark.parametrize("grad_kind", GRAD_LAYOUTS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_bn_silu_backward_mixed_layouts(backend, in_kind, grad_kind, training):
    backend, dev = backend
    need("bn_silu", backend, dev)
    x = layout(rand(N, C, 2 * H, 2 * W, seed=1, device=dev), in_kind).requires_grad_()
    bn_w = (1 + 0.2 * rand(C, seed=2, device=dev)).requires_grad_()
    bn_b = (0.1 * rand(C, seed=3, device=dev)).requires_grad_()
    rm = torch.linspace(-0.2, 0.2, C, dtype=torch.float64, device=dev)
    rv = torch.linspace(0.5, 1.5, C, dtype=torch.float64, device=dev)
    g = grad_in_layout(x.shape, grad_kind, seed=4, device=dev)

    def reference(xx, w, b):
        if training:
            mean = xx.mean(dim=(0, 2, 3), keepdim=True)
            var = xx.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        else:
            mean, var = rm[None, :, None, None], rv[None, :, None, None]
        return F.silu((xx - mean) / torch.sqrt(var + 1e-5) * w[None, :, None, None]
                      + b[None, :, None, None])
    inputs = (x, bn_w, bn_b)
    got = grads_of(lambda xx, w, b: ops.bn_silu(xx, w, b, rm.clone(), rv.clone(), training,
                                                backend=backend), inputs, g)
    assert_grads_close(got, reference_grads(reference, inputs, g))
