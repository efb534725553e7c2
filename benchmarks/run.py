"""The benchmark report: `python -m benchmarks.run` (or `make bench`).

Times each glue step of the neck (Up2 + fuse at each level; 1x1 lateral + BN + Up2 + fuse; a
smooth's BN + SiLU) and the whole neck, forward / forward+backward / eval, for eager PyTorch,
torch.compile and every fused backend that runs here, side by side in one run. Also times a
plain device copy of a 1/4 level map, and reports each op's bandwidth as a % of that copy's:
on ideal bytes (every map read once, written once: how close the pass is to that bound) and,
on a GPU, on the bytes the pass moves by design (benchmarks/bandwidth_model.py: the achieved
bandwidth). Writes benchmarks/results/<machine>.json (one record per measurement, docs/design.md
section 6), a markdown table (.md) and a plot (.png) beside it. Without a GPU the markdown ends
with the bandwidth model's GPU prediction, labelled PREDICTED, UNMEASURED.

GPU: CUDA events via triton.testing.do_bench (warm-up, median); speed-ups are ratios of medians.
CPU: wall clock in interleaved rounds (every implementation of a step once per round) after a
warm-up, at --threads threads (default 2, the CI machine's size); median_ms is the median over
rounds, and a speed-up is the median of the per-round ratios, which a shared machine's slow
drifts do not bias.
"""
import argparse
import json
import os
import platform
import re
import statistics
import sys
import time

# The CPU peak-memory measurement runs torch.profiler, whose kineto library prints
# "USDT: ... profiler_start/stop" (its USDT log level, 5) to stderr at every session; level 6
# is above every kineto message. Set before the first profiler session (kineto reads it lazily);
# a value the user set wins.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import torch  # noqa: E402

from . import bandwidth_model, cases

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def machine_name(device):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1] for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = "cpu-" + name
    return re.sub(r"[^A-Za-z0-9.]+", "_", name.strip()).strip("_")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device):
    """Median milliseconds of fn() (`time_side_by_side`: warm-up calls, then rounds)."""
    return time_side_by_side({"fn": fn}, device)[0]["fn"]


def time_side_by_side(fns, device, min_rounds=11, budget_s=2.0, max_rounds=50, warmup=3):
    """({name: median ms}, rounds) of the callables of `fns`, after `warmup` calls each.

    Why 3 warm-up calls and at least 11 rounds: on the 2-core CI-class VM the first calls of a
    freshly built case at batch 8 ran 3-10x slower than the rest (first-touch page faults of the
    32 MB maps, the allocator settling), and single rounds spike as much again; with one warm-up
    and 7 rounds, whole rows of a full report came out 5x off.

    GPU: triton.testing.do_bench (CUDA events) per callable; rounds is None. CPU: wall clock in
    interleaved rounds (a, b, c, a, b, c, ...); rounds is the list of {name: ms} of each round,
    so ratios can be taken within a round, where the slow drifts of a shared machine cancel.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    if device.type == "cuda":
        import triton.testing
        return {k: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
                for k, fn in fns.items()}, None
    rounds = []
    start = time.perf_counter()
    while len(rounds) < min_rounds or (time.perf_counter() - start < budget_s
                                       and len(rounds) < max_rounds):
        times = {}
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k] = (time.perf_counter() - t0) * 1e3
        rounds.append(times)
    return {k: statistics.median(r[k] for r in rounds) for k in fns}, rounds


def speedup(ref, impl, medians, rounds):
    """How many times faster `impl` is than `ref`: the median of the per-round ratios on CPU,
    the ratio of the medians on GPU; None if `ref` was not timed."""
    if ref not in medians:
        return None
    if rounds:
        return statistics.median(r[ref] / r[impl] for r in rounds)
    return medians[ref] / medians[impl]


def peak_mem_mb(fn, device):
    """Peak memory allocated during one call, above what was allocated before it.

    CUDA: the caching allocator's peak. CPU: the running sum of the CPU allocator's
    allocations and frees during the call, as the profiler records them.
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak / 2**20


def build_cases(op, level, impl, batch, dtype, device, channels_last):
    if op == "up2_fuse":
        return cases.up2_fuse_case(impl, level, batch, dtype, device, channels_last)
    if op == "lateral_up2_fuse":
        return cases.lateral_up2_fuse_case(impl, level, batch, dtype, device, channels_last)
    if op == "bn_silu":
        return cases.bn_silu_case(impl, level, batch, dtype, device, channels_last)
    return cases.neck_case(impl, batch, dtype, device, channels_last)


def cpu_native_bf16():
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX-BF16), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def parse_args(argv):
    gpu = torch.cuda.is_available()
    cpu_dtypes = "fp32,bf16" if cpu_native_bf16() else "fp32"
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Progress ([k/n], elapsed, ETA) goes to stderr; the report to stdout and to "
               "--out.{json,md,png}.",
    )
    p.add_argument("--device", default="cuda" if gpu else "cpu",
                   help="device to time on: cuda (if present) or cpu; default: %(default)s")
    p.add_argument("--batch", default="256" if gpu else "1,8",
                   help="comma list of batch sizes; every row is timed at each; default: %(default)s")
    p.add_argument("--dtypes", default="bf16,fp16" if gpu else cpu_dtypes,
                   help="comma list of fp32, bf16, fp16: the activation dtype of the op rows; "
                        "the neck rows keep fp32 parameters and run bf16/fp16 under "
                        "torch.autocast. The CPU default adds bf16 only where the CPU has "
                        "native bf16 (avx512_bf16 / amx_bf16); default: %(default)s")
    p.add_argument("--layouts", default="channels_last,contiguous",
                   help="comma list of memory formats: channels_last, contiguous; default: %(default)s")
    p.add_argument("--ops", default="up2_fuse,lateral_up2_fuse,bn_silu,neck",
                   help="comma list of steps: up2_fuse, lateral_up2_fuse, bn_silu (each at "
                        "--levels), neck (the whole module, fuse='weighted'); default: %(default)s")
    p.add_argument("--levels", default="1/16,1/8,1/4" if gpu else "1/4",
                   help="comma list of pyramid levels the op rows run at (1/16, 1/8, 1/4); default: %(default)s")
    p.add_argument("--passes", default=",".join(cases.PASSES),
                   help="comma list of fwd (training forward), fwd_bwd (training step) and "
                        "eval (no_grad, BatchNorm on running statistics); default: %(default)s")
    p.add_argument("--impls", default=None,
                   help="comma list of eager, compile and fused backends (cpu, triton, cuda); "
                        "default: all that run here")
    p.add_argument("--threads", type=int, default=2,
                   help="CPU threads (torch.set_num_threads); ignored on GPU; default: %(default)s")
    p.add_argument("--budget", type=float, default=2.0,
                   help="CPU: seconds of timing rounds per row group (at least 11 rounds, after 3 warm-up calls); default: %(default)s")
    p.add_argument("--out", default=None,
                   help="output path without extension (default benchmarks/results/<machine>)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode of the compile rows (default, reduce-overhead, "
                        "max-autotune, max-autotune-no-cudagraphs); default: "
                        "max-autotune-no-cudagraphs on a GPU, default on CPU")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="time nothing: re-render the report (.md, .png beside JSON) from a run's "
                        "records, with the bandwidth model's moved bytes filled in for GPU op "
                        "rows a --no-model run left empty")
    p.add_argument("--no-model", action="store_true",
                   help="skip benchmarks/bandwidth_model.py: on a GPU, the moved-bytes columns "
                        "(counted on the CPU: up to a minute for every row); without one, the "
                        "report's GPU section (the model's prediction for the ops in --ops, "
                        "labelled PREDICTED, UNMEASURED; about a minute with the neck)")
    return p.parse_args(argv)


class Progress:
    """`[k/n] what (elapsed, ETA)` lines on stderr, one per timed group."""

    def __init__(self, total):
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def step(self, what):
        self.done += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        print(f"[{self.done}/{self.total}] {what}  (elapsed {elapsed:.0f} s, ETA {eta:.0f} s)",
              file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        return render(args.render)
    cases.COMPILE_MODE = args.compile_mode
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    machine = machine_name(device)
    out_base = args.out or os.path.join(RESULTS_DIR, machine)
    os.makedirs(os.path.dirname(out_base) or ".", exist_ok=True)
    meta = {"device": machine, "torch": torch.__version__, "triton": triton_version,
            "compile_mode": cases.compile_mode(device) or "default",
            "command": "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None
                                                            else argv)}
    dtype_names = args.dtypes.split(",")
    batches = [int(b) for b in args.batch.split(",")]
    layouts = args.layouts.split(",")
    ops_ = args.ops.split(",")
    passes = args.passes.split(",")
    native_bf16 = device.type != "cpu" or cpu_native_bf16()
    print(f"# litefpn_kernels benchmark on {machine} (torch {torch.__version__}, "
          f"triton {triton_version}, batch {args.batch}"
          f"{'' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'})",
          flush=True)
    if device.type == "cpu" and "bf16" in dtype_names and not native_bf16:
        print("# note: this CPU has no native bf16 (avx512_bf16 / amx_bf16): bf16 rows run "
              "emulated conversions and say little about bf16 serving", flush=True)

    def levels_of(op):
        return [None] if op == "neck" else args.levels.split(",")

    groups_per_setting = 1 + sum(len(levels_of(op)) * len(passes) for op in ops_)
    progress = Progress(len(dtype_names) * len(layouts) * len(batches) * groups_per_setting)
    records = []
    for dtype_name in dtype_names:
        dtype = DTYPES[dtype_name]
        for layout in layouts:
            channels_last = layout == "channels_last"
            for batch in batches:
                tag = f"[{dtype_name} {layout} B={batch}]"
                copy = cases.copy_case(batch, dtype, device, channels_last)
                copy_ms = time_ms(copy.run["eval"], device)
                copy_gbps = copy.bytes["eval"] / copy_ms / 1e6
                progress.step(f"{tag} copy")
                print(f"{tag} copy of a 1/4-level map: {copy_ms:.3f} ms, {copy_gbps:.1f} GB/s",
                      flush=True)
                records.append(dict(op="copy", backend="torch", **{"pass": "eval"},
                                    dtype=dtype_name, layout=layout, batch=batch,
                                    median_ms=copy_ms, ideal_bytes=copy.bytes["eval"],
                                    gbps=copy_gbps, pct_copy_bw=100.0,
                                    moved_bytes=copy.bytes["eval"], moved_gbps=copy_gbps,
                                    pct_copy_bw_moved=100.0, peak_mem_mb=None,
                                    speedup_vs_eager=None,
                                    speedup_vs_compile=None, **meta))
                for op in ops_:
                    impls = cases.impls_for(op, device)
                    if args.impls:
                        impls = [i for i in impls if i in args.impls.split(",")]
                    for level in levels_of(op):
                        group = []
                        built = {impl: build_cases(op, level, impl, batch, dtype, device,
                                                   channels_last) for impl in impls}
                        for pass_name in passes:
                            fns = {impl: case.run[pass_name] for impl, case in built.items()}
                            medians, rounds = time_side_by_side(fns, device,
                                                                budget_s=args.budget)
                            for impl, case in built.items():
                                ms = medians[impl]
                                mem = peak_mem_mb(fns[impl], device)
                                nbytes = case.bytes[pass_name]
                                gbps = nbytes / ms / 1e6 if nbytes else None
                                moved = None if args.no_model else moved_bytes(
                                    op, impl, level, pass_name, batch, dtype, channels_last,
                                    device)
                                moved_gbps = moved / ms / 1e6 if moved else None
                                rec = dict(op=case.op, backend=impl, **{"pass": pass_name},
                                           dtype=dtype_name, layout=layout, batch=batch,
                                           median_ms=ms, ideal_bytes=nbytes, gbps=gbps,
                                           pct_copy_bw=100.0 * gbps / copy_gbps if gbps else None,
                                           moved_bytes=moved, moved_gbps=moved_gbps,
                                           pct_copy_bw_moved=(100.0 * moved_gbps / copy_gbps
                                                              if moved_gbps else None),
                                           peak_mem_mb=mem,
                                           speedup_vs_eager=speedup("eager", impl, medians,
                                                                    rounds),
                                           speedup_vs_compile=speedup("compile", impl, medians,
                                                                      rounds),
                                           **meta)
                                group.append(rec)
                                bw = (f"{gbps:8.1f} GB/s ideal ({rec['pct_copy_bw']:5.1f}% copy)"
                                      if gbps else "")
                                if moved_gbps:
                                    bw += (f" {moved_gbps:8.1f} GB/s moved "
                                           f"({rec['pct_copy_bw_moved']:5.1f}% copy)")
                                print(f"{tag} {case.op:24s} {pass_name:8s} {impl:8s} "
                                      f"{ms:10.3f} ms {bw} peak {mem:8.1f} MB", flush=True)
                            progress.step(f"{tag} {op}{'@' + level if level else ''} "
                                          f"{pass_name}")
                        del built
                        records.extend(group)
                        # the records so far, so that a run cut short (a GPU lease's time
                        # limit) still leaves its measurements: --render turns them into a report
                        with open(out_base + ".json", "w") as f:
                            json.dump(records, f, indent=1)

    gpu_section = None
    if device.type != "cuda" and not args.no_model:
        print("# the GPU section: bandwidth model (PREDICTED, UNMEASURED) ...", file=sys.stderr,
              flush=True)
        gpu_section = gpu_model_section(ops_)
    with open(out_base + ".json", "w") as f:
        json.dump(records, f, indent=1)
    text = markdown(records, meta, args, gpu_section)
    with open(out_base + ".md", "w") as f:
        f.write(text)
    plot(records, out_base + ".png", machine)
    print(f"\nwrote {out_base}.json, .md, .png\n")
    print(text)


def render(json_path):
    """The report (.md, .png beside json_path) from a run's records; GPU op rows without moved
    bytes (a --no-model run) get them from the bandwidth model, counted here."""
    with open(json_path) as f:
        records = json.load(f)
    copy_gbps = {(r["dtype"], r["layout"], r["batch"]): r["gbps"]
                 for r in records if r["op"] == "copy"}
    for r in records:
        op, _, level = r["op"].partition("@")
        if r.get("moved_bytes") is not None or not level or r["device"].startswith("cpu"):
            continue
        moved = moved_bytes(op, r["backend"], level, r["pass"], r["batch"],
                            DTYPES[r["dtype"]], r["layout"] == "channels_last",
                            torch.device("cuda"))
        if moved:
            r["moved_bytes"], r["moved_gbps"] = moved, moved / r["median_ms"] / 1e6
            base = copy_gbps.get((r["dtype"], r["layout"], r["batch"]))
            r["pct_copy_bw_moved"] = 100.0 * r["moved_gbps"] / base if base else None
    with open(json_path, "w") as f:
        json.dump(records, f, indent=1)
    meta = {k: records[0].get(k) for k in ("device", "torch", "triton", "command")}
    out_base = json_path[:-len(".json")] if json_path.endswith(".json") else json_path
    text = markdown(records, meta, None)
    with open(out_base + ".md", "w") as f:
        f.write(text)
    plot(records, out_base + ".png", meta["device"])
    print(text)


def moved_bytes(op, impl, level, pass_name, batch, dtype, channels_last, device):
    """The bytes a GPU pass moves by design (bandwidth_model.designed_bytes: counted on CPU),
    for the op rows of eager and the fused GPU backends; None elsewhere (CPU rows, torch.compile,
    the neck) or if the model cannot count it here."""
    if device.type != "cuda" or op == "neck" or impl not in ("eager",) + bandwidth_model.BACKENDS:
        return None
    try:
        return bandwidth_model.designed_bytes(op, impl, level, pass_name, batch, dtype,
                                              channels_last)
    except Exception as e:  # a model failure must not cost a GPU run its measurements
        print(f"# bandwidth model: no moved bytes for {op}@{level} {pass_name} {impl}: {e}",
              file=sys.stderr, flush=True)
        return None


def gpu_model_section(ops_):
    """The report's GPU section without a GPU: the bandwidth model's goal table for the ops run
    here (every level; the neck if it ran), every row labelled PREDICTED, UNMEASURED."""
    m = bandwidth_model
    rows = m.predict_all([(op, lvl) for op in ops_ if op != "neck" for lvl in cases.LEVELS],
                         neck="neck" in ops_)
    sens = saved = None
    if "neck" in ops_:
        sens = m.neck_sensitivity()
        saved = {impl: m.saved_bytes(impl) for impl in ("eager", "triton")}
    return m.summary_markdown(rows, sens, saved)


def _f(v, fmt):
    return "" if v is None else format(v, fmt)


def markdown(records, meta, args, gpu_section=None):
    """The measured table; "ideal" columns: ideal bytes (every map read once, written once) /
    time, and that as a % of the copy's bandwidth (how close the pass is to its read-once bound);
    "moved" columns (GPU runs): the bytes the pass moves by design / time, the achieved
    bandwidth. `gpu_section`: the bandwidth model's prediction, appended after the measurements
    under its own PREDICTED, UNMEASURED heading (runs without a GPU)."""
    command = meta.get("command") or "python -m benchmarks.run " + " ".join(sys.argv[1:])
    compile_mode = {r.get("compile_mode") for r in records if r["backend"] == "compile"}
    lines = [f"# litefpn_kernels benchmark: {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, command `{command.rstrip()}`"
             + (f", torch.compile mode {', '.join(sorted(map(str, compile_mode)))}"
                if compile_mode else ""), "",
             "## Measured", "",
             "| op | pass | dtype | layout | batch | backend | median ms | GB/s ideal "
             "| % copy ideal | GB/s moved | % copy moved | peak MB | x eager | x compile |",
             "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(
            f"| {r['op']} | {r['pass']} | {r['dtype']} | {r['layout']} | {r['batch']} | "
            f"{r['backend']} | {r['median_ms']:.3f} | {_f(r['gbps'], '.1f')} | "
            f"{_f(r['pct_copy_bw'], '.1f')} | {_f(r.get('moved_gbps'), '.1f')} | "
            f"{_f(r.get('pct_copy_bw_moved'), '.1f')} | {_f(r['peak_mem_mb'], '.1f')} | "
            f"{_f(r['speedup_vs_eager'], '.2f')} | {_f(r['speedup_vs_compile'], '.2f')} |")
    if gpu_section:
        lines += ["", gpu_section.rstrip("\n")]
    return "\n".join(lines) + "\n"


#: how a pass reads on the plot: the neck's fwd_bwd is a whole training step
PASS_LABELS = {"fwd": "train fwd", "fwd_bwd": "fwd+bwd", "eval": "eval"}


def _group_label(op, pass_name):
    name, _, level = op.partition("@")
    pass_label = "train step" if (name == "neck" and pass_name == "fwd_bwd") else \
        PASS_LABELS.get(pass_name, pass_name)
    # one short line per fact, so neighbouring labels never overlap
    return "\n".join(x for x in (name.replace("lateral_up2_fuse", "lateral_up2\n_fuse"),
                                 f"@{level}" if level else "", pass_label) if x)


def plot(records, path, machine):
    """Speed-up over eager per op and pass, one panel per dtype x layout x batch, each bar
    labelled with its value."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r["op"] != "copy"]
    panels = sorted({(r["dtype"], r["layout"], r["batch"]) for r in rows})
    impls = list(dict.fromkeys(r["backend"] for r in rows))
    n_groups = max((len({(r["op"], r["pass"]) for r in rows if (r["dtype"], r["layout"],
                                                                  r["batch"]) == p})
                    for p in panels), default=1)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(10, 1.25 * n_groups), 4.4 * len(panels)),
                             squeeze=False)
    for ax, (dtype, layout, batch) in zip(axes[:, 0], panels):
        sel = [r for r in rows if (r["dtype"], r["layout"], r["batch"]) == (dtype, layout, batch)]
        groups = list(dict.fromkeys((r["op"], r["pass"]) for r in sel))
        width = 0.8 / max(len(impls), 1)
        for k, impl in enumerate(impls):
            vals = {(r["op"], r["pass"]): r["speedup_vs_eager"] for r in sel if r["backend"] == impl}
            xs = [i + k * width for i, g in enumerate(groups) if vals.get(g)]
            ys = [vals[g] for g in groups if vals.get(g)]
            bars = ax.bar(xs, ys, width, label=impl)
            if impl != "eager":
                ax.bar_label(bars, labels=[f"{y:.1f}" for y in ys], fontsize=7, padding=1)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
        ax.set_xticklabels([_group_label(o, p) for o, p in groups], fontsize=8)
        ax.set_ylabel("speed-up vs eager (x)", fontsize=9)
        ax.margins(y=0.12)
        ax.set_title(f"{machine}: {dtype}{' (autocast for the neck)' if dtype != 'fp32' else ''}, "
                     f"{layout}, batch {batch}", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # off the bars
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
