"""Distributed training on the fused path, with real processes: 2 ranks, gloo on 127.0.0.1, CPU.

One spawn of two processes and one process group serve every check (`results` fixture): each
rank runs all cases and reports per case; the tests below read the reports.

* SyncBatchNorm: a LiteFPN converted with nn.SyncBatchNorm.convert_sync_batchnorm, on a fused
  backend, each rank given its part of a batch (unequal sizes: 3 and 2), gradients all-reduced
  and averaged as DDP does (DDP's wrapper refuses SyncBatchNorm on CPU), must match one process
  running the whole batch with plain BatchNorm on eager: outputs, input and parameter
  gradients, running statistics, num_batches_tracked, over two steps.
* The eager backend keeps PyTorch's SyncBatchNorm, which refuses CPU tensors in training.
* Plain DDP (no SyncBatchNorm) on the fused path: gradients equal to the average of the per-rank
  eager gradients, and DDP emits no warning (gradient strides, unused parameters).
"""
import copy
import datetime
import itertools
import os
import socket
import tempfile
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from litefpn_kernels import LiteFPN, backends
from tests.support.helpers import randomise
from tests.support.inputs import make_feats

WORLD = 2
SIZES = (3, 2)  # per-rank batch: unequal on purpose
SMALL = dict(in_channels=(4, 6, 8, 10), channels=8)
TOL = dict(rtol=1e-4, atol=1e-5)  # fp32 through two BN levels and a global reduction
TIMEOUT_S = 240

SYNC_CASES = [
    dict(backend=b, training=t, channels_last=cl, fuse=f)
    for b, t, cl, f in itertools.product(("cpu", "contract"), (True, False), (False, True),
                                         ("add", "weighted"))
] + [
    # every other BatchNorm of the fused path: coord-gate BNs, PAN downsampling, lone laterals
    dict(backend="cpu", training=True, channels_last=False, fuse="weighted", gate="coord",
         pan=True),
    dict(backend="cpu", training=True, channels_last=True, fuse="add", gate="se",
         hr_fusion="concat"),
    # no bn_silu kernels on triton: the smooths take the generic synchronised BatchNorm
    dict(backend="triton", training=True, channels_last=True, fuse="weighted"),
]
DDP_CASES = [dict(backend="cpu", channels_last=cl, fuse="weighted") for cl in (False, True)]


def _name(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


def _outputs(out):
    return [o for o in out if o is not None]


def _loss(outs, seed, rows):
    """sum(out * g) with fixed random g (rows: this rank's slice of the global batch)."""
    g = torch.Generator().manual_seed(seed)
    total = 0
    for o in outs:
        full = torch.randn((sum(SIZES),) + tuple(o.shape[1:]), generator=g)
        total = total + (o * full[rows]).sum()
    return total


def _close(got, want, what):
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got / scale, want / scale, **TOL, msg=lambda m: f"{what}: {m}")


def _sync_case(rank, case):
    backend = case["backend"]
    opts = {k: v for k, v in case.items() if k not in ("backend", "training", "channels_last")}
    torch.manual_seed(0)
    ref = LiteFPN(**SMALL, **opts, backend="eager")
    randomise(ref, 0)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref))
    model.backend = backend
    fmt = torch.channels_last if case["channels_last"] else torch.contiguous_format
    ref, model = ref.to(memory_format=fmt), model.to(memory_format=fmt)
    ref.train(case["training"])
    model.train(case["training"])
    start = sum(SIZES[:rank])
    rows = slice(start, start + SIZES[rank])
    for step in range(2):
        feats = make_feats(sum(SIZES), (2, 3), SMALL["in_channels"], seed=step,
                           channels_last=case["channels_last"])
        full = [f.clone().requires_grad_() for f in feats]
        local = [f[rows].clone().requires_grad_() for f in feats]
        out_ref = _outputs(ref(full))
        _loss(out_ref, step, slice(None)).backward()
        out = _outputs(model(local))
        # x WORLD: DDP's average of the ranks' gradients is then the gradient of the sum
        (_loss(out, step, rows) * WORLD).backward()
        for a, b in zip(out, out_ref):
            _close(a, b[rows], f"step {step} output")
        for a, b in zip(local, full):
            _close(a.grad, b.grad[rows] * WORLD, f"step {step} input grad")
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        grad = q.grad.clone()
        dist.all_reduce(grad)
        if case["training"] and name.endswith("conv1.bias"):
            # a bias right before a training BatchNorm: its gradient is exactly 0, both sides
            # hold only the rounding of a cancelling sum, so check that it is that small
            assert grad.abs().max() / WORLD < 1e-4 and p.grad.abs().max() < 1e-4, name
            continue
        _close(grad / WORLD, p.grad, f"{name}.grad")
    for (name, b), c in zip(ref.named_buffers(), model.buffers()):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(c, b), (name, c, b)
        else:
            _close(c, b, name)


def _eager_sync_bn_refuses_cpu(rank):
    model = nn.SyncBatchNorm.convert_sync_batchnorm(LiteFPN(**SMALL, backend="eager")).train()
    feats = make_feats(SIZES[rank], (2, 3), SMALL["in_channels"])
    try:
        model(feats)
    except ValueError as exc:
        assert "GPU" in str(exc), exc
    else:
        raise AssertionError("eager SyncBatchNorm ran on CPU tensors")


def _ddp_case(rank, case):
    torch.manual_seed(0)
    eager = LiteFPN(**SMALL, fuse=case["fuse"], backend="eager")
    randomise(eager, 0)
    fused = copy.deepcopy(eager)
    fused.backend = case["backend"]
    fmt = torch.channels_last if case["channels_last"] else torch.contiguous_format
    eager, fused = eager.to(memory_format=fmt), fused.to(memory_format=fmt)
    start = sum(SIZES[:rank])
    rows = slice(start, start + SIZES[rank])
    feats = [f[rows] for f in make_feats(sum(SIZES), (2, 3), SMALL["in_channels"],
                                         channels_last=case["channels_last"])]
    _loss(_outputs(eager(feats)), 0, rows).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ddp = nn.parallel.DistributedDataParallel(fused)
        _loss(_outputs(ddp(feats)), 0, rows).backward()
    ddp_warnings = [str(w.message) for w in caught
                    if any(k in str(w.message).lower() for k in ("stride", "unused", "ddp",
                                                                  "reducer", "bucket"))]
    assert not ddp_warnings, ddp_warnings
    for (name, p), q in zip(eager.named_parameters(), fused.parameters()):
        want = p.grad.clone()
        dist.all_reduce(want)
        _close(q.grad, want / WORLD, f"{name}.grad")


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    from tests.support import contract  # noqa: F401  (registers the "contract" backend)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    report = {}
    checks = ([(f"sync-{_name(c)}", lambda c=c: _sync_case(rank, c)) for c in SYNC_CASES]
              + [("eager-refuses-cpu", lambda: _eager_sync_bn_refuses_cpu(rank))]
              + [(f"ddp-{_name(c)}", lambda c=c: _ddp_case(rank, c)) for c in DDP_CASES])
    for name, check in checks:
        try:
            check()
            report[name] = None
        except Exception:  # noqa: BLE001  (reported per case, both ranks go on together)
            report[name] = traceback.format_exc()
        dist.barrier()
    dist.destroy_process_group()
    torch.save(report, os.path.join(out_dir, f"rank{rank}.pt"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if backends.unavailable_reason("lateral_up2_fuse", "cpu", "cpu") is not None:
        pytest.skip("the cpu backend is not built")
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=False,
                                 start_method="spawn")
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=TIMEOUT_S)
        while not ctx.join(timeout=5):
            if datetime.datetime.now() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"the distributed workers did not finish in {TIMEOUT_S} s")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


def _check(results, name):
    errors = [f"rank {r}:\n{rep[name]}" for r, rep in enumerate(results) if rep[name]]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("case", SYNC_CASES, ids=_name)
def test_sync_batch_norm_matches_one_process_on_the_whole_batch(results, case):
    _check(results, f"sync-{_name(case)}")


def test_eager_keeps_pytorch_sync_batch_norm_and_its_cpu_error(results):
    _check(results, "eager-refuses-cpu")


@pytest.mark.parametrize("case", DDP_CASES, ids=_name)
def test_plain_ddp_gradients_average_the_ranks_eager_gradients(results, case):
    _check(results, f"ddp-{_name(case)}")
