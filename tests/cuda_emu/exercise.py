"""Runs the emulated CUDA ops over every launch path on small inputs, checking each result
against its float64 contract (cases.py); meant to run under a sanitizer build:

    LD_PRELOAD=<libasan|libtsan> python tests/cuda_emu/exercise.py <lib.so> <group>

Groups: "all" (every kernel instantiation family: up2 fwd/bwd/bwd_coarse plane+nhwc, vector and
element-wise, int32+int64, sum_partials, gram tiles 32x32/64x32/64x64 multi-chunk and symmetric,
channel mix BM 32/64 with one or two segments, bn_silu elementwise + sums on both paths, vector and G=1), or the input that triggers one seeded defect ("oob-global", "oob-shared",
"no-barrier", see build.MUTATIONS). Prints "exercise ok: <n> cases" at the end.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: tests.support
from cuda_emu import cases  # noqa: E402

CL, C, ST, OFF = "channels_last", "contiguous", "strided", "offset"


def all_cases():
    f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
    for dtype in (f32, bf16):
        v = 16 // torch.empty((), dtype=dtype).element_size()
        yield cases.check_up2_fwd, ((2, 3, 3, v // 2), dtype, C,)           # plane, vec
        yield cases.check_up2_fwd, ((2, 3, 2, 3), dtype, OFF,)              # plane, pairs
        yield cases.check_up2_fwd, ((1, 2 * v, 2, 3), dtype, CL,)           # nhwc
        yield cases.check_up2_bwd, ((2, 3, 3, v // 2), dtype, C,)           # plane GC=V/2
        yield cases.check_up2_bwd, ((1, 3, 2, 3), dtype, ST, "expand_all",)  # plane GC=1
        yield cases.check_up2_bwd, ((1, 2 * v, 2, 3), dtype, CL, C,)        # nhwc
        yield cases.check_up2_bwd, ((1, 32 * v, 5, 7), dtype, CL,)          # nhwc, 2 chunks
        yield cases.check_up2_bwd, ((1, 3 * v, 2, 3), dtype, CL,)           # nhwc, ctile 3
        yield cases.check_up2_bwd, ((1, 2, 5, 64), dtype, C,)               # plane, 2 chunks
        yield cases.check_up2_bwd_coarse, ((1, 2 * v, 2, 3), dtype, C, CL,)
        yield cases.check_up2_bwd_coarse, ((1, 3, 2, 3), dtype, C,)
    for dtype in (f64, f32, bf16):
        v = 16 // torch.empty((), dtype=dtype).element_size()
        yield cases.check_bn_silu, ((2, 3, 3, 2 * v), dtype, C, ST,)          # plane, vec / G=1
        yield cases.check_bn_silu, ((2, 2 * v, 3, 5), dtype, CL, "expand_hw",)  # nhwc vec
        yield cases.check_bn_silu, ((1, 3, 40, 70), dtype, OFF, C,)          # plane G=1, 2 chunks
        yield cases.check_bn_silu, ((1, 33, 9, 9), dtype, CL, CL,)           # nhwc G=1, 2 ctiles+chunks
        yield cases.check_bn_silu, ((128, 2, 1, 2), dtype, CL, C,)           # wide sum_partials
    for dtype in (f64, f32):
        yield cases.check_gram, (1, 5, 3, (3, 1), dtype, (C, CL),)          # tiles 32 x 32
        yield cases.check_gram, (1, 33, 7, (2, 3), dtype, (CL, ST),)        # tiles 64 x 32
        yield cases.check_gram, (1, 9, 40, (2, 3), dtype, (C, CL),)         # tiles 64 x 64
        yield cases.check_gram, (1, 6, 17, (24, 25), dtype, (C, C),)        # 2 chunks
        # a's own gram (the moments pass): 6 of the 9 tile pairs
        yield cases.check_gram, (1, 130, 130, (2, 3), dtype, (CL, CL), True, 0, True)
        yield cases.check_lateral_fwd, (1, 20, 70, (3, 5), dtype, (C, CL),)
        yield cases.check_lateral_fwd, (1, 17, 9, (2, 3), dtype, (CL, C),)
        yield cases.check_grad_z, (1, 20, 33, (3, 5), dtype, (C, CL),)      # BM 32, quad
        yield cases.check_grad_z, (1, 40, 7, (2, 9), dtype, (CL, ST),)      # BM 64


GROUPS = {
    # channels 7..31 of a 32-wide tile are past C = 7: the mutated bound reads channel 7 of the
    # last sample, just past the contiguous tensor's end
    "oob-global": lambda: [(cases.check_gram, (1, 7, 5, (2, 3), torch.float32, (C, C), False))],
    # ctile 1 (C = V): pixel lane Pt is one full row past `red`'s end
    "oob-shared": lambda: [(cases.check_up2_bwd, ((1, 4, 2, 3), torch.float32, CL))],
    # K = 40: three slices, so a slice's loads can race with the previous slice's reads
    "no-barrier": lambda: [(cases.check_lateral_fwd, (1, 40, 16, (2, 4), torch.float32, (C, C)))],
    "all": lambda: list(all_cases()),
}


def main(lib, group, int64_too=True):
    torch.ops.load_library(lib)
    runs = GROUPS[group]()
    count = 0
    for force in ((False, True) if group == "all" and int64_too else (False,)):
        torch.ops.litefpn_emu._force_int64(force)
        for check, args in runs:
            check(*args)
            count += 1
    print(f"exercise ok: {count} cases", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
