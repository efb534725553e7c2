"""Static GPU resources of every Triton kernel at the planners' configs for the spec's N=256 neck
shapes (the 1/4 level, the largest: coarse [256,128,32,64], fine / grad_out [256,128,64,128],
z [256,32,64,128]), compiled ahead of time for sm_90a and sm_80 - no GPU needed.

`rows()` -> one dict per (kernel, arch, dtype, layout): config (grid, tiles, warps), n_regs,
n_spills (local memory / 4, as Triton's own `CompiledKernel.n_spills`: STACK + LOCAL bytes
of `cuobjdump -res-usage`), shared (bytes), occupancy at num_warps (resident warps / 64, from
registers, shared memory and the 32-CTA limit), and whether the PTX has 16-byte global loads
(ld.global.v4.b32 / v2.b64, or cp.async of 16 bytes) and stores (st.global.v4.b32 / v2.b64).

The tensors are `meta` tensors (shapes and strides, no memory), handed to the planners'
`plan_*` functions with interpret=False; the compile itself is test_triton_compile's (the JIT's
own binder derives the signature and specialisations). Results are cached under
build/triton_resources/ by a hash of the kernel sources, the case and the Triton version (a
second run, and CI with a kept build/ folder, skips the compiles).

MIN_OCCUPANCY is the bound test_triton_resources.py enforces per kernel, with the reason.
Run as a script (`python -m tests.compile.triton_resources`) it prints the table.
"""
import hashlib
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE_DIR = os.path.join(ROOT, "build", "triton_resources")
ARCHS = (90, 80)
DTYPES = ("bf16", "fp32")
LAYOUTS = ("nchw", "nhwc")
N = 256

#: kernel -> (minimum occupancy on sm_90a and sm_80 at bf16 / fp32, why). Streaming kernels
#: (memory-bound: one pass over activations) need enough warps resident to keep bytes in
#: flight; the GEMM-shaped ones hide latency with cp.async pipelining in shared memory instead.
MIN_OCCUPANCY = {
    "up2_fwd": (0.25, "streaming: one 16-byte vector a thread per tile row, >= 16 warps an SM"),
    "up2_bwd": (0.25, "streaming, the heaviest (grad_out read twice, 3 outputs + sums)"),
    "up2_bwd_coarse": (0.25, "streaming (lateral's backward, coarse half)"),
    "sum_partials": (0.5, "tiny second stage"),
    "gram_zz": (0.125, "GEMM-shaped (tf32x3 dot, 3 MMAs a step): cp.async-pipelined smem"),
    "gram_zz_sym": (0.125, "gram_zz at the 1/16 level (Cin = 128: 4 x 4 tiles), the symmetric "
                           "path: programs above the diagonal also store the mirror tile"),
    "gram_gz": (0.125, "GEMM-shaped (tf32x3 dot): cp.async-pipelined smem"),
    "lateral_fwd": (0.25, "GEMM + streaming epilogue (z, coarse taps, out)"),
    "grad_z": (0.125, "GEMM-shaped (two dot loops), cp.async-pipelined; fp32 (tf32x3) 156-168 "
                      "regs at 4 warps, 8 warps do not help (158)"),
    "bn_stats": (0.5, "streaming, two accumulators"),
    "bn_fwd": (0.5, "streaming elementwise"),
    "bn_bwd_sums": (0.375, "streaming; channels_last: 8 channels a thread, so 8 values of each "
                           "per-channel vector (scale, shift, centre) live"),
    "bn_bwd": (0.375, "streaming; channels_last: 8 values of each of 5 per-channel vectors"),
    "bn_sum_slots": (0.5, "tiny second stage"),
}
#: spills allowed, by row id (kernel-arch-dtype-layout): (at most this many words, why). Each
#: was located in the SASS (cuobjdump -sass of the row's cubin): none inside the main loop.
SPILL_OK = {
    "gram_zz_sym-sm_80-fp32-nhwc": (2, "ptxas targets 128 registers (25%) and keeps 2 words in "
                                       "local memory from the prologue to the epilogue (2 STL "
                                       "before the pixel loop, 2 LDL after it; none inside)"),
}
#: the passes' small math (litefpn_kernels/triton/steps.py): kernel -> the step that launches it
#: (a STEPS case of test_triton_compile.py). One row per accumulation dtype (fp32: bf16 / fp16 /
#: fp32 activations; fp64), no layout; [C]- or [C, Cin]-sized launches of a few programs.
STEP_KERNELS = {
    "_pilot_kernel": "pilot", "_moments_kernel": "moments",
    "_bn_coefs_kernel": "bn_grad_coefs-train", "_gram_moments_kernel": "gram_moments",
    "_y_moments_kernel": "y_moments", "_fold_weight_kernel": "fold_weight",
    "_fine_factor_kernel": "fine_factor", "_a_sum_kernel": "lateral_grad_sums",
    "_grad_sums_kernel": "lateral_grad_sums", "_grad_weights_kernel": "lateral_grad_weights-synced",
    "_fusion_grads_kernel": "fusion_grads",
}
MIN_OCCUPANCY.update({f"step{k}": (0.25, "the passes' small math: a launch of a few programs "
                                         "over [C] or [C, Cin] values (latency-bound)")
                      for k in STEP_KERNELS})

#: kernels whose main loads / stores must be 16-byte (the up2 taps and gathers are scalar by
#: design: L1/L2 hits on bytes already streamed; their own rows are checked instead)
STREAMING = ("up2_fwd", "up2_bwd", "up2_bwd_coarse", "lateral_fwd", "bn_stats", "bn_fwd",
             "bn_bwd_sums", "bn_bwd")
#: kernels that store no activation (sums only, or partials)
NO_WIDE_STORE = ("bn_stats", "bn_bwd_sums", "gram_zz", "gram_zz_sym", "gram_gz", "sum_partials",
                 "bn_sum_slots") + tuple(f"step{k}" for k in STEP_KERNELS)


def cases(archs=ARCHS, dtypes=DTYPES, layouts=LAYOUTS, fp64=True):
    """[(kernel, dtype, layout)]: every kernel x dtypes x layouts, plus fp64 NCHW (gradcheck);
    the steps' kernels per accumulation dtype ("-": no layout)."""
    streaming = [k for k in MIN_OCCUPANCY if not k.startswith("step_")]
    out = [(k, d, l) for k in streaming for d in dtypes for l in layouts]
    if fp64:
        out += [(k, "fp64", "nchw") for k in streaming
                if k not in ("sum_partials", "bn_sum_slots")]
    out += [(f"step{k}", d, "-") for k in STEP_KERNELS for d in ("fp32", "fp64")]
    return out


# ----------------------------------------------------------------------------- worker side
def build(kernel, dtype, layout):
    """(fn, grid, args, kwargs) of one launch at N=256 from the planners (interpret=False)."""
    import torch

    from litefpn_kernels.triton import bn_silu, lateral_up2_fuse as lateral, up2_fuse

    dt = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    acc = torch.float64 if dt == torch.float64 else torch.float32

    def act(*shape):
        t = torch.empty(shape, dtype=dt, device="meta")
        return t.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else t

    def vec(*shape):
        return torch.empty(shape, dtype=acc, device="meta")

    if kernel.startswith("step_"):
        sys.path.insert(0, ROOT)
        from tests.compile.test_triton_compile import _step_launches

        name = kernel[len("step"):]
        launches = _step_launches(STEP_KERNELS[name], acc, n=N, c=128, k=32, device="meta")
        fn, args, kwargs, grid = next(launch for launch in launches
                                      if launch[0].fn.__name__ == name)
        return fn, grid, args, kwargs

    coarse, fine, z = act(N, 128, 32, 64), act(N, 128, 64, 128), act(N, 32, 64, 128)
    w, gate = vec(1), vec(N, 128)
    if kernel == "up2_fwd":
        return up2_fuse.plan_forward(coarse, fine, w, w, gate, gate, 1e-4, act(*fine.shape),
                                     interpret=False)
    if kernel in ("up2_bwd", "up2_bwd_coarse", "sum_partials"):
        with_fine = kernel != "up2_bwd_coarse"
        parts = vec(*up2_fuse.partials_shape(coarse, fine, interpret=False,
                                             with_fine=with_fine))
        if kernel == "sum_partials":
            return up2_fuse.plan_sum_partials(parts, vec(N, 128), vec(N, 128))
        return up2_fuse.plan_backward(
            fine, coarse, fine if with_fine else None, w, w, gate, gate if with_fine else None,
            1e-4, True, act(*coarse.shape), act(*fine.shape) if with_fine else None, parts,
            interpret=False)
    if kernel in ("gram_zz", "gram_zz_sym", "gram_gz"):
        if kernel == "gram_zz_sym":
            z = act(N, 128, 16, 32)  # the 1/16 level's z: several tiles to mirror
        a = fine if kernel == "gram_gz" else z
        cin = z.shape[1]
        chunks = lateral.gram_tiling(a, z, interpret=False)[4]
        zc = vec(cin)  # gram(z, z): one centre for both sides, as the moments pass it
        return lateral.plan_gram(a, z, None if kernel == "gram_gz" else zc,
                                 zc, vec(chunks, N, a.shape[1], cin),
                                 vec(chunks, N, a.shape[1]), interpret=False)
    if kernel == "lateral_fwd":
        return lateral.plan_fwd(coarse, z, vec(128, 32), vec(128), w, w, gate, gate, 1e-4,
                                act(*fine.shape), interpret=False)
    if kernel == "grad_z":
        return lateral.plan_grad_z(fine, z, vec(128, 32), gate, vec(32, 32), vec(32),
                                   act(*z.shape), interpret=False)
    x = fine
    c = x.shape[1]
    if kernel == "bn_sum_slots":
        return bn_silu.plan_sum_slots(vec(2, c, bn_silu.slots(x, interpret=False)), vec(2, c))
    op = {"bn_stats": bn_silu.OP_STATS, "bn_fwd": bn_silu.OP_FWD,
          "bn_bwd_sums": bn_silu.OP_BWD_SUMS, "bn_bwd": bn_silu.OP_BWD}[kernel]
    part = vec(2, c, bn_silu.slots(x, interpret=False))
    if op == bn_silu.OP_STATS:
        return bn_silu.plan(op, x, part=part, center=vec(c), interpret=False)
    if op == bn_silu.OP_FWD:
        return bn_silu.plan(op, x, out=act(*x.shape), scale=vec(c), shift=vec(c),
                            interpret=False)
    if op == bn_silu.OP_BWD_SUMS:
        return bn_silu.plan(op, x, g=act(*x.shape), part=part, scale=vec(c), shift=vec(c),
                            center=vec(c), interpret=False)
    return bn_silu.plan(op, x, g=act(*x.shape), out=act(*x.shape), scale=vec(c),
                        shift=vec(c), k_dz=vec(c), k_x=vec(c), k_0=vec(c), interpret=False)


_WIDE_LD = re.compile(r"ld\.global(\.[A-Za-z0-9:]+)*\.(v4\.(b32|f32|u32)|v2\.(b64|f64|u64))"
                      r"|cp\.async\.(cg|ca)\.shared\.global(\.[A-Za-z0-9:]+)* \[[^\]]+\], "
                      r"\[[^\]]+\], (16|0x10)\b")
_WIDE_ST = re.compile(r"st\.global(\.[A-Za-z0-9:]+)*\.(v4\.(b32|f32|u32)|v2\.(b64|f64|u64))")


def _res_usage(cubin):
    """(regs, stack + local bytes, shared bytes) from `cuobjdump -res-usage`."""
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    tool = os.path.join(os.path.dirname(get_ptxas(90).path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return int(m.group(1)), int(m.group(2)) + int(m.group(4)), int(m.group(3))


def occupancy(regs, shared, num_warps, cc):
    """Resident warps / 64 on sm_<cc> (sm_80 / sm_90: 64K registers, 64 warps, 32 CTAs per SM,
    registers allocated per warp in 256s, 1 KiB of shared memory reserved per CTA)."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    ctas = min(32, (65536 // per_warp) // num_warps, 64 // num_warps)
    smem = {90: 228 * 1024, 80: 164 * 1024}[cc]
    if shared:
        ctas = min(ctas, smem // (shared + 1024))
    return ctas * num_warps / 64


def measure(kernel, dtype, layout, cc):
    """One row (see the module docstring)."""
    sys.path.insert(0, ROOT)
    from tests.compile.test_triton_compile import _compile

    fn, grid, args, kwargs = build(kernel, dtype, layout)
    compiled = _compile(fn, args, kwargs, cc)
    regs, spill, shared_cubin = _res_usage(compiled.asm["cubin"])
    shared = max(int(compiled.metadata.shared), shared_cubin)
    ptx = compiled.asm["ptx"]
    warps = kwargs.get("num_warps", 4)
    consts = {k: v for k, v in kwargs.items() if k.isupper() and isinstance(v, (int, bool))}
    return dict(kernel=kernel, arch=f"sm_{cc}" + ("a" if cc == 90 else ""), dtype=dtype,
                layout=layout, grid=list(grid), config=consts, num_warps=warps, n_regs=regs,
                n_spills=spill // 4, shared=shared,
                occupancy=occupancy(regs, shared, warps, cc),
                ld16=bool(_WIDE_LD.search(ptx)), st16=bool(_WIDE_ST.search(ptx)))


def _source_hash():
    import triton

    h = hashlib.sha256(triton.__version__.encode())
    pkg = os.path.join(ROOT, "litefpn_kernels", "triton")
    for name in sorted(os.listdir(pkg)):
        if name.endswith(".py"):
            with open(os.path.join(pkg, name), "rb") as f:
                h.update(name.encode() + f.read())
    with open(os.path.abspath(__file__), "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:16]


def _worker(items):
    for kernel, dtype, layout, cc in items:
        try:
            row = measure(kernel, dtype, layout, cc)
        except Exception as e:  # noqa: BLE001 - reported as a row
            row = dict(kernel=kernel, dtype=dtype, layout=layout, cc=cc,
                       error=f"{type(e).__name__}: {e}"[-2000:])
        print("ROW " + json.dumps(row), flush=True)


# ----------------------------------------------------------------------------- caller side
def rows(archs=ARCHS, case_list=None, workers=2, use_cache=True):
    """Every row, from the cache where the sources are unchanged, else compiled in `workers`
    subprocesses (without TRITON_INTERPRET: the interpreter's kernels cannot compile)."""
    items = [(k, d, l, cc) for (k, d, l) in (case_list or cases()) for cc in archs]
    path = os.path.join(CACHE_DIR, _source_hash() + ".json")
    cached = {}
    if use_cache and os.path.exists(path):
        with open(path) as f:
            cached = {tuple(r["_key"]): r for r in json.load(f)}
    todo = [it for it in items if tuple(it) not in cached]
    if todo:
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker",
                                   json.dumps(todo[i::workers])], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
                 for i in range(min(workers, len(todo)))]
        for p in procs:
            out, err = p.communicate(timeout=1200)
            got = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
            if p.returncode != 0 and not got:
                raise RuntimeError(f"resource worker failed:\n{err[-4000:]}")
            for r in got:
                cc = r.pop("cc", None) or int(r["arch"][3:5])
                r["_key"] = [r["kernel"], r["dtype"], r["layout"], cc]
                if "error" not in r:
                    cached[tuple(r["_key"])] = r
                else:
                    cached.setdefault(tuple(r["_key"]), r)
        if use_cache:
            os.makedirs(CACHE_DIR, exist_ok=True)
            with open(path, "w") as f:
                json.dump([r for r in cached.values() if "error" not in r], f)
    return [cached[tuple(it)] for it in items if tuple(it) in cached]


def markdown(table):
    head = ("| kernel | arch | dtype | layout | grid | tiles | warps | regs | spills (4 B) | "
            "smem (B) | occupancy | 16-B ld | 16-B st |\n|" + "---|" * 13 + "\n")
    lines = []
    for r in table:
        if "error" in r:
            lines.append(f"| {r['kernel']} | sm_{r['_key'][3]} | {r['dtype']} | {r['layout']} "
                         f"| error: {r['error'][:80]} |" + " |" * 8)
            continue
        tiles = " ".join(f"{k}={v}" for k, v in r["config"].items() if k.startswith("BLOCK")
                         or k == "OP")
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {r['layout']} | "
                     f"{r['grid']} | {tiles} | {r['num_warps']} | {r['n_regs']} | "
                     f"{r['n_spills']} | {r['shared']} | {r['occupancy']:.1%} | "
                     f"{'yes' if r['ld16'] else 'no'} | {'yes' if r['st16'] else 'no'} |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        _worker(json.loads(sys.argv[2]))
    else:
        print(markdown(rows()))
