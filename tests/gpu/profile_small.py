"""Host time against device time of one training step of each op at the small levels, where the
H200 run measured the fused ops slower than eager (0.5-0.7x at 1/16): is a call bound by its
host work (Python, plans, launches) or by its kernels?

    python3 -m tests.gpu.profile_small [device] [batch] [levels]    # default cuda 256 1/16,1/8

For each op, level and implementation: the wall time of one call (host, synchronised), the sum
of its kernels' device time and their count (torch.profiler), medians over 20 calls after a
warm-up. Wall >> kernels means host-bound. On a CPU (`cpu`) it times eager and the `cpu` backend
(no device column): the dry run of tests/gpu/test_smoke.py.
"""
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import cases

BUILDERS = {"up2_fuse": cases.up2_fuse_case, "lateral_up2_fuse": cases.lateral_up2_fuse_case,
            "bn_silu": cases.bn_silu_case}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure(run, dev, calls=20):
    """(median wall ms, median device ms per call or None, kernels per call or None)."""
    for _ in range(3):
        run()
    _sync(dev)
    walls = []
    for _ in range(calls):
        t0 = time.perf_counter()
        run()
        _sync(dev)
        walls.append((time.perf_counter() - t0) * 1e3)
    if dev.type != "cuda":
        return statistics.median(walls), None, None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        _sync(dev)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    device_ms = sum(e.device_time for e in kernels) / 1e3 / calls
    return statistics.median(walls), device_ms, len(kernels) / calls


def main(argv):
    dev = torch.device(argv[0] if argv else "cuda")
    batch = int(argv[1]) if len(argv) > 1 else 256
    levels = argv[2].split(",") if len(argv) > 2 else ["1/16", "1/8"]
    impls = ["eager", "triton", "cuda"] if dev.type == "cuda" else ["eager", "cpu"]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    print(f"{'op':18s} {'level':5s} {'impl':7s} {'wall ms':>9s} {'kernels ms':>10s} "
          f"{'launches':>8s}", flush=True)
    for op, build in BUILDERS.items():
        for level in levels:
            for impl in impls:
                if impl not in cases.impls_for(op, dev):
                    continue
                case = build(impl, level, batch, dtype, dev, True)
                wall, kern, n = measure(case.run["fwd_bwd"], dev)
                print(f"{op:18s} {level:5s} {impl:7s} {wall:9.3f} "
                      f"{'' if kern is None else f'{kern:10.3f}':>10s} "
                      f"{'' if n is None else f'{n:8.1f}':>8s}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
