"""Every Triton kernel of litefpn_kernels.triton compiles for sm_80 and sm_90 - no GPU needed.

The interpreter (TRITON_INTERPRET=1, how the kernel tests run here) accepts code the compiler
rejects, so each kernel is also compiled ahead of time, down to PTX and a cubin (ptxas ships with
the triton wheel), with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`.

The launch arguments come from the modules' own `plan_*` functions with interpret=False, i.e. the
GPU tile choices, for fp32 / bf16 / fp16, both layouts (NCHW and channels_last pick different
tiles and unit strides) and the flag / int64 variants, plus float64 (gradcheck on a GPU); bn_silu
per op (its streaming kernel specialises per OP). Signature, constexprs and attributes
(a stride of 1 becomes a constexpr, divisibility by 16) are derived from those arguments the
way a GPU launch derives them (the JIT's own binder), so what compiles here is what a launch on a
GPU compiles.

Under TRITON_INTERPRET=1 `@triton.jit` builds interpreter objects (InterpretedFunction), which
cannot be compiled, and the flag is read when the kernels' modules are imported; the compiles
therefore run in worker subprocesses (this file, run as a script) with the variable removed,
whatever the test process has. Two workers share the cases (2 cores here).
"""
import json
import os
import subprocess
import sys
import time
import traceback

import pytest

TARGETS = (80, 90)
DTYPES = ("fp32", "bf16", "fp16")
LAYOUTS = ("nchw", "nhwc")
N_WORKERS = 2
WORKER_TIMEOUT_S = 600

# Shapes: one level of the neck (coarse [1, 128, 16, 32], fine / z [1, Cin, 32, 64]), batch 1
# (tiles depend on channels and layout, not on the batch), plus odd sizes (C=5, Cin=3) and
# sizes of 1.
C, CIN, H, W = 128, 64, 16, 32
BN_OPS = ("bn_stats", "bn_fwd", "bn_bwd_sums", "bn_bwd")
#: the steps of triton/steps.py, each called as the passes call it (a "-flag" picks a branch)
STEPS = ("pilot", "moments", "bn_affine", "bn_grad_coefs-train", "bn_grad_coefs-eval",
         "gram_moments", "y_moments", "fold_weight", "fine_factor", "lateral_grad_sums",
         "lateral_grad_sums-no_sums", "lateral_grad_weights-train",
         "lateral_grad_weights-synced", "lateral_grad_weights-eval", "fusion_grads",
         "fusion_grads-gates_only")


def _case_list():
    """[(case_id, spec)]; spec = dict(kernel, dtype, layout, variant), built in the worker."""
    cases = []

    def add(kernel, dtype, layout, variant="default"):
        cases.append((f"{kernel}-{variant}-{dtype}-{layout}",
                      dict(kernel=kernel, dtype=dtype, layout=layout, variant=variant)))

    for dtype in DTYPES:
        for layout in LAYOUTS:
            # every feature on (weights, both gates, sums, centres, scale/quad/shift)
            for kernel in ("up2_fwd", "up2_bwd", "up2_bwd_coarse", "gram", "lateral_fwd",
                           "grad_z"):
                add(kernel, dtype, layout, "full")
    for layout in LAYOUTS:
        # every feature off (bf16), the largest channel counts, and odd sizes
        for kernel in ("up2_fwd", "up2_bwd", "up2_bwd_coarse", "gram", "lateral_fwd",
                       "grad_z"):
            add(kernel, "bf16", layout, "bare")
        for kernel in ("gram", "lateral_fwd", "grad_z"):
            add(kernel, "bf16", layout, "cin256")
            add(kernel, "fp16", layout, "odd")
        # gram(z, z) about one centre: the symmetric path (half the tiles, mirrored)
        for dtype in ("bf16", "fp32"):
            add("gram", dtype, layout, "sym")
        add("gram", "fp64", layout, "sym")
    # float64 (gradcheck runs the kernels in fp64 on a GPU too: tl.dot on fp64 is DMMA)
    for kernel in ("up2_fwd", "up2_bwd", "up2_bwd_coarse", "gram", "lateral_fwd", "grad_z"):
        add(kernel, "fp64", "nchw", "full")
    # sizes of 1 (the JIT turns integer arguments equal to 1 into constexprs)
    for kernel in ("up2_fwd", "up2_bwd", "up2_bwd_coarse", "gram", "lateral_fwd", "grad_z"):
        add(kernel, "fp32", "nchw", "ones")
    # the partial-sum reducer (fp32 buffers whatever the activations), with and without sum_f
    add("sum_partials", "fp32", "nchw", "two")
    add("sum_partials", "fp32", "nchw", "one")
    # 64-bit offsets
    for kernel in ("up2_fwd", "up2_bwd", "up2_bwd_coarse", "gram", "lateral_fwd", "grad_z",
                   "sum_partials"):
        add(kernel, "bf16", "nhwc", "i64")
    # bn_silu: the streaming kernel per op, every dtype and layout, fp64, non-flat strides with a
    # grad_out unlike x, sizes of 1, int64; and its second stage
    for op in BN_OPS:
        for dtype in DTYPES:
            for layout in LAYOUTS:
                add(op, dtype, layout, "full")
        add(op, "fp64", "nchw", "full")
        add(op, "fp32", "nchw", "strided")
        add(op, "fp32", "nchw", "ones")
        add(op, "bf16", "nhwc", "i64")
    add("bn_sum_slots", "fp32", "nchw", "full")
    add("bn_sum_slots", "fp64", "nchw", "full")
    add("bn_sum_slots", "fp32", "nchw", "i64")
    # the passes' small math (triton/steps.py), in both accumulation dtypes
    for step in STEPS:
        for dtype in ("fp32", "fp64"):
            add("steps", dtype, "nchw", step)
    return cases


CASES = _case_list()


# ----------------------------------------------------------------------------- worker side
def _build(spec):
    """(kernel, args, kwargs) of one case, from the plan_* functions with interpret=False."""
    import torch

    from litefpn_kernels.triton import lateral_up2_fuse as lateral, up2_fuse

    dtype = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16,
             "fp16": torch.float16}[spec["dtype"]]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    variant = spec["variant"]
    full = variant != "bare"
    c, c_in, h, w = {"odd": (5, 3, 3, 5), "ones": (1, 1, 1, 1)}.get(variant, (C, CIN, H, W))
    if variant == "cin256":
        c_in = 256

    def act(*shape):
        t = torch.zeros(shape, dtype=dtype)
        return t.to(memory_format=torch.channels_last) if spec["layout"] == "nhwc" else t

    def opt(t):
        return t if full else None

    coarse, fine, z = act(1, c, h, w), act(1, c, 2 * h, 2 * w), act(1, c_in, 2 * h, 2 * w)
    wc, wf = torch.zeros(1, dtype=acc), torch.zeros(1, dtype=acc)
    gate = torch.zeros(1, c, dtype=acc)
    kernel = spec["kernel"]
    if kernel == "up2_fwd":
        plan = up2_fuse.plan_forward(coarse, fine, opt(wc), opt(wf), opt(gate), opt(gate), 1e-4,
                                     torch.empty_like(fine), interpret=False)
    elif kernel in ("up2_bwd", "up2_bwd_coarse"):
        with_fine = kernel == "up2_bwd"
        parts = torch.zeros(up2_fuse.partials_shape(coarse, fine, interpret=False,
                                                    with_fine=with_fine), dtype=acc)
        plan = up2_fuse.plan_backward(
            fine, coarse, fine if with_fine else None, opt(wc), opt(wf), opt(gate),
            opt(gate) if with_fine else None, 1e-4, full, torch.empty_like(coarse),
            torch.empty_like(fine) if with_fine else None, parts if full else None,
            interpret=False)
    elif kernel == "sum_partials":
        two = variant != "one"
        parts = torch.zeros(2 if two else 1, 37, 1 * C, dtype=acc)
        plan = up2_fuse.plan_sum_partials(parts, torch.empty(1, C, dtype=acc),
                                          torch.empty(1, C, dtype=acc) if two else None)
    elif kernel == "gram":
        if variant == "sym":  # gram(z, z) with 2 x 2 tiles to mirror
            z = act(1, 2 * c_in, 2 * h, 2 * w)
        b = z
        a = z if variant == "sym" else fine if full else act(1, c_in, 2 * h, 2 * w)
        chunks = lateral.gram_tiling(a, b, interpret=False)[4]
        b_center = torch.zeros(b.shape[1], dtype=acc)
        a_center = b_center if variant == "sym" else opt(torch.zeros(a.shape[1], dtype=acc))
        plan = lateral.plan_gram(a, b, a_center, b_center,
                                 torch.empty(chunks, 1, a.shape[1], b.shape[1], dtype=acc),
                                 torch.empty(chunks, 1, a.shape[1], dtype=acc), interpret=False)
        assert plan[3]["SYM"] == (variant == "sym")
    elif kernel == "lateral_fwd":
        out = lateral._empty_format(z, (1, c, 2 * h, 2 * w))
        plan = lateral.plan_fwd(coarse, z, torch.zeros(c, c_in, dtype=acc),
                                torch.zeros(c, dtype=acc), opt(wc), opt(wf), opt(gate),
                                opt(gate), 1e-4, out, interpret=False)
    elif kernel == "grad_z":
        plan = lateral.plan_grad_z(fine, z, torch.zeros(c, c_in, dtype=acc), opt(gate),
                                   opt(torch.zeros(c_in, c_in, dtype=acc)),
                                   opt(torch.zeros(c_in, dtype=acc)), torch.empty_like(z),
                                   interpret=False)
    elif kernel in BN_OPS or kernel == "bn_sum_slots":
        plan = _bn_plan(kernel, variant, act, acc)
    elif kernel == "steps":
        return _step_launches(variant, acc)
    else:
        raise KeyError(kernel)
    fn, _grid, args, kwargs = plan
    kwargs = dict(kwargs)
    if variant == "i64":
        kwargs["I64"] = True
    return [(fn, args, kwargs)]


def _step_launches(variant, acc, n=8, c=C, k=CIN, device="cpu"):
    """[(kernel, args, kwargs, grid)] of every launch the step `variant` makes, recorded (not run)
    from a call with the passes' arguments at n images of c channels from k (also on "meta"
    tensors: tests/compile/triton_resources.py)."""
    import torch

    from litefpn_kernels.triton import steps

    step, _, flag = variant.partition("-")
    v = lambda *shape: torch.ones(shape, dtype=acc, device=device)  # noqa: E731
    w, bn, fuse = v(c, k), (v(c), v(c), v(c), v(c), 1e-5), (v(1), v(1), v(n, c))
    calls = {
        "pilot": lambda: steps.pilot(v(n, c, H, W), acc),
        "moments": lambda: steps.moments(v(c), v(c), v(c), n * H * W),
        "bn_affine": lambda: steps.bn_affine(*bn, acc),
        "bn_grad_coefs": lambda: steps.bn_grad_coefs(*bn, v(c), v(c), n * H * W,
                                                     flag == "train", acc),
        "gram_moments": lambda: steps.gram_moments(v(n, k, k), v(n, k), v(k), n * H * W),
        "y_moments": lambda: steps.y_moments(w, v(k), v(k, k)),
        "fold_weight": lambda: steps.fold_weight(w, *bn),
        "fine_factor": lambda: steps.fine_factor(n, c, *fuse, 1e-4, acc, device),
        "lateral_grad_sums": lambda: steps.lateral_grad_sums(
            v(n, c, k), v(n, c), w, *bn, v(k), *fuse, 1e-4, flag != "no_sums"),
        "lateral_grad_weights": lambda: steps.lateral_grad_weights(
            w, *bn, v(k), v(k, k), v(k) if flag == "synced" else v(0), v(c, k), v(c), v(c),
            v(c), 0.5, 2 * n * H * W, flag != "eval"),
        "fusion_grads": lambda: steps.fusion_grads(
            (flag != "gates_only",) * 2 + (True, True), v(n, c), v(n, c), v(1), v(1), v(n, c),
            v(n, c), 1e-4),
    }
    launches = []
    launch = steps._launch
    steps._launch = lambda kernel, grid, *args, **meta: launches.append((kernel, args, meta, grid))
    try:
        calls[step]()
    finally:
        steps._launch = launch
    assert launches, f"step {variant} launched nothing"
    return launches


def _bn_plan(kernel, variant, act, acc):
    import torch

    from litefpn_kernels.triton import bn_silu

    c, h, w = {"ones": (1, 1, 1)}.get(variant, (C, 2 * H, 2 * W))
    x = act(1, c, h, w)
    g = x
    if variant == "strided":  # non-flat x (every other column), grad_out channels_last
        x = torch.zeros(1, c, h, 2 * w, dtype=x.dtype)[..., ::2]
        g = torch.zeros(1, c, h, w, dtype=x.dtype).contiguous(memory_format=torch.channels_last)
    v = torch.zeros(c, dtype=acc)
    part = torch.zeros(2, c, bn_silu.slots(x, interpret=False), dtype=acc)
    if kernel == "bn_sum_slots":
        return bn_silu.plan_sum_slots(part, torch.zeros(2, c, dtype=acc))
    out = bn_silu._output(x)
    op = BN_OPS.index(kernel)  # OP_STATS, OP_FWD, OP_BWD_SUMS, OP_BWD
    return bn_silu.plan(op, x, g=g if op >= 2 else None, out=out if op in (1, 3) else None,
                        part=part if op in (0, 2) else None, scale=v if op else None,
                        shift=v if op else None, center=v if op in (0, 2) else None,
                        k_dz=v if op == 3 else None, k_x=v if op == 3 else None,
                        k_0=v if op == 3 else None, interpret=False)


def _compile(fn, args, kwargs, cc):
    """triton.compile of `fn` for sm_<cc>, with the signature / constexprs / attributes a launch
    with these arguments would use. -> the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    assert isinstance(fn, JITFunction), f"{fn!r} is not a JITFunction (TRITON_INTERPRET set?)"
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, dict(kwargs), bound,
                                                          specialization, options)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def _check_binary(kernel, name, cc):
    """Errors (a list of strings) unless the compile produced PTX for sm_<cc> and a cubin."""
    errors = []
    ptx = kernel.asm.get("ptx", "")
    if f".target sm_{cc}" not in ptx:
        errors.append(f"no '.target sm_{cc}' in the PTX")
    if f".entry {name}(" not in ptx:
        errors.append(f"no '.entry {name}(' in the PTX")
    cubin = kernel.asm.get("cubin", b"")
    if not (isinstance(cubin, bytes) and cubin[:4] == b"\x7fELF"):
        errors.append("no cubin (ELF) produced: is ptxas available?")
    return errors


def _worker_cases(shard, n_shards):
    import triton.knobs

    assert not triton.knobs.runtime.interpret, "the worker must run without TRITON_INTERPRET"
    for case_id, spec in CASES[shard::n_shards]:
        try:
            launches = _build(spec)
        except Exception:  # noqa: BLE001 - reported per case
            for cc in TARGETS:
                _emit(case_id, cc, False, "plan failed:\n" + traceback.format_exc(), 0.0)
            continue
        for cc in TARGETS:
            t0 = time.perf_counter()
            try:
                errors = []
                for fn, args, kwargs, *_grid in launches:
                    kernel = _compile(fn, args, kwargs, cc)
                    errors += _check_binary(kernel, fn.__name__, cc)
                _emit(case_id, cc, not errors, "; ".join(errors), time.perf_counter() - t0)
            except Exception:  # noqa: BLE001
                _emit(case_id, cc, False, traceback.format_exc(), time.perf_counter() - t0)


def _emit(case_id, cc, ok, error, seconds):
    print("RESULT " + json.dumps(dict(case=case_id, cc=cc, ok=ok, error=error, s=seconds)),
          flush=True)


def _broken_kernel_source():
    """A kernel the interpreter runs but the compiler must reject: tl.dot with K = 8 (< 16)."""
    return '''
import triton
import triton.language as tl


@triton.jit
def broken_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    k = tl.arange(0, 8)
    a = tl.load(a_ptr + i[:, None] * 8 + k[None, :])
    b = tl.load(b_ptr + k[:, None] * BLOCK + i[None, :])
    tl.store(c_ptr + i[:, None] * BLOCK + i[None, :], tl.dot(a, b))
'''


def _worker_broken(path):
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("broken_kernel_mod", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = (torch.zeros(16, 8), torch.zeros(8, 16), torch.zeros(16, 16))
    for cc in TARGETS:
        try:
            _compile(mod.broken_kernel, args, dict(BLOCK=16), cc)
            _emit("broken", cc, True, "", 0.0)
        except Exception as e:  # noqa: BLE001
            _emit("broken", cc, False, f"{type(e).__name__}: {e}", 0.0)


# ----------------------------------------------------------------------------- pytest side
def _worker_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _run_workers(argv_list):
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_worker_env()) for argv in argv_list]
    results = {}
    failures = []
    for proc, argv in zip(procs, argv_list):
        try:
            out, err = proc.communicate(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            failures.append(f"worker {argv} timed out")
        for line in out.splitlines():
            if line.startswith("RESULT "):
                r = json.loads(line[len("RESULT "):])
                results[(r["case"], r["cc"])] = r
        if proc.returncode != 0:
            failures.append(f"worker {argv} exited with {proc.returncode}:\n{err[-4000:]}")
    return results, failures


@pytest.fixture(scope="module")
def compiled():
    results, failures = _run_workers([["--shard", str(i), str(N_WORKERS)]
                                      for i in range(N_WORKERS)])
    if failures:
        pytest.fail("\n".join(failures))
    return results


def test_ptxas_is_available():
    from triton.backends.nvidia.compiler import get_ptxas

    for cc in TARGETS:
        tool = get_ptxas(cc)
        assert tool is not None and os.path.isfile(tool.path), "ptxas not found"


@pytest.mark.parametrize("cc", TARGETS, ids=lambda cc: f"sm{cc}")
@pytest.mark.parametrize("case_id", [case_id for case_id, _ in CASES])
def test_kernel_compiles(compiled, case_id, cc):
    r = compiled.get((case_id, cc))
    assert r is not None, f"no result for {case_id} sm_{cc}"
    assert r["ok"], f"{case_id} does not compile for sm_{cc}:\n{r['error']}"


def test_every_kernel_is_covered():
    """Every @triton.jit kernel (a function with a `_kernel` suffix) of the package has a case."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    pkg = os.path.join(root, "litefpn_kernels", "triton")
    names = set()
    for fname in sorted(os.listdir(pkg)):
        if fname.endswith(".py"):
            with open(os.path.join(pkg, fname)) as f:
                names |= set(re.findall(r"^def (_\w+_kernel)\(", f.read(), re.MULTILINE))
    covered = {"_up2_fuse_fwd_kernel": "up2_fwd", "_up2_fuse_bwd_kernel": "up2_bwd",
               "_sum_partials_kernel": "sum_partials", "_gram_kernel": "gram",
               "_lateral_fwd_kernel": "lateral_fwd", "_lateral_grad_z_kernel": "grad_z",
               "_bn_silu_kernel": BN_OPS, "_bn_sum_slots_kernel": "bn_sum_slots"}
    # the steps' kernels: each launched by one of the STEPS cases (recorded here, not run)
    import torch

    launched = {kernel.fn.__name__ for step in STEPS for dtype in (torch.float32, torch.float64)
                for kernel, *_ in _step_launches(step, dtype)}
    covered.update((name, "steps") for name in launched)
    assert names == set(covered), f"kernels without a compile case: {names - set(covered)}"
    kinds = {spec["kernel"] for _, spec in CASES}
    want = {k for v in covered.values() for k in ((v,) if isinstance(v, str) else v)}
    assert want <= kinds


def test_a_broken_kernel_fails_to_compile(tmp_path):
    """The harness compiles for real: a tl.dot with K = 8 (fine in the interpreter) is rejected."""
    path = tmp_path / "broken_kernel_mod.py"
    path.write_text(_broken_kernel_source())
    results, failures = _run_workers([["--broken", str(path)]])
    assert not failures, failures
    for cc in TARGETS:
        r = results[("broken", cc)]
        assert not r["ok"], f"the broken kernel compiled for sm_{cc}"
        assert "K >= 16" in r["error"], r["error"]


if __name__ == "__main__":
    if sys.argv[1] == "--shard":
        _worker_cases(int(sys.argv[2]), int(sys.argv[3]))
    elif sys.argv[1] == "--broken":
        _worker_broken(sys.argv[2])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} --shard I N | --broken PATH")
