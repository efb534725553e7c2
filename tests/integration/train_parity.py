"""Training parity: the same small dense-prediction model trained with the eager neck and with
a fused backend, from the same seed and the same batches; the loss curves should lie on top of
each other.

    python -m tests.integration.train_parity [--backend auto] [--steps 300] [--batch 4]

Task (synthetic, learnable): each sample has K keypoints; the backbone-shaped inputs B1..B4
carry a bump at every keypoint (plus noise), and a 1x1 head on the neck's Hf must predict
Gaussian heatmaps of the keypoints at 1/4 resolution. Writes
benchmarks/results/train_parity_<device>.png (both curves) and prints steps/s of each model,
the two trained in lockstep (one step of each in turn) so that they are timed side by side.
"""
import argparse
import copy
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from litefpn_kernels import LiteFPN, backends

IN_CHANNELS = (32, 64, 128, 256)
KEYPOINTS = 4


def make_batch(gen, batch, top, device, dtype):
    """(feats, heatmaps): inputs with a bump at each keypoint, targets at the 1/4 level."""
    h4, w4 = top[0] * 8, top[1] * 8  # the 1/4 level (B1)
    ys = torch.rand(batch, KEYPOINTS, generator=gen) * (h4 - 1)
    xs = torch.rand(batch, KEYPOINTS, generator=gen) * (w4 - 1)
    gy = torch.arange(h4, dtype=torch.float32)[None, None, :, None]
    gx = torch.arange(w4, dtype=torch.float32)[None, None, None, :]
    heat = torch.exp(-((gy - ys[..., None, None]) ** 2 + (gx - xs[..., None, None]) ** 2) / 4.0)
    feats = []
    for level, c in enumerate(IN_CHANNELS):
        s = 2 ** level
        bumps = F.avg_pool2d(heat, s) if s > 1 else heat            # [B, K, H/s, W/s]
        # keypoint k writes a fixed pattern over the channels, distinct per keypoint
        code = torch.linspace(-1, 1, c) + torch.arange(KEYPOINTS)[:, None] / KEYPOINTS
        signal = torch.einsum("bkhw,kc->bchw", bumps, code)
        noise = 0.1 * torch.randn(signal.shape, generator=gen)
        feats.append((signal + noise).to(device=device, dtype=dtype)
                     .contiguous(memory_format=torch.channels_last))
    return feats, heat.to(device=device, dtype=dtype)


class Model(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.neck = LiteFPN(IN_CHANNELS, 64, fuse="weighted", backend=backend)
        self.head = nn.Conv2d(64, KEYPOINTS, 1)

    def forward(self, feats):
        return self.head(self.neck(feats).hf)


def train_side_by_side(models, batches, lr):
    """Trains every model of `models` ({name: module}) on the same batches, in lockstep (each
    step runs once per model, in turn), so the shared machine's drifts hit all alike.
    -> {name: (losses, steps/s)}, steps/s from each model's own step times."""
    opts = {k: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for k, m in models.items()}
    losses = {k: [] for k in models}
    seconds = dict.fromkeys(models, 0.0)
    for feats, target in batches:
        for name, model in models.items():
            start = time.perf_counter()
            loss = F.mse_loss(model(feats), target) * 100
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            losses[name].append(loss.item())
            seconds[name] += time.perf_counter() - start
    return {k: (losses[k], len(batches) / seconds[k]) for k in models}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", default="auto", help="fused backend to compare with eager")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=None, help="default: 32 on GPU, 4 on CPU")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    fused_name = backends.resolve("lateral_up2_fuse", args.backend, device)
    if fused_name == "eager":
        raise SystemExit(f"backend={args.backend!r} resolves to eager here: nothing to compare")
    batch = args.batch or (32 if device.type == "cuda" else 4)
    top = (4, 6)
    gen = torch.Generator().manual_seed(0)
    batches = [make_batch(gen, batch, top, device, torch.float32) for _ in range(args.steps)]

    torch.manual_seed(0)
    eager_model = Model("eager").to(device).to(memory_format=torch.channels_last)
    fused_model = copy.deepcopy(eager_model)
    fused_model.neck.backend = fused_name
    curves = {}
    results = train_side_by_side({"eager": eager_model, fused_name: fused_model}, batches,
                                 args.lr)
    for name, (losses, rate) in results.items():
        curves[name] = losses
        print(f"{name:>7}: {rate:6.1f} steps/s, loss {losses[0]:.4f} -> {losses[-1]:.4f}",
              flush=True)
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(*curves.values()))
    print(f"largest relative loss difference over {args.steps} steps: {worst:.2e}")

    from benchmarks.run import RESULTS_DIR, machine_name  # the report's results folder

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, losses), style in zip(curves.items(), ("-", "--")):
        ax.plot(losses, style, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (MSE x 100)")
    ax.set_yscale("log")
    ax.set_title(f"LiteFPN training parity, {machine_name(device)}, batch {batch}")
    ax.legend()
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"train_parity_{device.type}.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
