"""What this installation of litefpn_kernels can do here: `python -m litefpn_kernels.info`
(`--json` for the dict) or `litefpn_kernels.info.collect()`.

Reports versions (litefpn_kernels, torch, triton, python, the compiler that built `_C`, CUDA),
each backend's availability per op and device with the reason when it cannot run, what `auto`
picks, the CPU instruction set the C++ kernels use (and the `LITEFPN_CPU_ISA` cap), the CUDA
architectures compiled in against the GPU's, and the Triton switches (`TRITON_INTERPRET`,
`LITEFPN_TRITON_PLAN`). Paste its output into bug reports.
"""
import argparse
import json
import os
import platform
import re
import sys

import torch

from . import __version__, backends
from .backends import registry

#: the environment variables that change which kernels run
ENV_VARS = ("LITEFPN_CPU_ISA", "TRITON_INTERPRET", "LITEFPN_TRITON_PLAN")


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def _compiler_of(path):
    """The compiler recorded in the ELF .comment of the extension (GCC / clang), if readable."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    found = re.findall(rb"(GCC: \([^)]*\) [0-9][0-9.]*|clang version [0-9][0-9.]*)", data)
    return found[-1].decode() if found else None


def _cuda_archs():
    """Compute capabilities x10 the extension carries code for (CUDA builds only), else None."""
    try:
        return [int(a) for a in torch.ops.litefpn._cuda_archs()]
    except (AttributeError, RuntimeError):
        return None


def _devices():
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


def collect() -> dict:
    """Everything `python -m litefpn_kernels.info` prints, as a JSON-serialisable dict."""
    ext = backends.extension()
    info = {
        "versions": {
            "litefpn_kernels": __version__, "torch": torch.__version__,
            "triton": _triton_version(), "python": platform.python_version(),
            "torch_cuda": torch.version.cuda,
        },
        "platform": platform.platform(),
        "extension": {
            "built": ext is not None,
            "path": getattr(ext, "__file__", None),
            "compiler": _compiler_of(ext.__file__) if ext is not None else None,
        },
        "env": {k: os.environ.get(k) for k in ENV_VARS},
    }
    cpu = {"threads": torch.get_num_threads(), "isa": None,
           "isa_cap": os.environ.get("LITEFPN_CPU_ISA")}
    if ext is not None:
        cpu["isa"] = str(torch.ops.litefpn._cpu_isa())
    info["cpu"] = cpu

    archs = _cuda_archs() if ext is not None else None
    cuda = {"available": torch.cuda.is_available(), "archs_compiled": archs, "device": None}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        cap = 10 * major + minor
        cuda["device"] = {"name": torch.cuda.get_device_name(), "capability": cap,
                          # covered: exact code, or newer than the highest arch (its PTX JITs)
                          "covered": None if archs is None else (cap in archs or cap > max(archs))}
    info["cuda"] = cuda

    info["triton"] = {
        "installed": _triton_version() is not None,
        "interpreter": backends.triton_interpreting(),
        "launch_plan": os.environ.get("LITEFPN_TRITON_PLAN") or "interpreter (default)",
    }

    table, auto = {}, {}
    for op in registry.OPS:
        table[op], auto[op] = {}, {}
        for backend in backends.BACKENDS:
            table[op][backend] = {}
            for device in ("cpu", "cuda"):
                if device == "cuda" and not torch.cuda.is_available():
                    table[op][backend][device] = "no CUDA device here"
                    continue
                table[op][backend][device] = backends.unavailable_reason(op, backend, device)
        for device in _devices():
            auto[op][device] = backends.resolve(op, "auto", torch.device(device))
    info["backends"] = table
    info["auto"] = auto
    return info


def format_text(info: dict) -> str:
    v = info["versions"]
    lines = [f"litefpn_kernels {v['litefpn_kernels']}",
             f"  python {v['python']}, torch {v['torch']}, triton {v['triton'] or 'not installed'}, "
             f"torch CUDA {v['torch_cuda'] or 'none (CPU build)'}",
             f"  platform {info['platform']}"]
    ext = info["extension"]
    if ext["built"]:
        lines.append(f"  extension _C: {ext['path']} (compiler: {ext['compiler'] or 'unknown'})")
    else:
        lines.append("  extension _C: not built (backends 'cpu' and 'cuda' unavailable)")
    cpu = info["cpu"]
    cap = cpu["isa_cap"] or "unset"
    lines.append(f"CPU: kernels use ISA {cpu['isa'] or 'n/a'} (LITEFPN_CPU_ISA={cap}), "
                 f"{cpu['threads']} threads")
    cuda = info["cuda"]
    archs = cuda["archs_compiled"]
    archs_s = ", ".join(f"sm_{a}" for a in archs) if archs else "none (not a CUDA build)"
    if cuda["device"]:
        d = cuda["device"]
        lines.append(f"CUDA: {d['name']} sm_{d['capability']}; compiled for {archs_s}; "
                     f"covered: {d['covered']}")
    else:
        lines.append(f"CUDA: no device; compiled for {archs_s}")
    t = info["triton"]
    lines.append(f"Triton: {'installed' if t['installed'] else 'not installed'}, interpreter "
                 f"{'on' if t['interpreter'] else 'off'} (TRITON_INTERPRET="
                 f"{info['env']['TRITON_INTERPRET'] or 'unset'}), launch plan {t['launch_plan']} "
                 f"(LITEFPN_TRITON_PLAN)")
    lines.append("Backends (op / backend / device: ok, or why not):")
    for op, per_backend in info["backends"].items():
        picks = ", ".join(f"{d}->{b}" for d, b in info["auto"][op].items())
        lines.append(f"  {op}  (auto: {picks})")
        for backend, per_device in per_backend.items():
            cells = "; ".join(f"{d}: {'ok' if r is None else r}" for d, r in per_device.items())
            lines.append(f"    {backend:7s} {cells}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m litefpn_kernels.info",
                                description="What litefpn_kernels can run here, and why not.")
    p.add_argument("--json", action="store_true", help="print the dict of collect() as JSON")
    args = p.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=1) if args.json else format_text(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
