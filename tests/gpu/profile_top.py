"""One training step (forward + backward) of each fused op at the 1/4 level, for Nsight Compute:

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \\
        python3 -m tests.gpu.profile_top [batch] [backends]

Builds the benchmark's cases (bf16, channels_last; default batch 64, backends cuda,triton), runs
each step once to compile and warm up, then once more between cudaProfilerStart/Stop, so that
ncu profiles exactly one step of each op and backend.
"""
import sys

import torch

from benchmarks import cases


def main(argv):
    batch = int(argv[0]) if argv else 64
    names = argv[1].split(",") if len(argv) > 1 else ["cuda", "triton"]
    dev = torch.device("cuda")
    steps = []
    for impl in names:
        for build in (cases.up2_fuse_case, cases.lateral_up2_fuse_case, cases.bn_silu_case):
            case = build(impl, "1/4", batch, torch.bfloat16, dev, True)
            steps.append((f"{impl} {case.op}", case.run["fwd_bwd"]))
    for _, run in steps:
        run()
    torch.cuda.synchronize()
    for name, run in steps:
        print(f"profiling {name}", flush=True)
        with torch.cuda.nvtx.range(name):
            torch.cuda.profiler.start()
            run()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
