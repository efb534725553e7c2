"""The workloads the report (run.py) and the pytest-benchmark microbenchmarks time.

A workload is a closure over its inputs: `make_case(...)` returns a `Case` with one callable per
pass ("fwd", "fwd_bwd", "eval") and the bytes each pass must move at the least (one read of every
input, one write of every output: `ideal_bytes`), which turns a time into an achieved bandwidth.
What the kernels move by design, and the GPU prediction from it: benchmarks/bandwidth_model.py.

Implementations ("impl"): "eager" (the plain PyTorch composition), "compile" (torch.compile of
that composition) and every fused backend of litefpn_kernels that runs on the device.
"""
import copy
import dataclasses
import math
from typing import Callable, Dict, Optional

import torch

from litefpn_kernels import LiteFPN, backends, eager, ops

PASSES = ("fwd", "fwd_bwd", "eval")
#: the spec's levels: name -> (coarse H, W at batch-independent spec size, channels of z)
LEVELS = {"1/16": ((8, 16), 128), "1/8": ((16, 32), 64), "1/4": ((32, 64), 32)}
SPEC_FEATS = ((32, 64, 128), (64, 32, 64), (128, 16, 32), (256, 8, 16))
CHANNELS = 128


@dataclasses.dataclass
class Case:
    op: str
    impl: str
    run: Dict[str, Callable[[], None]]
    bytes: Dict[str, Optional[int]]
    #: the op rows' activation inputs by name (`map_shapes`), and the training forward that
    #: returns the output (what run["fwd"] calls); None for the neck and the copy
    maps: Optional[Dict[str, torch.Tensor]] = None
    forward: Optional[Callable[[], torch.Tensor]] = None


def map_shapes(op, level, batch):
    """({input name: shape}, output shape) of the activation maps of an op row at `level`."""
    (h, w), cin = LEVELS[level]
    coarse, fine = (batch, CHANNELS, h, w), (batch, CHANNELS, 2 * h, 2 * w)
    if op == "up2_fuse":
        return {"coarse": coarse, "fine": fine}, fine
    if op == "lateral_up2_fuse":
        return {"coarse": coarse, "z": (batch, cin, 2 * h, 2 * w)}, fine
    if op == "bn_silu":
        return {"x": fine}, fine
    raise ValueError(f"no activation maps for {op!r}")


def ideal_bytes(op, level, batch, dtype):
    """The bytes a pass must move at the least ("ideal": every map read once, written once), by
    pass: fwd and eval read each input map and write the output; bwd reads grad_out and each
    input map (every one is needed: the fusion-weight sums read coarse and fine, the 1x1 conv's
    and BatchNorm's gradients z, bn_silu's x) and writes each input's gradient; fwd_bwd is both.
    Parameters, statistics and fusion weights (< 0.1% at the spec's shapes) are left out."""
    ins, out = map_shapes(op, level, batch)
    size = torch.empty((), dtype=dtype).element_size()
    nbytes = lambda shape: math.prod(shape) * size  # noqa: E731
    read = sum(nbytes(s) for s in ins.values())
    fwd, bwd = read + nbytes(out), nbytes(out) + 2 * read
    return {"fwd": fwd, "eval": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}


#: torch.compile's mode for the "compile" rows; None: max-autotune-no-cudagraphs on a GPU (the
#: strongest compile without CUDA graphs), the default mode on CPU. run.py --compile-mode sets it.
COMPILE_MODE = None


def compile_mode(device):
    if COMPILE_MODE is not None:
        return None if COMPILE_MODE == "default" else COMPILE_MODE
    return "max-autotune-no-cudagraphs" if device.type == "cuda" else None


def fused_backends(device, op="lateral_up2_fuse"):
    """Fused backends that can run `op` on `device` here (the Triton interpreter is not timed);
    the neck runs lateral_up2_fuse at every fused level."""
    return [name for name in backends.BACKENDS
            if name != "eager" and not (name == "triton" and device.type != "cuda")
            and backends.unavailable_reason(op, name, device) is None]


def _fmt(t, channels_last):
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _rand(shape, dtype, device, channels_last, requires_grad=False):
    t = _fmt(torch.randn(shape, device=device, dtype=dtype), channels_last)
    return t.requires_grad_(requires_grad)


def _passes(forward, inputs, grad_like):
    """fwd: forward with autograd recording; fwd_bwd: forward + backward; eval: no_grad."""
    grad = torch.randn_like(grad_like)

    def fwd():
        forward()

    def fwd_bwd():
        out = forward()
        torch.autograd.backward(out, grad)
        for t in inputs:
            t.grad = None

    def evaluate():
        with torch.no_grad():
            forward()

    return {"fwd": fwd, "fwd_bwd": fwd_bwd, "eval": evaluate}


def _in_eval(eval_fwd, state):
    """The eval pass of a BatchNorm op: eval_fwd with state["training"] False (BN with running
    statistics), back to True afterwards."""
    def evaluate():
        state["training"] = False
        try:
            eval_fwd()
        finally:
            state["training"] = True
    return evaluate


def _compiled(fn, device):
    return torch.compile(fn, mode=compile_mode(device), dynamic=False)


def up2_fuse_case(impl, level, batch, dtype, device, channels_last):
    (h, w), _ = LEVELS[level]
    coarse = _rand((batch, CHANNELS, h, w), dtype, device, channels_last, True)
    fine = _rand((batch, CHANNELS, 2 * h, 2 * w), dtype, device, channels_last, True)
    w_c = torch.ones(1, device=device, requires_grad=True)
    w_f = torch.full((1,), 0.5, device=device, requires_grad=True)
    if impl in ("eager", "compile"):
        fn = lambda c, f, a, b: eager.up2_fuse(c, f, a, b)  # noqa: E731
        if impl == "compile":
            fn = _compiled(fn, device)
    else:
        fn = lambda c, f, a, b: ops.up2_fuse(c, f, a, b, backend=impl)  # noqa: E731
    inputs = [coarse, fine, w_c, w_f]
    forward = lambda: fn(*inputs)  # noqa: E731
    return Case(f"up2_fuse@{level}", impl, _passes(forward, inputs, fine),
                ideal_bytes("up2_fuse", level, batch, dtype), {"coarse": coarse, "fine": fine},
                forward)


def lateral_up2_fuse_case(impl, level, batch, dtype, device, channels_last):
    (h, w), cin = LEVELS[level]
    coarse = _rand((batch, CHANNELS, h, w), dtype, device, channels_last, True)
    z = _rand((batch, cin, 2 * h, 2 * w), dtype, device, channels_last, True)
    conv_w = _fmt(torch.randn(CHANNELS, cin, 1, 1, device=device, dtype=dtype) / cin ** 0.5,
                  channels_last).requires_grad_()
    bn_w = torch.ones(CHANNELS, device=device, dtype=dtype, requires_grad=True)
    bn_b = torch.zeros(CHANNELS, device=device, dtype=dtype, requires_grad=True)
    stats = [torch.zeros(CHANNELS, device=device, dtype=dtype),
             torch.ones(CHANNELS, device=device, dtype=dtype)]
    w_c = torch.ones(1, device=device, requires_grad=True)
    w_f = torch.full((1,), 0.5, device=device, requires_grad=True)
    state = {"training": True}
    if impl in ("eager", "compile"):
        def fn(c, zz, cw, bw, bb, a, b, training):
            return eager.lateral_up2_fuse(c, zz, cw, bw, bb, stats[0], stats[1], training,
                                          w_coarse=a, w_fine=b)
        if impl == "compile":
            fn = _compiled(fn, device)
    else:
        def fn(c, zz, cw, bw, bb, a, b, training):
            return ops.lateral_up2_fuse(c, zz, cw, bw, bb, stats[0], stats[1], training,
                                        w_coarse=a, w_fine=b, backend=impl)
    inputs = [coarse, z, conv_w, bn_w, bn_b, w_c, w_f]
    forward = lambda: fn(*inputs, state["training"])  # noqa: E731
    run = _passes(forward, inputs, coarse.new_empty((batch, CHANNELS, 2 * h, 2 * w)))
    train_fwd, train_step = run["fwd"], run["fwd_bwd"]
    evaluate = _in_eval(run["eval"], state)
    return Case(f"lateral_up2_fuse@{level}", impl,
                {"fwd": train_fwd, "fwd_bwd": train_step, "eval": evaluate},
                ideal_bytes("lateral_up2_fuse", level, batch, dtype), {"coarse": coarse, "z": z},
                forward)


def bn_silu_case(impl, level, batch, dtype, device, channels_last):
    """A smooth's BatchNorm + SiLU on the level's output map [B, 128, 2H, 2W] (training:
    batch statistics and the running-statistics update; eval: running statistics)."""
    (h, w), _ = LEVELS[level]
    x = _rand((batch, CHANNELS, 2 * h, 2 * w), dtype, device, channels_last, True)
    acc = torch.float32 if dtype != torch.float64 else dtype
    bn_w = torch.ones(CHANNELS, device=device, dtype=acc, requires_grad=True)
    bn_b = torch.zeros(CHANNELS, device=device, dtype=acc, requires_grad=True)
    stats = [torch.zeros(CHANNELS, device=device, dtype=acc),
             torch.ones(CHANNELS, device=device, dtype=acc)]
    state = {"training": True}
    backend = "eager" if impl in ("eager", "compile") else impl

    def fn(xx, w, b, training):
        return ops.bn_silu(xx, w, b, stats[0], stats[1], training, backend=backend)
    if impl == "compile":
        fn = _compiled(fn, device)
    inputs = [x, bn_w, bn_b]
    forward = lambda: fn(*inputs, state["training"])  # noqa: E731
    run = _passes(forward, inputs, x)
    return Case(f"bn_silu@{level}", impl, {"fwd": run["fwd"], "fwd_bwd": run["fwd_bwd"],
                                          "eval": _in_eval(run["eval"], state)},
                ideal_bytes("bn_silu", level, batch, dtype), {"x": x}, forward)


def impls_for(op, device):
    """eager, compile and the fused backends that have kernels for `op` on `device`."""
    fused = fused_backends(device, op if op in backends.registry.OPS else "lateral_up2_fuse")
    return ["eager", "compile"] + fused


def neck_feats(batch, dtype, device, channels_last, requires_grad=True):
    return [_rand((batch,) + s, dtype, device, channels_last, requires_grad) for s in SPEC_FEATS]


def neck_case(impl, batch, dtype, device, channels_last, neck=None):
    """The whole neck (fuse="weighted"): training step (fwd, fwd_bwd) and eval forward.

    Parameters stay fp32; a low-precision dtype runs under autocast, as users train.
    """
    torch.manual_seed(0)
    base = neck if neck is not None else LiteFPN(fuse="weighted")
    base = base.to(device)
    if channels_last:
        base = base.to(memory_format=torch.channels_last)
    train_m, eval_m = copy.deepcopy(base).train(), copy.deepcopy(base).eval()
    # eager and compile time the plain module, whatever `auto` would pick on this device
    train_m.backend = eval_m.backend = impl if impl not in ("eager", "compile") else "eager"
    if impl == "compile":
        train_run, eval_run = _compiled(train_m, device), _compiled(eval_m, device)
    else:
        train_run, eval_run = train_m, eval_m
    feats = neck_feats(batch, dtype if dtype == torch.float64 else torch.float32, device,
                       channels_last)
    low_precision = dtype in (torch.float16, torch.bfloat16)
    if low_precision:
        feats = [f.detach().to(dtype).requires_grad_() for f in feats]

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=low_precision)

    grads = None

    def fwd():
        with autocast():
            return [o for o in train_run(feats) if o is not None]

    def fwd_bwd():
        nonlocal grads
        outs = fwd()
        if grads is None:
            grads = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, grads)
        for t in feats + list(train_m.parameters()):
            t.grad = None

    def evaluate():
        with torch.no_grad(), autocast():
            eval_run(feats)

    return Case("neck", impl, {"fwd": fwd, "fwd_bwd": fwd_bwd, "eval": evaluate},
                {"fwd": None, "fwd_bwd": None, "eval": None})


def copy_case(batch, dtype, device, channels_last):
    """The bandwidth yardstick: a device copy of one 1/4-level map [B, 128, 64, 128]."""
    src = _rand((batch, CHANNELS, 64, 128), dtype, device, channels_last)
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * src.element_size()
    return Case("copy", "torch", {"eval": lambda: dst.copy_(src)}, {"eval": nbytes})
