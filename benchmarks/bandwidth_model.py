"""The bandwidth model of the GPU kernels: what each pass must move, what it moves by design, and
what that predicts on an H100 / H200 until a GPU run measures it.

    python -m benchmarks.bandwidth_model      # writes benchmarks/results/gpu_model.md

Three byte counts per op row (op, level, pass) at the spec's shapes (batch 256, bf16,
channels_last):

* **ideal**: every map read once, every output written once (`cases.ideal_bytes`, the bytes the
  report's GB/s and "% copy (ideal)" use).
* **designed**: what the fused operators move by design, counted, not written down: the op runs
  (on CPU, through the CPU kernels, which have the same contracts, inside the passes the GPU
  backends build around their kernels, litefpn_kernels/ops/_passes.py) under `TrafficCounter`, a
  dispatch mode that logs every kernel it issues (the private `litefpn::_*` kernels and the
  launches of the small BatchNorm / fusion-weight math: the GPU backends' Triton steps and
  their cuBLAS calls, `_CountedSteps`) with the tensors it reads and writes, each counted once
  per kernel. Added per GPU backend: the fp32 partial sums its launch plan
  writes and a second kernel reads back (`scratch`, from the Triton planners themselves and from
  the CUDA plans in csrc/cuda). Not counted: re-reads a kernel's tiling makes of its own inputs
  (halo rows, the bilinear taps, CUDA's two channel tiles of one pixel tile), which the kernels
  arrange to hit L1/L2.
* **eager**: the same count over the plain PyTorch composition (its aten ops, each reading its
  inputs and writing its output once), plus the passes CUDA's implementations of three ops add
  (`CUDA_ATEN_PASSES`): a lower bound of eager's traffic.

Counts are taken at batch 1 and 2 and extrapolated linearly (every activation scales with the
batch, parameters do not), kernel by kernel, so the logs at batch 256 are exact; the scratch is
planned at batch 256 directly.

Time of each kernel (a roofline, `predict_time`): max(bytes / (COPY_FRACTION x peak HBM
bandwidth), FLOPs / (COMPUTE_FRACTION x peak FLOP/s of the unit it runs on)) + LAUNCH_US; a pass
is the sum over its kernels. Everything this module prints is a PREDICTION: nothing here ran on
a GPU.
"""
import argparse
import dataclasses
import functools
import math
import os
import sys
from typing import Dict, List, Optional

import torch
from torch.utils._python_dispatch import (TorchDispatchMode, _disable_current_modes,
                                          _get_current_dispatch_mode)
from torch.utils._pytree import tree_flatten

from litefpn_kernels.backends import compiled, registry
from litefpn_kernels.backends.triton_kernels import TRITON_IMPORTABLE
from litefpn_kernels.ops import _steps

from . import cases

LABEL = "PREDICTED, UNMEASURED"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu_model.md")

# ----------------------------------------------------------------------------- assumptions
#: nominal datasheet figures (NVIDIA H100 and H200 Tensor Core GPU datasheets, SXM parts; dense
#: tensor-core rates, i.e. without sparsity). Both have the same compute; H200 has HBM3e.
GPUS = {
    "H100 SXM": dict(hbm=3.35e12, fp32=66.9e12, tf32=494.7e12, bf16=989.4e12),
    "H200 SXM": dict(hbm=4.8e12, fp32=66.9e12, tf32=494.7e12, bf16=989.4e12),
}
#: a large device-to-device copy typically reaches ~85-90% of the peak HBM bandwidth; the
#: model takes the low end for the copy and assumes every memory-bound kernel runs at copy speed
COPY_FRACTION = 0.85
#: fraction of the peak FLOP/s a GEMM-shaped kernel reaches (cuDNN's 3x3 convolutions, the
#: lateral's channel mixes); the neck's table shows 0.4 and 0.8 too
COMPUTE_FRACTION = 0.6
#: GPU time per kernel launch beyond its bytes (ramp-up, tail, the gap to the next kernel of a
#: busy stream); host (Python) time is not modelled: see the notes in the markdown
LAUNCH_US = 3.0
SPEC = dict(batch=256, dtype=torch.bfloat16, channels_last=True)
BACKENDS = ("triton", "cuda")


# ----------------------------------------------------------------------------- counting
def tensor_bytes(t):
    """Bytes of t's distinct elements (a zero-stride, broadcast dimension counts once)."""
    n = t.element_size()
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n if t.numel() else 0


#: ops that move no data (allocation, metadata, host reads of a scalar)
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
         "_local_scalar_dense", "lift_fresh", "resize_", "set_"}
#: ops that write their output without reading an input tensor
_WRITE_ONLY = {"zeros_like", "ones_like", "full_like", "zeros", "ones", "full", "fill_",
               "zero_", "new_zeros", "new_ones", "new_full", "scalar_tensor"}


@dataclasses.dataclass
class Kernel:
    """One logged kernel: name, bytes read / written, FLOPs of its GEMM part and where they run
    ("conv": cuDNN at the activation dtype; "lateral": a litefpn channel mix or gram, whose unit
    is the backend's), `spec`: a private litefpn kernel's 4-D arguments and flags (for its
    backend's scratch; None for aten ops), `cuda_extra`: bytes CUDA's aten implementation adds
    (`CUDA_ATEN_PASSES`), `launches`."""
    name: str
    reads: float
    writes: float
    flops: float = 0.0
    unit: Optional[str] = None
    spec: Optional[dict] = None
    cuda_extra: float = 0.0
    launches: int = 1


def _conv_flops(func_name, args, out):
    if func_name == "convolution":
        weight = args[1]  # [C_out, C_in / groups, kh, kw]
        return 2.0 * out.numel() * weight.shape[1] * weight.shape[2] * weight.shape[3]
    # convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation,
    # transposed, output_padding, groups, output_mask): grad_input and grad_weight each cost
    # what the forward does
    grad, weight, mask = args[0], args[2], args[10]
    per = 2.0 * grad.numel() * weight.shape[1] * weight.shape[2] * weight.shape[3]
    return per * (int(bool(mask[0])) + int(bool(mask[1])))


def _lateral_flops(name, args):
    if name == "_lateral_gram":           # (a [N,Ca,H,W], b [N,Cb,H,W], ...)
        a, b = args[0], args[1]
        return 2.0 * a.shape[0] * a.shape[2] * a.shape[3] * a.shape[1] * b.shape[1]
    if name == "_lateral_up2_fuse_fwd":   # (coarse, z [N,Cin,2H,2W], weight [C,Cin], ...)
        z, weight = args[1], args[2]
        return 2.0 * z.shape[0] * z.shape[2] * z.shape[3] * weight.shape[0] * weight.shape[1]
    if name == "_lateral_grad_z":         # (grad_out, z, weight, scale, quad, shift)
        g, z, quad = args[0], args[1], args[4]
        px = g.shape[0] * g.shape[2] * g.shape[3]
        return 2.0 * px * z.shape[1] * (g.shape[1] + (z.shape[1] if quad is not None else 0))
    return 0.0


def _unread_args(name, args):
    """Arguments a private kernel receives but does not read: the up2 backward kernels read
    coarse / fine only for the fusion-weight sums."""
    if name == "_up2_fuse_bwd" and not args[8]:
        return [args[1], args[2]]
    if name == "_up2_fuse_bwd_coarse" and not args[6]:
        return [args[1]]
    return []


class TrafficCounter(TorchDispatchMode):
    """Logs every kernel issued under it (`self.kernels`), each reading its distinct input tensors
    once and writing its outputs once. The public litefpn custom ops are opened (their Python
    bodies run under the mode), so the log shows the private kernels and the host-side math."""

    def __init__(self):
        super().__init__()
        self.kernels: List[Kernel] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        from torch._library.custom_ops import OPDEFS
        opdef = OPDEFS.get(func._schema.name)
        if opdef is not None:  # a public litefpn op: count what its body issues
            with self:
                return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in _FREE:
            return out
        flat_in = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        flat_out = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if name in _WRITE_ONLY:
            flat_in = []
        elif name == "copy_":
            flat_in = flat_in[1:]
        skip = {id(t) for t in _unread_args(name, args)}
        reads = _distinct_bytes(t for t in flat_in if id(t) not in skip)
        writes = _distinct_bytes(flat_out)
        k = Kernel(func._schema.name.replace("aten::", ""), reads, writes)
        if name in ("convolution", "convolution_backward"):
            k.flops, k.unit = _conv_flops(name, args, flat_out[0] if flat_out else None), "conv"
        elif func.namespace == "litefpn":
            k.name = name
            k.flops = _lateral_flops(name, args)
            k.unit = "lateral" if k.flops else None
            k.spec = _kernel_spec(name, args)
        k.cuda_extra = _cuda_extra(name, args, flat_out)
        if k.cuda_extra:
            k.launches = 2
        self.kernels.append(k)
        return out


def _distinct_bytes(tensors):
    seen, total = set(), 0
    for t in tensors:
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor_bytes(t)
    return total


def _kernel_spec(name, args):
    """The 4-D arguments (shape, dtype, channels-innermost) and flags a backend's plan needs."""
    maps = [(tuple(a.shape), a.dtype, a.shape[1] > 1 and a.stride(1) == 1)
            for a in args if isinstance(a, torch.Tensor) and a.dim() == 4]
    flags = {}
    if name == "_up2_fuse_bwd":
        flags["need_sums"] = bool(args[8])
    elif name == "_up2_fuse_bwd_coarse":
        flags["need_sums"] = bool(args[6])
    return dict(maps=maps, **flags)


#: the passes ATen's CUDA kernels make beyond one read of each input and one write of each
#: output, wherever these ops run (eager, and the unfused steps of the fused neck): training
#: BatchNorm computes the batch statistics in a pass of its own before normalising; its backward
#: reduces (grad_out, input) before the element-wise pass; upsample_bilinear2d_backward
#: zero-fills grad_input, then scatters with atomicAdd
CUDA_ATEN_PASSES = {
    "native_batch_norm": "training: + one read of the input (statistics pass)",
    "native_batch_norm_backward":
        "training: + one read of grad_out and of the input (reduction pass)",
    "upsample_bilinear2d_backward":
        "+ one write of grad_input (zero fill before the atomicAdd scatter)",
}


def _cuda_extra(name, args, outs):
    if name == "native_batch_norm" and args[5]:
        return tensor_bytes(args[0])
    if name == "native_batch_norm_backward" and args[7]:
        return tensor_bytes(args[0]) + tensor_bytes(args[1])
    if name == "upsample_bilinear2d_backward":
        return tensor_bytes(outs[0])
    return 0.0


def count(fn):
    """The kernels fn() issues (one warm-up call first)."""
    fn()
    with TrafficCounter() as counter:
        fn()
    return counter.kernels


def extrapolate(k1: List[Kernel], k2: List[Kernel], batch: int) -> List[Kernel]:
    """Kernel logs at batch 1 and 2 -> the log at `batch` (bytes and FLOPs are affine in the
    batch: activations scale, parameters do not); 4-D shapes in `spec` get the batch."""
    if [k.name for k in k1] != [k.name for k in k2]:
        raise RuntimeError("the kernel sequence depends on the batch: cannot extrapolate")
    out = []
    for a, b in zip(k1, k2):
        lin = lambda x, y: x + (y - x) * (batch - 1)  # noqa: E731
        spec = None
        if a.spec is not None:
            spec = dict(a.spec, maps=[((batch,) + s[1:], dt, nhwc)
                                      for s, dt, nhwc in a.spec["maps"]])
        out.append(Kernel(a.name, lin(a.reads, b.reads), lin(a.writes, b.writes),
                          lin(a.flops, b.flops), a.unit, spec,
                          lin(a.cuda_extra, b.cuda_extra), a.launches))
    return out


# ----------------------------------------------------------------------------- scratch
def _meta(shape, dtype, nhwc):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.to(memory_format=torch.channels_last) if nhwc else t


def _cdiv(a, b):
    return -(-a // b)


def scratch(kernel: Kernel, backend: str):
    """(bytes, launches) a GPU backend's launch plan adds to a private kernel: fp32 partial sums
    written by the kernel and read back, in a fixed order, by a second kernel (no atomics).
    Triton: from its planners (litefpn_kernels/triton); CUDA: the plans in csrc/cuda
    (`plan_up2_bwd`, `plan_gram`, `bn_sums_plan`)."""
    if kernel.spec is None:
        return 0, 0
    name, maps = kernel.name, [_meta(*m) for m in kernel.spec["maps"]]
    acc = 8 if maps and maps[0].dtype == torch.float64 else 4
    if name in ("_up2_fuse_bwd", "_up2_fuse_bwd_coarse"):
        if not kernel.spec["need_sums"]:
            return 0, 0
        with_fine = name == "_up2_fuse_bwd"
        grad_out, coarse = maps[0], maps[1]
        n, c, h, w = coarse.shape
        if backend == "triton":
            from litefpn_kernels.triton import up2_fuse as t_up2
            parts = math.prod(t_up2.partials_shape(coarse, grad_out, interpret=False,
                                                   with_fine=with_fine))
            return 2 * parts * acc, 1
        ref = maps[2] if with_fine else grad_out  # grad_fine is laid out like fine
        v = 16 // ref.element_size()
        if c > 1 and ref.stride(1) == 1:
            gc = v if c % v == 0 else 1
            ctile = min(c // gc, 32)
            nchunks = _cdiv(h * w, (256 // ctile) * 4)
        else:
            gc = v // 2 if w % (v // 2) == 0 else 1
            nchunks = _cdiv(h, min(max(_cdiv(128, w // gc), 1), h))
        if nchunks == 1:
            return 0, 0
        k = 2 if with_fine else 1
        return 2 * k * n * c * nchunks * acc, k
    if name == "_lateral_gram":
        a, b = maps[0], maps[1]
        n, ca, h, w = a.shape
        cb = b.shape[1]
        if backend == "triton":
            from litefpn_kernels.triton import lateral_up2_fuse as t_lat
            chunks = t_lat.gram_tiling(a, b, interpret=False)[4]
        else:
            chunks = _cdiv(h * w, 512)
        if chunks == 1:
            return 0, 0
        return 2 * chunks * n * (ca * cb + ca) * acc, 2
    if name in ("_bn_silu_stats", "_bn_silu_bwd_sums"):
        x = maps[-1]
        n, c, h, w = x.shape
        if backend == "triton":
            from litefpn_kernels.triton import bn_silu as t_bn
            return 2 * 2 * c * t_bn.slots(x, interpret=False) * acc, 1
        v = 16 // x.element_size()
        nhwc = c > 1 and x.stride(1) == 1
        g = v if (c if nhwc else w) % v == 0 else 1
        chunk = (256 // min(c // g, 32)) * 8 if nhwc else 256 * g * 8
        return 2 * 2 * c * n * _cdiv(h * w, chunk) * acc, 2
    return 0, 0


# ----------------------------------------------------------------------------- time
def unit_rate(kernel: Kernel, impl: str, dtype, gpu: dict):
    """(FLOP/s peak, FLOP multiplier) of the unit a kernel's GEMM part runs on."""
    if kernel.unit == "conv":  # cuDNN: tensor cores at the activation dtype (TF32 for fp32)
        return (gpu["bf16"] if dtype in (torch.bfloat16, torch.float16) else gpu["tf32"]), 1
    if impl == "cuda":         # csrc/cuda: SIMT fp32 FMA tiles
        return gpu["fp32"], 1
    # Triton: tl.dot on fp32 operands; "tf32x3" (three MMAs) for the gram and for fp32 data
    exact = kernel.name == "_lateral_gram" or dtype == torch.float32
    return gpu["tf32"], (3 if exact else 1)


def kernel_bytes(kernel: Kernel, impl: str):
    """(bytes, launches) of a logged kernel on a GPU for `impl`: its reads and writes, the passes
    CUDA's aten kernels add, and (a fused backend's private kernels) the backend's scratch."""
    extra, launches = scratch(kernel, impl) if impl in BACKENDS else (0, 0)
    return (kernel.reads + kernel.writes + kernel.cuda_extra + extra,
            kernel.launches + launches)


def designed_bytes(op, impl, level, pass_, batch, dtype, channels_last):
    """Bytes a pass of an op row moves on a GPU for impl "eager", "triton" or "cuda" (the
    report's "moved" bytes)."""
    return sum(kernel_bytes(k, impl)[0]
               for k in kernel_log(op, impl, level, pass_, batch, dtype, channels_last))


def predict_time(kernels, impl, dtype, gpu, compute_fraction=COMPUTE_FRACTION):
    """(seconds, moved bytes, launches, seconds the lateral's GEMM-shaped kernels spend above
    their memory time) of a pass."""
    total = moved = excess = 0.0
    launches = 0
    bw = COPY_FRACTION * gpu["hbm"]
    for k in kernels:
        nbytes, n = kernel_bytes(k, impl)
        t_mem = nbytes / bw
        t = t_mem
        if k.flops:
            rate, mult = unit_rate(k, impl, dtype, gpu)
            t = max(t_mem, k.flops * mult / (compute_fraction * rate))
            if k.unit == "lateral":
                excess += t - t_mem
        total += t + n * LAUNCH_US * 1e-6
        moved += nbytes
        launches += n
    return total, moved, launches, excess


# ----------------------------------------------------------------------------- the op rows
class _CountedSteps:
    """The GPU backends' steps (litefpn_kernels/triton/steps.py, the passes' small math) as the
    counter sees them, on CPU tensors without the Triton interpreter: a step's values come from
    the PyTorch steps (ops/_steps.py), run out of the counter's sight; then the Triton step is
    called with its launches logged instead of run (one kernel each, reading its tensor
    arguments: [C]- and [C, Cin]-sized) and its library calls (torch.mm / mv: cuBLAS) logged as
    they run. Its outputs are discarded (the kernels did not fill them)."""

    def __init__(self):
        from litefpn_kernels.triton import steps
        self._gpu = steps

    def __getattr__(self, name):
        reference, gpu = getattr(_steps, name), getattr(self._gpu, name)

        def step(*args):
            with _disable_current_modes():
                out = reference(*args)
            launch = self._gpu._launch
            self._gpu._launch = _log_launch
            try:
                gpu(*args)
            finally:
                self._gpu._launch = launch
            return out
        return step


def _log_launch(kernel, grid, *args, **meta):
    counter = _get_current_dispatch_mode()
    if isinstance(counter, TrafficCounter):  # (not in the warm-up call before counting)
        # a map ([N, C, H, W]) is read at one value per channel (the pilot, x[0, :, 0, 0])
        maps = sum(a.shape[1] * a.element_size() for a in args
                   if isinstance(a, torch.Tensor) and a.dim() == 4)
        reads = _distinct_bytes(a for a in args if isinstance(a, torch.Tensor) and a.dim() < 4)
        counter.kernels.append(Kernel(f"triton:{kernel.fn.__name__}", reads + maps, 0.0))


#: The backend the fused GPU backends are counted through: the CPU kernels (the same contracts)
#: inside the passes the GPU backends build around their kernels
#: (litefpn_kernels/ops/_passes.py), with their steps as `_CountedSteps` logs them (the PyTorch
#: steps' own small ops where Triton is not installed). The `cpu` backend's own passes are
#: single C++ calls, which a dispatch mode cannot look into.
COUNTED = "cpu_kernels_in_gpu_passes"


def _counted_backend():
    if not registry.has_kernels("lateral_up2_fuse", COUNTED):
        steps = _CountedSteps() if TRITON_IMPORTABLE else _steps
        registry.register_backend(COUNTED, lambda op, device: registry.reason(op, "cpu", device))
        for op in registry.OPS:
            registry.register(op, COUNTED)(
                functools.partial(compiled.kernel_set, op, "CUDA", steps=steps))
    return COUNTED


def _case(op, impl, level, batch, dtype, channels_last):
    """The report's case of an op row on CPU; the fused GPU backends are counted through
    `COUNTED` (same kernel contracts, the GPU backends' passes)."""
    counted = _counted_backend() if impl in BACKENDS else impl
    if op == "neck":
        return cases.neck_case(counted, batch, dtype, torch.device("cpu"), channels_last)
    return getattr(cases, f"{op}_case")(counted, level, batch, dtype, torch.device("cpu"),
                                        channels_last)


def kernel_log(op, impl, level, pass_, batch=SPEC["batch"], dtype=SPEC["dtype"],
               channels_last=SPEC["channels_last"]):
    """The kernels of one pass ("fwd", "eval", "fwd_bwd"; "bwd" = fwd_bwd minus fwd) of an op row
    for impl "eager" or a fused backend (counted through `cpu`) at `batch`."""
    if pass_ == "bwd":
        fwd = kernel_log(op, impl, level, "fwd", batch, dtype, channels_last)
        both = kernel_log(op, impl, level, "fwd_bwd", batch, dtype, channels_last)
        if [k.name for k in both[:len(fwd)]] != [k.name for k in fwd]:
            raise RuntimeError(f"{op}: the training step does not start with the forward")
        return both[len(fwd):]
    counted = _counted_backend() if impl in BACKENDS else impl
    return extrapolate(*_counted_logs(op, counted, level, pass_, dtype, channels_last), batch)


@functools.lru_cache(maxsize=None)
def _counted_logs(op, impl, level, pass_, dtype, channels_last):
    """The kernel logs of a pass at batch 1 and 2 (cached: the rows share them)."""
    logs = []
    for b in (1, 2):
        torch.manual_seed(0)
        logs.append(count(_case(op, impl, level, b, dtype, channels_last).run[pass_]))
    return tuple(logs)


@dataclasses.dataclass
class Row:
    op: str
    level: Optional[str]
    pass_: str
    ideal: Optional[float]
    designed: Dict[str, float]       # impl -> bytes
    launches: Dict[str, int]
    time: Dict[str, Dict[str, float]]  # gpu -> impl -> seconds
    compute_excess: Dict[str, float]   # impl -> lateral kernels' seconds above their memory time
    kernels: Dict[str, List[Kernel]]


def predict_row(op, level, pass_, impls=("eager",) + BACKENDS, batch=SPEC["batch"],
                dtype=SPEC["dtype"], channels_last=SPEC["channels_last"],
                compute_fraction=COMPUTE_FRACTION):
    ideal = (cases.ideal_bytes(op, level, batch, dtype)[pass_] if op != "neck" else None)
    logs = {}
    for impl in impls:
        key = "cpu" if impl in BACKENDS else impl
        if key not in logs:
            logs[key] = kernel_log(op, impl, level, pass_, batch, dtype, channels_last)
    row = Row(op, level, pass_, ideal, {}, {}, {g: {} for g in GPUS}, {},
              {impl: logs["cpu" if impl in BACKENDS else impl] for impl in impls})
    for impl in impls:
        ks = row.kernels[impl]
        for g, spec in GPUS.items():
            t, moved, n, excess = predict_time(ks, impl, dtype, spec, compute_fraction)
            row.time[g][impl] = t
            if g == next(iter(GPUS)):
                row.designed[impl], row.launches[impl], row.compute_excess[impl] = moved, n, excess
    return row


def saved_bytes(impl, batch=SPEC["batch"], dtype=SPEC["dtype"],
                channels_last=SPEC["channels_last"]):
    """Bytes the neck's training forward keeps for the backward (distinct tensors saved by
    autograd, extrapolated from batch 1 and 2): the bulk of a training step's peak memory."""
    per = []
    for b in (1, 2):
        torch.manual_seed(0)
        case = _case("neck", impl, None, b, dtype, channels_last)
        case.run["fwd"]()
        seen = {}

        def pack(t):
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            case.run["fwd"]()
        per.append(sum(seen.values()))
    return per[0] + (per[1] - per[0]) * (batch - 1)


# ----------------------------------------------------------------------------- report
OP_ROWS = [(op, level) for op in ("up2_fuse", "lateral_up2_fuse", "bn_silu")
           for level in cases.LEVELS]
PASSES = ("fwd", "bwd", "fwd_bwd", "eval")
#: the spec's GPU goals: (op, pass) -> [(metric, bound)]; metric "copy" is % of the copy
#: bandwidth on ideal bytes, "eager" the speed-up over eager
GOALS = {
    ("up2_fuse", "fwd"): [("copy", 85.0)],
    ("up2_fuse", "bwd"): [("copy", 80.0), ("eager", 5.0)],
    ("lateral_up2_fuse", "fwd"): [("copy", 75.0)],
    ("lateral_up2_fuse", "fwd_bwd"): [("eager", 3.0)],
    ("neck", "fwd_bwd"): [("eager", 2.0)],
    ("neck", "eval"): [("eager", 2.5)],
}
#: goals a byte model cannot predict
UNMODELLED_GOALS = ["neck training step >= 1.3x torch.compile", "neck eval >= 1.3x torch.compile"]


def predict_all(op_rows=OP_ROWS, passes=PASSES, neck=True):
    rows = [predict_row(op, level, p) for op, level in op_rows for p in passes]
    if neck:
        rows += [predict_row("neck", None, p) for p in ("fwd_bwd", "eval")]
    return rows


def _mb(x):
    return f"{x / 1e6:.1f}"


def pct_copy(row, impl, gpu):
    """Predicted ideal bytes / time as a % of the assumed copy bandwidth (the goals' metric)."""
    return 100.0 * row.ideal / row.time[gpu][impl] / (COPY_FRACTION * GPUS[gpu]["hbm"])


def x_eager(row, impl, gpu):
    return row.time[gpu]["eager"] / row.time[gpu][impl]


def _goal_text(metric, bound):
    return f">= {bound:.0f}% of copy bandwidth" if metric == "copy" else f">= {bound:g}x eager"


def _find(rows, op, level, pass_):
    return next((r for r in rows if (r.op, r.level, r.pass_) == (op, level, pass_)), None)


def goal_table(rows, neck_sensitivity=None, saved=None):
    """Markdown lines: one row per goal and level, the predicted value per backend against the
    bound, and why (bytes, launches, compute)."""
    g0 = next(iter(GPUS))
    lines = [f"| goal | row | triton | cuda | why | status |", "|---|---|---|---|---|---|"]
    for (op, pass_), crits in GOALS.items():
        goal = f"{op} {pass_}: " + ", ".join(_goal_text(*c) for c in crits)
        for level in ([None] if op == "neck" else list(cases.LEVELS)):
            r = _find(rows, op, level, pass_)
            if r is None:
                continue
            cells = []
            for impl in BACKENDS:
                vals, ok = [], True
                for metric, bound in crits:
                    v = pct_copy(r, impl, g0) if metric == "copy" else x_eager(r, impl, g0)
                    vals.append(f"{v:.0f}%" if metric == "copy" else f"{v:.2f}x")
                    ok = ok and v >= bound
                cells.append(", ".join(vals) + (" (meets)" if ok else " (misses)"))
            launch_us = r.launches["triton"] * LAUNCH_US
            why = []
            if r.ideal is not None:
                why.append(f"ideal/designed bytes {100.0 * r.ideal / r.designed['triton']:.0f}% "
                           f"(triton), {100.0 * r.ideal / r.designed['cuda']:.0f}% (cuda)")
            else:
                why.append(f"{_mb(r.designed['eager'])} MB eager vs {_mb(r.designed['triton'])} "
                           f"MB fused; convolutions {conv_share(r, 'eager', g0):.0%} of eager's "
                           f"time, {conv_share(r, 'triton', g0):.0%} of fused")
                if neck_sensitivity and pass_ in neck_sensitivity:
                    why.append("triton at " + ", ".join(
                        f"{f:.0%} conv efficiency: {x:.2f}x" for f, x in neck_sensitivity[pass_]))
            why.append(f"launches: {r.launches['triton']} (~{launch_us:.0f} of "
                       f"{r.time[g0]['triton'] * 1e6:.0f} us, triton), eager's "
                       f"{r.launches['eager']}")
            if r.compute_excess.get("cuda", 0) > 0.05 * r.time[g0]["cuda"]:
                why.append(f"cuda compute-bound (FP32 SIMT channel mixes: "
                           f"+{r.compute_excess['cuda'] * 1e6:.0f} us)")
            lines.append(f"| {goal} | {level or 'whole neck'} | {cells[0]} | {cells[1]} | "
                         f"{'; '.join(why)} | {LABEL} |")
    if saved:
        ratio = saved["triton"] / saved["eager"]
        lines.append(f"| neck fwd_bwd: <= 0.6x eager's peak memory | whole neck | "
                     f"{ratio:.2f}x ({'meets' if ratio <= 0.6 else 'misses'}) | same steps | "
                     f"bytes saved for the backward (the bulk of the peak): {_mb(saved['triton'])}"
                     f" MB fused vs {_mb(saved['eager'])} MB eager | {LABEL} |")
    neck = any(r.op == "neck" for r in rows)
    for goal in (UNMODELLED_GOALS if neck else []):
        lines.append(f"| {goal} | whole neck | not predicted | not predicted | inductor's fusion "
                     f"is not modelled | {LABEL} |")
    return lines


def conv_share(row, impl, gpu):
    """The share of a pass's predicted time spent in cuDNN convolutions."""
    conv = [k for k in row.kernels[impl] if k.unit == "conv"]
    return predict_time(conv, impl, SPEC["dtype"], GPUS[gpu])[0] / row.time[gpu][impl]


def neck_sensitivity(fractions=(0.4, 0.8)):
    """{pass: [(compute fraction, triton's predicted x eager)]}: how the neck's ratios move with
    the convolutions' efficiency."""
    g0, out = next(iter(GPUS)), {}
    for pass_ in ("fwd_bwd", "eval"):
        out[pass_] = [(f, x_eager(predict_row("neck", None, pass_, ("eager", "triton"),
                                              compute_fraction=f), "triton", g0))
                      for f in fractions]
    return out


def _assumptions():
    return ("Assumptions (nominal datasheet figures, SXM parts, dense tensor-core rates): "
            + "; ".join(f"{g}: {s['hbm'] / 1e12:.2f} TB/s HBM, {s['bf16'] / 1e12:.0f} TFLOP/s "
                        f"bf16, {s['tf32'] / 1e12:.0f} TF32, {s['fp32'] / 1e12:.0f} FP32 (SIMT)"
                        for g, s in GPUS.items())
            + f". A large copy reaches {COPY_FRACTION:.0%} of the peak bandwidth (typically "
            "85-90%), and every memory-bound kernel is assumed to run at that copy speed on its "
            "designed bytes; GEMM-shaped kernels (cuDNN convolutions, the lateral's gram and "
            "channel mixes: TF32 tensor cores in Triton, x3 for its tf32x3 dots, FP32 SIMT in "
            f"csrc/cuda) at {COMPUTE_FRACTION:.0%} of their unit's peak; {LAUNCH_US:.0f} us of "
            "GPU time per kernel launch. Host (Python, dispatcher) time is not modelled.")


def op_rows_table(rows):
    """Markdown lines: per op row, ideal / designed / eager bytes, launches, predicted time on
    both GPUs, % of copy bandwidth and x eager; each row labelled."""
    g0, g1 = list(GPUS)
    lines = [
        "| op | level | pass | ideal MB | designed MB triton / cuda | eager MB | launches "
        "triton / cuda / eager | us triton / cuda / eager | % copy triton / cuda | x eager "
        f"triton / cuda | {g1} us triton / cuda / eager | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.op == "neck":
            continue
        t, t1 = r.time[g0], r.time[g1]
        lines.append(
            f"| {r.op} | {r.level} | {r.pass_} | {_mb(r.ideal)} | "
            f"{_mb(r.designed['triton'])} / {_mb(r.designed['cuda'])} | "
            f"{_mb(r.designed['eager'])} | "
            f"{r.launches['triton']} / {r.launches['cuda']} / {r.launches['eager']} | "
            f"{t['triton'] * 1e6:.0f} / {t['cuda'] * 1e6:.0f} / {t['eager'] * 1e6:.0f} | "
            f"{pct_copy(r, 'triton', g0):.0f} / {pct_copy(r, 'cuda', g0):.0f} | "
            f"{x_eager(r, 'triton', g0):.2f} / {x_eager(r, 'cuda', g0):.2f} | "
            f"{t1['triton'] * 1e6:.0f} / {t1['cuda'] * 1e6:.0f} / {t1['eager'] * 1e6:.0f} | "
            f"{LABEL} |")
    return lines


def markdown(rows, neck_sensitivity=None, saved=None):
    """benchmarks/results/gpu_model.md: every section and row labelled PREDICTED, UNMEASURED."""
    g0, g1 = list(GPUS)
    lines = [
        f"# GPU bandwidth model: {LABEL}",
        "",
        f"**{LABEL}.** Every number below is a prediction of `benchmarks/bandwidth_model.py` "
        "(`python -m benchmarks.bandwidth_model` writes this file); nothing here ran on a GPU. "
        "A GPU run of the report (`python -m benchmarks.run`) measures the same rows.",
        "",
        "Shapes: the spec's levels (`benchmarks/cases.py` LEVELS), batch 256, bf16 activations, "
        "channels_last, the rows as the report builds them (fusion weights with gradients, "
        "training BatchNorm in fwd / bwd / fwd_bwd, running statistics in eval; the neck "
        "`fuse=\"weighted\"` under bf16 autocast). bwd = fwd_bwd minus fwd.",
        "",
        _assumptions(),
        "",
        "Bytes: *ideal* = every map read once, written once (`cases.ideal_bytes`); *designed* = "
        "what the fused passes move by design: every kernel the op issues, counted (the private "
        "kernels and the host-side BatchNorm / fusion-weight math, each reading its inputs and "
        "writing its outputs once), plus each backend's fp32 partial sums; *eager* = the plain "
        "composition's aten ops counted the same way (its bf16 x fp32-weight products write "
        "fp32 maps), plus the passes CUDA's BatchNorm and upsample-backward kernels add: a lower "
        "bound of eager's traffic. *% copy* = ideal bytes / predicted time as a % of the assumed "
        "copy bandwidth (the goals' metric); *x eager* = eager's predicted time / the backend's.",
        "",
        f"## Goals: {LABEL} ({g0})",
        "",
    ]
    lines += goal_table(rows, neck_sensitivity, saved)
    lines += ["", f"## Op rows: {LABEL} ({g0}; {g1} in the last column)", ""]
    lines += op_rows_table(rows)
    lines += ["", f"## Kernels of the fused passes at 1/4: {LABEL} (bytes at batch 256)", "",
              "Each private kernel's MB read / written, GEMM FLOPs, and each backend's fp32 "
              "partial-sum scratch (written, then read back by a second kernel); the host-side "
              "math around them (BatchNorm statistics, folded weights, fusion-weight gradients) "
              "summed in the last line.", ""]
    for r in rows:
        if r.op == "neck" or r.level != "1/4" or r.pass_ == "fwd_bwd":
            continue
        lines.append(f"- **{r.op} {r.pass_}** ({LABEL}):")
        host = [0.0, 0]
        for k in r.kernels["triton"]:
            if k.spec is None:
                host[0] += k.reads + k.writes
                host[1] += 1
                continue
            gemm = f", {k.flops / 1e9:.1f} GFLOP" if k.flops else ""
            lines.append(f"  - `{k.name}`: read {_mb(k.reads)}, write {_mb(k.writes)}{gemm}; "
                         f"scratch triton {_mb(scratch(k, 'triton')[0])} / cuda "
                         f"{_mb(scratch(k, 'cuda')[0])}")
        lines.append(f"  - host-side math: {host[1]} small kernels, {_mb(host[0])} MB")
    lines += ["", "## What the model leaves out", "",
              "- Host time: the fused ops are Python custom ops issuing the launch counts above; "
              "at 1/16 and 1/8 a pass moves tens of MB (tens of us), where the CPU's time to "
              "issue ~100 small ops (a lateral backward) can exceed the GPU's; the measured time "
              "is then the host's.",
              "- Re-reads a kernel's tiling makes of its own inputs (halo rows, bilinear taps, "
              "CUDA's two 64-channel tiles of one pixel tile): assumed L1/L2 hits.",
              "- Eager's real traffic beyond its aten ops' inputs and outputs, except: "
              + "; ".join(f"`{k}` {v}" for k, v in CUDA_ATEN_PASSES.items())
              + ". Its bf16 atomicAdd scatter in the upsample backward is slower than its bytes "
              "say, so eager's backward is likely slower than predicted (the x eager ratios low).",
              "- torch.compile: inductor's fusion is not modelled; no ratio against it is "
              "predicted.",
              "- Peak memory: only the bytes saved for the backward are counted."]
    return "\n".join(lines) + "\n"


def summary_markdown(rows, neck_sensitivity=None, saved=None):
    """The GPU section of a report made without a GPU: goals and op rows, every row labelled."""
    g0 = next(iter(GPUS))
    lines = [f"## GPU (H100/H200, batch 256, bf16, channels_last): {LABEL}", "",
             f"No GPU ran these rows. {LABEL}: the bandwidth model's prediction (the bytes per "
             "kernel and what is left out: `benchmarks/results/gpu_model.md`, "
             "`python -m benchmarks.bandwidth_model`).", "", _assumptions()]
    goals = goal_table(rows, neck_sensitivity, saved)
    if len(goals) > 2:  # a header and a separator: no goal for these ops
        lines += ["", f"### Goals: {LABEL} ({g0})", ""] + goals
    if any(r.op != "neck" for r in rows):
        lines += ["", f"### Op rows: {LABEL}", ""] + op_rows_table(rows)
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description="Write the GPU bandwidth model's prediction "
                                "(" + LABEL + ") to benchmarks/results/gpu_model.md.")
    p.add_argument("--out", default=RESULTS, help="output markdown (default: %(default)s)")
    p.add_argument("--no-neck", action="store_true", help="op rows only (faster)")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = predict_all(neck=not args.no_neck)
    sens = None if args.no_neck else neck_sensitivity()
    saved = None if args.no_neck else {impl: saved_bytes(impl) for impl in ("eager", "triton")}
    text = markdown(rows, sens, saved)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
