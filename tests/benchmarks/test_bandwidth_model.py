"""The report's byte accounting (benchmarks/cases.py, benchmarks/bandwidth_model.py) against the
tensors it describes, and the GPU prediction's labelling: every predicted row says it is
PREDICTED, UNMEASURED, and a measured table never does."""
import argparse
import json
import os

import pytest
import torch

from benchmarks import bandwidth_model as bm
from benchmarks import cases, run
from tests.support.helpers import CPU, need

OPS = ("up2_fuse", "lateral_up2_fuse", "bn_silu")
LEVEL = "1/16"  # the smallest spec level: counting runs the ops on CPU


def nbytes(t):
    return t.numel() * t.element_size()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("op", OPS)
def test_ideal_bytes_are_the_tensors_read_and_written(op, dtype):
    """cases.ideal_bytes = the nbytes of the maps the op row really reads and writes: forward,
    its input maps and its output; backward, grad_out, the input maps and their gradients."""
    case = getattr(cases, f"{op}_case")("eager", LEVEL, 2, dtype, CPU, True)
    maps = list(case.maps.values())
    out = case.forward()
    grads = torch.autograd.grad(out, maps, torch.ones_like(out))
    fwd = sum(nbytes(m) for m in maps) + nbytes(out)
    bwd = nbytes(out) + sum(nbytes(m) for m in maps) + sum(nbytes(g) for g in grads)
    ideal = cases.ideal_bytes(op, LEVEL, 2, dtype)
    assert ideal == {"fwd": fwd, "eval": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}
    assert {p: case.bytes[p] for p in cases.PASSES} == {p: ideal[p] for p in cases.PASSES}


def _private(log):
    return [k for k in log if k.spec is not None]


def _log(op, pass_, batch=2):
    need(op, "cpu", CPU)
    return bm.kernel_log(op, "triton", LEVEL, pass_, batch, torch.bfloat16, True)


def test_counted_passes_are_the_designed_ones():
    """The counter sees the kernels each fused pass is designed to issue, with their bytes:
    up2_fuse forward is one read-once/write-once kernel; the lateral forward reads z twice (gram,
    then the fused GEMM); its backward reads grad_out three times (g z^T sums, grad_z,
    grad_coarse); bn_silu's forward reads x twice (statistics, then normalise + SiLU)."""
    b, dt = 2, torch.bfloat16
    ins, out = cases.map_shapes("lateral_up2_fuse", LEVEL, b)
    size = 2
    z_bytes = size * torch.Size(ins["z"]).numel()
    g_bytes = size * torch.Size(out).numel()

    up2 = _log("up2_fuse", "fwd")
    assert [k.name for k in up2] == ["_up2_fuse_fwd"]
    ideal = cases.ideal_bytes("up2_fuse", LEVEL, b, dt)["fwd"]
    assert up2[0].reads + up2[0].writes == pytest.approx(ideal, abs=64)  # + the two [1] weights

    fwd = _private(_log("lateral_up2_fuse", "fwd"))
    assert [k.name for k in fwd] == ["_lateral_gram", "_lateral_up2_fuse_fwd"]
    small = 4096  # the [C] / [C, Cin] parameters and statistics beside the maps
    assert fwd[0].reads == pytest.approx(z_bytes, abs=small)  # gram(z, z): z once
    assert sum(k.reads + k.writes for k in fwd) >= \
        cases.ideal_bytes("lateral_up2_fuse", LEVEL, b, dt)["fwd"] + z_bytes

    bwd = _private(_log("lateral_up2_fuse", "bwd"))
    assert [k.name for k in bwd] == ["_lateral_gram", "_lateral_grad_z", "_up2_fuse_bwd_coarse"]
    assert all(k.spec["maps"][0][0] == tuple(out) for k in bwd)  # each reads grad_out first
    assert sum(k.reads for k in bwd) >= 3 * g_bytes + 2 * z_bytes

    bn = _private(_log("bn_silu", "fwd"))
    assert [k.name for k in bn] == ["_bn_silu_stats", "_bn_silu_fwd"]
    x_bytes = size * torch.Size(cases.map_shapes("bn_silu", LEVEL, b)[0]["x"]).numel()
    assert [k.reads for k in bn] == [pytest.approx(x_bytes, abs=small)] * 2


@pytest.mark.parametrize("op,impl", [("lateral_up2_fuse", "triton"), ("up2_fuse", "eager")])
def test_extrapolated_log_is_the_counted_one(op, impl):
    """Logs counted at batch 1 and 2, extrapolated to 5, equal the log counted at batch 5."""
    need(op, "cpu", CPU)
    got = bm.kernel_log(op, impl, LEVEL, "fwd_bwd", 5, torch.bfloat16, True)
    torch.manual_seed(0)
    counted = bm.count(bm._case(op, impl, LEVEL, 5, torch.bfloat16, True).run["fwd_bwd"])
    assert [k.name for k in got] == [k.name for k in counted]
    for a, b in zip(got, counted):
        assert (a.reads, a.writes, a.flops, a.cuda_extra) == pytest.approx(
            (b.reads, b.writes, b.flops, b.cuda_extra)), a.name


def test_designed_bytes_at_least_ideal_and_eager_counts_its_passes():
    """Spec shapes: designed >= ideal for every fused pass (equal for up2_fuse's forward); the
    eager composition moves more than the fused one."""
    need("lateral_up2_fuse", "cpu", CPU)
    for op in OPS:
        for pass_ in ("fwd", "bwd", "eval"):
            row = bm.predict_row(op, LEVEL, pass_)
            for impl in bm.BACKENDS:
                assert row.designed[impl] >= row.ideal * (1 - 1e-6), (op, pass_, impl)
                assert row.designed["eager"] > row.designed[impl], (op, pass_, impl)
    row = bm.predict_row("up2_fuse", LEVEL, "fwd")
    assert row.designed["triton"] == pytest.approx(row.ideal, rel=1e-6)


def unlabelled_rows(text):
    """Table rows and headings of a predicted section that lack the PREDICTED, UNMEASURED label
    (the separator and header rows of a table excepted)."""
    bad = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        header = i + 1 < len(lines) and lines[i + 1].startswith("|---")
        if line.startswith("|") and not line.startswith("|---") and not header:
            if bm.LABEL not in line:
                bad.append(line)
        if line.startswith("#") and "leaves out" not in line and bm.LABEL not in line:
            bad.append(line)
    return bad


@pytest.fixture(scope="module")
def small_prediction():
    need("up2_fuse", "cpu", CPU)
    return bm.predict_all(op_rows=[("up2_fuse", LEVEL), ("lateral_up2_fuse", LEVEL)],
                          passes=("fwd", "bwd", "fwd_bwd"), neck=False)


def test_prediction_is_labelled_on_every_row(small_prediction):
    full = bm.markdown(small_prediction)
    summary = bm.summary_markdown(small_prediction)
    for text in (full, summary):
        assert text.startswith("#") and bm.LABEL in text.splitlines()[0]
        assert unlabelled_rows(text) == []
        assert sum(bm.LABEL in line for line in text.splitlines() if line.startswith("| ")) >= 3
    # seeded defect: a row that lost its label is caught
    row = next(line for line in full.splitlines() if line.startswith("| up2_fuse"))
    assert unlabelled_rows(full.replace(row, row.replace(bm.LABEL, "measured"))) != []


def test_committed_prediction_is_labelled():
    with open(bm.RESULTS) as f:
        text = f.read()
    assert unlabelled_rows(text) == []
    assert "nothing here ran on a GPU" in text


def _record(backend, moved_gbps):
    return dict(op="up2_fuse@1/4", backend=backend, **{"pass": "fwd"}, dtype="bf16",
                layout="channels_last", batch=256, median_ms=0.5, ideal_bytes=1.2e9,
                gbps=2400.0, pct_copy_bw=80.0, moved_bytes=1.2e9 if moved_gbps else None,
                moved_gbps=moved_gbps, pct_copy_bw_moved=80.0 if moved_gbps else None,
                peak_mem_mb=1.0, speedup_vs_eager=7.0, speedup_vs_compile=2.0)


def test_report_keeps_measurements_and_prediction_apart(small_prediction):
    meta = dict(device="NVIDIA_H100", torch="2.13", triton="3.6")
    args = argparse.Namespace()
    measured = run.markdown([_record("triton", 2400.0), _record("compile", None)], meta, args)
    assert bm.LABEL not in measured
    header = next(line for line in measured.splitlines() if line.startswith("| op"))
    assert "GB/s ideal" in header and "% copy ideal" in header and "GB/s moved" in header
    assert "| 2400.0 | 80.0 | 2400.0 | 80.0 |" in measured
    section = bm.summary_markdown(small_prediction)
    text = run.markdown([_record("cpu", None)], meta, args, section)
    assert text.index("## Measured") < text.index(bm.LABEL)
    assert unlabelled_rows(text[text.index("## GPU"):]) == []


def test_moved_bytes_only_for_gpu_rows_the_model_counts():
    need("up2_fuse", "cpu", CPU)
    cuda = torch.device("cuda")
    args = ("up2_fuse", "triton", LEVEL, "fwd", 2, torch.bfloat16, True)
    ideal = cases.ideal_bytes("up2_fuse", LEVEL, 2, torch.bfloat16)["fwd"]
    assert run.moved_bytes(*args, cuda) == pytest.approx(ideal, abs=64)
    assert run.moved_bytes(*args, CPU) is None
    assert run.moved_bytes("up2_fuse", "compile", *args[2:], cuda) is None
    assert run.moved_bytes("neck", "triton", None, "fwd", 2, torch.bfloat16, True, cuda) is None


def test_results_file_is_where_the_readme_says():
    assert os.path.basename(bm.RESULTS) == "gpu_model.md"
    with open(os.path.join(os.path.dirname(bm.RESULTS), "..", "..", "README.md")) as f:
        assert "benchmarks/results/gpu_model.md" in f.read()


def test_render_fills_the_moved_bytes_of_a_no_model_gpu_run(tmp_path):
    """A GPU run with --no-model (a short lease) leaves moved bytes empty; --render counts them
    here, from the records alone, and writes the report beside the JSON."""
    need("up2_fuse", "cpu", CPU)
    base = dict(dtype="bf16", layout="channels_last", batch=2, device="NVIDIA_H200",
                torch="2.11", triton="3.6", command="python -m benchmarks.run --no-model",
                moved_bytes=None, moved_gbps=None, pct_copy_bw_moved=None, peak_mem_mb=1.0,
                speedup_vs_compile=None, ideal_bytes=1, gbps=1.0, pct_copy_bw=1.0)
    records = [dict(base, op="copy", backend="torch", median_ms=0.01, gbps=400.0,
                    speedup_vs_eager=None, **{"pass": "eval"}),
               dict(base, op=f"up2_fuse@{LEVEL}", backend="triton", median_ms=0.02,
                    speedup_vs_eager=3.0, **{"pass": "fwd"})]
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(records))
    run.main(["--render", str(path)])
    row = json.loads(path.read_text())[1]
    want = run.moved_bytes("up2_fuse", "triton", LEVEL, "fwd", 2, torch.bfloat16, True,
                           torch.device("cuda"))
    assert want and row["moved_bytes"] == want
    assert row["pct_copy_bw_moved"] == pytest.approx(100 * want / 0.02 / 1e6 / 400.0)
    text = (tmp_path / "gpu.md").read_text()
    assert "python -m benchmarks.run --no-model" in text and (tmp_path / "gpu.png").exists()
