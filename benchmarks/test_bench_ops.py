"""pytest-benchmark microbenchmarks of the same workloads as the report (benchmarks/cases.py).

    python -m pytest benchmarks/test_bench_ops.py --benchmark-group-by=param:op,param:pass
    (or `make microbench`). Batch: 256 on GPU, 2 on CPU; LITEFPN_BENCH_BATCH overrides.
"""
import os

import pytest
import torch

from benchmarks import cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = int(os.environ.get("LITEFPN_BENCH_BATCH", 256 if DEVICE.type == "cuda" else 2))
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


OPS = ("up2_fuse", "lateral_up2_fuse", "bn_silu", "neck")
PARAMS = [(op, impl) for op in OPS for impl in cases.impls_for(op, DEVICE)]


@pytest.fixture(autouse=True)
def _sync_after():
    yield
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("pass_", cases.PASSES)
@pytest.mark.parametrize("op,impl", PARAMS)
def test_bench(benchmark, op, impl, pass_, layout):
    channels_last = layout == "channels_last"
    if op == "up2_fuse":
        case = cases.up2_fuse_case(impl, "1/4", BATCH, DTYPE, DEVICE, channels_last)
    elif op == "lateral_up2_fuse":
        case = cases.lateral_up2_fuse_case(impl, "1/4", BATCH, DTYPE, DEVICE, channels_last)
    elif op == "bn_silu":
        case = cases.bn_silu_case(impl, "1/4", BATCH, DTYPE, DEVICE, channels_last)
    else:
        case = cases.neck_case(impl, BATCH, DTYPE, DEVICE, channels_last)
    fn = case.run[pass_]
    fn()  # warm-up (and compilation)

    def timed():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(op=op, backend=impl, pass_=pass_, layout=layout, batch=BATCH)
    benchmark(timed)
