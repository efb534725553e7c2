"""A small run of every GPU kernel, for compute-sanitizer (memcheck, racecheck) and a quick check.

    compute-sanitizer --tool memcheck python3 -m tests.gpu.smoke
    python3 -m tests.gpu.smoke cpu          # the same checks of the `cpu` backend (dry run)

Runs up2_fuse, lateral_up2_fuse and bn_silu forward + backward on the `cuda` and `triton` backends (each
that is available; `cpu` with the argument cpu), fp32 and bf16, contiguous and channels_last,
odd sizes, with weights and gates, and compares each against the eager composition in float64.
Exits non-zero on a mismatch.
"""
import sys

import torch

from litefpn_kernels import backends, eager, ops

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def inputs(shape, c_in, dtype, channels_last, gen, dev):
    n, c, h, w = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    coarse = rand(n, c, h, w).to(dev, dtype).contiguous(memory_format=fmt).requires_grad_()
    fine = rand(n, c, 2 * h, 2 * w).to(dev, dtype).contiguous(memory_format=fmt).requires_grad_()
    z = rand(n, c_in, 2 * h, 2 * w).to(dev, dtype).contiguous(memory_format=fmt).requires_grad_()
    small = dict(w_coarse=rand(1) + 1, w_fine=rand(1) - 0.5, gate_coarse=torch.sigmoid(rand(n, c)),
                 gate_fine=torch.sigmoid(rand(n, c)), conv_weight=rand(c, c_in, 1, 1) / c_in ** 0.5,
                 bn_weight=1 + 0.2 * rand(c), bn_bias=0.1 * rand(c))
    small = {k: v.to(dev, torch.float32).requires_grad_() for k, v in small.items()}
    stats = [0.1 * rand(c), 1 + rand(c).abs()]
    return coarse, fine, z, small, [s.to(dev, torch.float32) for s in stats]


def check(name, got, want, tol, failures):
    err = rel_err(got, want)
    status = "ok" if err <= tol else "FAIL"
    print(f"  {name:40s} rel err {err:.2e} {status}", flush=True)
    if err > tol or not torch.isfinite(got).all():
        failures.append(name)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(argv):
    dev = torch.device(argv[0] if argv else "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    failures = []
    gen = torch.Generator().manual_seed(0)
    names = [b for b in (("cuda", "triton") if dev.type == "cuda" else ("cpu",))
             if backends.unavailable_reason("lateral_up2_fuse", b, dev) is None]
    print(f"backends: {names}")
    for backend in names:
        for dtype in (torch.float32, torch.bfloat16):
            for channels_last in (False, True):
                for shape, c_in in (((2, 8, 5, 7), 3), ((1, 128, 16, 32), 32)):
                    fmt = "nhwc" if channels_last else "nchw"
                    tag = f"{backend} {str(dtype)[6:]} {fmt} {shape}"
                    coarse, fine, z, s, stats = inputs(shape, c_in, dtype, channels_last, gen, dev)
                    # grad_out laid out unlike the inputs: a buffer or grid planned from one
                    # tensor and used with the other is what memcheck should catch
                    other = torch.contiguous_format if channels_last else torch.channels_last
                    g = torch.randn_like(fine).contiguous(memory_format=other)
                    d = lambda t: t.detach().double().requires_grad_()  # noqa: E731
                    # up2_fuse
                    out = ops.up2_fuse(coarse, fine, s["w_coarse"], s["w_fine"],
                                       gate_coarse=s["gate_coarse"], gate_fine=s["gate_fine"],
                                       backend=backend)
                    grads = torch.autograd.grad(out, (coarse, fine, s["w_coarse"]), g)
                    r = [d(coarse), d(fine), d(s["w_coarse"]), d(s["w_fine"]),
                         d(s["gate_coarse"]), d(s["gate_fine"])]
                    ref = eager.up2_fuse(r[0], r[1], r[2], r[3], 1e-4, r[4], r[5])
                    ref_grads = torch.autograd.grad(ref, (r[0], r[1], r[2]), g.double())
                    check(f"up2_fuse {tag}", out, ref, TOL[dtype], failures)
                    for gg, rg, nm in zip(grads, ref_grads, ("coarse", "fine", "w_coarse")):
                        check(f"up2_fuse grad_{nm} {tag}", gg, rg, TOL[dtype], failures)
                    sync(dev)
                    # lateral_up2_fuse, training (batch statistics)
                    rm, rv = (t.clone() for t in stats)
                    out = ops.lateral_up2_fuse(coarse, z, s["conv_weight"], s["bn_weight"],
                                               s["bn_bias"], rm, rv, True, w_coarse=s["w_coarse"],
                                               w_fine=s["w_fine"], backend=backend)
                    grads = torch.autograd.grad(out, (coarse, z, s["conv_weight"]), g)
                    r = [d(coarse), d(z), d(s["conv_weight"]), d(s["bn_weight"]), d(s["bn_bias"]),
                         d(s["w_coarse"]), d(s["w_fine"])]
                    ref = eager.lateral_up2_fuse(r[0], r[1], r[2], r[3], r[4], None, None,
                                                     True, 0.1, 1e-5, r[5], r[6])
                    ref_grads = torch.autograd.grad(ref, (r[0], r[1], r[2]), g.double())
                    check(f"lateral {tag}", out, ref, TOL[dtype], failures)
                    for gg, rg, nm in zip(grads, ref_grads, ("coarse", "z", "conv_weight")):
                        check(f"lateral grad_{nm} {tag}", gg, rg, TOL[dtype], failures)
                    sync(dev)
                    # bn_silu, training (running stats updated in place) and eval
                    for training in (True, False):
                        rm, rv = (t.clone() for t in stats)
                        x = fine.detach().requires_grad_()
                        out = ops.bn_silu(x, s["bn_weight"], s["bn_bias"], rm, rv, training,
                                          backend=backend)
                        (gx,) = torch.autograd.grad(out, (x,), g)
                        ref_rm, ref_rv = (t.double() for t in stats)
                        rx = d(x)
                        ref = torch.nn.functional.silu(torch.nn.functional.batch_norm(
                            rx, ref_rm, ref_rv, d(s["bn_weight"]), d(s["bn_bias"]), training))
                        (ref_gx,) = torch.autograd.grad(ref, (rx,), g.double())
                        mode = "train" if training else "eval"
                        check(f"bn_silu {mode} {tag}", out, ref, TOL[dtype], failures)
                        check(f"bn_silu {mode} grad_x {tag}", gx, ref_gx, TOL[dtype], failures)
                        check(f"bn_silu {mode} running_var {tag}", rv, ref_rv, 1e-5, failures)
                    sync(dev)
    print(f"{len(failures)} failures" + (f": {failures}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
