"""Data-parallel training of the small heatmap model of tests/integration/train_parity.py with
SyncBatchNorm, on a fused backend and on eager, side by side.

    torchrun --nproc_per_node=2 -m benchmarks.ddp_train [--backend auto --steps 50 --batch 4]

gloo on CPU, NCCL on GPU. Every rank trains both models in lockstep on its part of the same
global batches (`--batch` per rank) and prints, on rank 0, steps/s of each and the largest
relative loss difference (the loss is all-reduced: the global batch's).

* GPU: both models are `DistributedDataParallel(nn.SyncBatchNorm.convert_sync_batchnorm(...))`.
* CPU: PyTorch's SyncBatchNorm and DDP's wrapper refuse SyncBatchNorm on CPU, so the fused
  model (SyncBatchNorm semantics from litefpn_kernels) averages its gradients with one
  all_reduce per parameter after backward, as DDP does; eager cannot synchronise BatchNorm on
  CPU, so its side is the equivalent single-process run: every rank runs the whole global
  batch with plain BatchNorm (same losses in exact arithmetic, twice the work: its steps/s is
  not a like-for-like comparison there).
"""
import argparse
import copy
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from litefpn_kernels import backends
from tests.integration import train_parity


def _average_gradients(model, world):
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", default="auto", help="fused backend to compare with eager")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=4, help="samples per rank")
    p.add_argument("--top", type=int, nargs=2, default=(4, 8), help="B4's spatial size")
    p.add_argument("--lr", type=float, default=0.01)
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else \
        torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = backends.resolve("lateral_up2_fuse", args.backend, device)

    gen = torch.Generator().manual_seed(0)  # the same global batches on every rank
    torch.manual_seed(0)
    base = train_parity.Model("eager").to(device).to(memory_format=torch.channels_last)
    fused = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base))
    fused.neck.backend = backend
    if cuda:
        eager = nn.parallel.DistributedDataParallel(
            nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base)), device_ids=[device])
        fused = nn.parallel.DistributedDataParallel(fused, device_ids=[device])
    else:
        eager = copy.deepcopy(base)  # the whole global batch, plain BatchNorm (see above)
    models = {"eager": eager, backend: fused}
    opts = {k: torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9)
            for k, m in models.items()}
    losses = {k: [] for k in models}
    seconds = dict.fromkeys(models, 0.0)
    rows = slice(rank * args.batch, (rank + 1) * args.batch)
    for _ in range(args.steps):
        feats, target = train_parity.make_batch(gen, args.batch * world, args.top, device,
                                                torch.float32)
        for name, model in models.items():
            whole = name == "eager" and not cuda
            x = feats if whole else [f[rows] for f in feats]
            t = target if whole else target[rows]
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss = F.mse_loss(model(x), t) * 100
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            if not cuda and not whole:
                _average_gradients(model, world)
            opts[name].step()
            if cuda:
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - start
            if not whole:  # the global batch's loss (equal per-rank batches)
                loss = loss.detach().clone()
                dist.all_reduce(loss)
                loss /= world
            losses[name].append(loss.item())
    if rank == 0:
        diff = max(abs(a - b) / max(abs(a), 1e-12)
                   for a, b in zip(losses["eager"], losses[backend]))
        print(f"world {world} ({'nccl' if cuda else 'gloo'}), {args.batch} samples/rank, "
              f"{args.steps} steps, backend {backend!r}")
        for name in models:
            note = " (whole global batch, one process: no SyncBatchNorm on CPU)" \
                if name == "eager" and not cuda else ""
            print(f"  {name:8s} {args.steps / seconds[name]:7.2f} steps/s  loss "
                  f"{losses[name][0]:.4f} -> {losses[name][-1]:.4f}{note}")
        print(f"  largest relative loss difference: {diff:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
