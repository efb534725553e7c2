"""Static GPU resource table of the CUDA kernels (and a hook for Triton's), without a GPU.

    python tests/gpu/static_resources.py            # print the table
    python tests/gpu/static_resources.py --write    # and rewrite benchmarks/results/gpu_static.md

Every csrc/cuda/*.cu is compiled device-only (`nvcc -fatbin`, the compile test's flags) once per
target arch with `-Xptxas -v --keep`, which gives, per kernel instantiation, ptxas' registers,
stack frame, spill stores/loads and static shared memory, and the PTX. Outputs are cached under
build/gpu_static/<hash of every compile input>/ (sources, flags, nvcc version), so a warm run
only parses. From these, theoretical occupancy at the launch's 256 threads per block (64K
32-bit registers and 64 warps per SM, registers allocated per warp in units of 256 = 8 per
thread; shared memory 228 KiB/SM on sm_90, 164 KiB on sm_80, plus 1 KiB reserved per block), and
from the PTX the 16-byte global accesses (ld/st.global .v4 of 32-bit, .v2 of 64-bit).

tests/compile/test_gpu_static_resources.py checks the rows against RULES below (per kernel family: the
lowest acceptable occupancy with its reason, whether it is a streaming kernel that must move its
data in 16-byte vectors, and which instantiations may spill and why).

Triton hook: resources_from_ptx(name, ptx, arch, threads) runs ptxas -v on a Triton kernel's
PTX (`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)).asm["ptx"]`; Triton
emits `.target sm_90a`, hence -arch=sm_90a) and returns the same Row as the CUDA kernels; add
the kernels to TRITON_KERNELS (a callable per arch returning (name, ptx, threads) triples) and
their rules to RULES.
"""
import argparse
import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
CACHE = ROOT / "build" / "gpu_static"
TABLE = ROOT / "benchmarks" / "results" / "gpu_static.md"
ARCHS = ("90", "80")
THREADS = 256  # every CUDA kernel here (common.cuh kThreads)

# Per-SM limits used for occupancy.
REGS_PER_SM = 65536
MAX_WARPS = 64
MAX_BLOCKS = 32
SMEM_PER_SM = {"90": 228 * 1024, "80": 164 * 1024}
SMEM_RESERVED_PER_BLOCK = 1024
REG_ALLOC_UNIT = 256  # registers per warp allocation unit (= 8 per thread)


@dataclasses.dataclass
class Row:
    source: str   # .cu file (or "triton")
    arch: str
    kernel: str   # short instantiation name, e.g. up2_fwd_kernel<bf16, i32, 8, true>
    regs: int
    stack: int
    spill_st: int
    spill_ld: int
    smem: int
    threads: int
    vld16: int    # 16-byte global loads in the PTX
    vst16: int    # 16-byte global stores in the PTX
    ld: int       # all global loads / stores in the PTX
    st: int

    @property
    def family(self):
        return self.kernel.split("<", 1)[0]

    @property
    def occupancy(self):
        return occupancy(self.regs, self.smem, self.threads, self.arch)


def occupancy(regs, smem, threads, arch):
    """Theoretical occupancy (active warps / 64) from registers and shared memory."""
    warps = -(-threads // 32)
    per_warp = -(-max(regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (REGS_PER_SM // per_warp) // warps
    by_warps = MAX_WARPS // warps
    by_smem = SMEM_PER_SM[arch] // (smem + SMEM_RESERVED_PER_BLOCK)
    blocks = min(by_regs, by_warps, by_smem, MAX_BLOCKS)
    return blocks * warps / MAX_WARPS


# ----------------------------------------------------------------------------- compile + cache
def find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)


def nvcc_flags(arch, csrc):
    from torch.utils import cpp_extension
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(csrc)]
    # the compile test's flags (tests/compile/test_cuda_compile.py nvcc_command), device code only
    return [*(f"-I{d}" for d in includes), "-std=c++20", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
            "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
            *cpp_extension.COMMON_NVCC_FLAGS, "-lineinfo", "-Xptxas", "-v",
            f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def _snapshot():
    """{path relative to the repo: bytes} of every compile input, read once: the cache holds
    results of exactly the bytes its key hashes, even if a file changes during the compile."""
    files = sorted([*CUDA_DIR.rglob("*.cu"), *CUDA_DIR.rglob("*.cuh"),
                    ROOT / "csrc" / "litefpn_math.h"])
    return {p.relative_to(ROOT).as_posix(): p.read_bytes() for p in files}


def _key(nvcc, snap):
    h = hashlib.sha256()
    for rel, data in snap.items():
        h.update(rel.encode() + b"\0" + data)
    # (this file's rules and parsing are not compile inputs: only the flags below are)
    ver = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    h.update(repr(([nvcc_flags(a, "") for a in ARCHS], ver)).encode())
    return h.hexdigest()[:16]


def sources():
    """.cu files that define kernels (build_info.cu has none)."""
    return sorted(p.name for p in CUDA_DIR.glob("*.cu") if "__global__" in _text_with_includes(p))


def _text_with_includes(p):
    text = p.read_text()
    for inc in re.findall(r'#include "cuda/([^"]+)"', text):
        text += (CUDA_DIR / inc).read_text()
    return text


def compile_all(jobs=None):
    """{(source, arch): directory with ptxas.txt and <stem>.ptx}, compiling what is not cached."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found")
    snap = _snapshot()
    base = CACHE / _key(nvcc, snap)
    src_root = base / "src"
    base.mkdir(parents=True, exist_ok=True)
    if not (base / "src.done").exists():
        for rel, data in snap.items():
            (src_root / rel).parent.mkdir(parents=True, exist_ok=True)
            (src_root / rel).write_bytes(data)
        (base / "src.done").write_text("")
    todo = [(s, a) for s in sources() for a in ARCHS]

    def one(item):
        src, arch = item
        out = base / f"{Path(src).stem}.sm_{arch}"
        if (out / "done").exists():
            return item, out
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=base))
        cmd = [nvcc, "-fatbin", str(src_root / "csrc" / "cuda" / src), "-o",
               str(tmp / "out.fatbin"), "--keep", "--keep-dir", str(tmp),
               *nvcc_flags(arch, src_root / "csrc")]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed on {src} sm_{arch}:\n{' '.join(cmd)}\n"
                               f"{proc.stdout}{proc.stderr[-6000:]}")
        (tmp / "ptxas.txt").write_text(proc.stdout + proc.stderr)
        for f in tmp.iterdir():  # keep only what is parsed
            if f.name not in ("ptxas.txt", f"{Path(src).stem}.ptx"):
                f.unlink()
        (tmp / "done").write_text("")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return item, out

    jobs = jobs or int(os.environ.get("MAX_JOBS", str(min(2, os.cpu_count() or 1))))
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return dict(pool.map(one, todo))


# ----------------------------------------------------------------------------- parsing
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
V16_LD = re.compile(r"\bld\.global(?:\.[a-zA-Z0-9_:]+)*?\.v(?:4\.[bfus]32|2\.[bfus]64)\b")
V16_ST = re.compile(r"\bst\.global(?:\.[a-zA-Z0-9_:]+)*?\.v(?:4\.[bfus]32|2\.[bfus]64)\b")
ANY_LD = re.compile(r"\bld\.global\.")
ANY_ST = re.compile(r"\bst\.global\.")


def parse_ptxas(text):
    """[(mangled, regs, stack, spill_st, spill_ld, smem)] in order."""
    out, cur = [], None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = [m.group(1), 0, 0, 0, 0, 0]
            continue
        if cur is None:
            continue
        m = _PROPS.search(line)
        if m:
            cur[2:5] = map(int, m.groups())
            continue
        m = _USED.search(line)
        if m:
            cur[1] = int(m.group(1))
            cur[5] = int(m.group(2) or 0)
            out.append(tuple(cur))
            cur = None
    return out


def ptx_bodies(ptx):
    """{entry name: body text} of a PTX module (the body runs to the next .entry)."""
    parts = re.split(r"^(?:\.visible\s+|\.weak\s+)?\.entry\s+", ptx, flags=re.M)
    out = {}
    for part in parts[1:]:
        name = re.match(r"([\w$]+)", part).group(1)
        out[name] = part
    return out


def short_name(mangled):
    """up2_fwd_kernel<bf16, i32, 8, true> for the mangled instantiation."""
    name = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip()
    name = name.replace("(anonymous namespace)::", "")
    name = re.sub(r"^void ", "", name)
    depth, cut = 0, len(name)  # drop the parameter list: the first "(" outside <...>
    for i, ch in enumerate(name):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            cut = i
            break
    name = name[:cut]
    head, sep, tail = name.partition("<")
    name = re.sub(r"^.*::", "", head) + sep + tail
    name = re.sub(r"\blitefpn::cuda::", "", name)
    for old, new in (("c10::BFloat16", "bf16"), ("c10::Half", "fp16"), ("long", "i64"),
                     ("double", "f64"), ("float", "f32"), ("int", "i32")):
        name = re.sub(rf"(?<![\w:]){re.escape(old)}\b", new, name)
    return name.replace(" >", ">")


def rows_from(source, arch, ptxas_text, ptx_text, threads=THREADS):
    bodies = ptx_bodies(ptx_text)
    rows = []
    for mangled, regs, stack, sst, sld, smem in parse_ptxas(ptxas_text):
        body = bodies.get(mangled, "")
        rows.append(Row(source, arch, short_name(mangled), regs, stack, sst, sld, smem, threads,
                        len(V16_LD.findall(body)), len(V16_ST.findall(body)),
                        len(ANY_LD.findall(body)), len(ANY_ST.findall(body))))
    return rows


def cuda_rows(jobs=None):
    rows = []
    for (src, arch), d in sorted(compile_all(jobs).items()):
        rows += rows_from(src, arch, (d / "ptxas.txt").read_text(),
                          (d / f"{Path(src).stem}.ptx").read_text())
    return rows


# ----------------------------------------------------------------------------- Triton hook
def resources_from_ptx(name, ptx, arch, threads):
    """Row for one PTX kernel (e.g. Triton's asm["ptx"]) via `ptxas -v`; sm_90 PTX from Triton
    targets sm_90a."""
    ptxas = shutil.which("ptxas") or str(Path(find_nvcc()).with_name("ptxas"))
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, flags=re.M)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "k.ptx"
        p.write_text(ptx)
        proc = subprocess.run([ptxas, "-v", f"-arch={target.group(1) if target else 'sm_' + arch}",
                               str(p), "-o", str(Path(d) / "k.cubin")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed on {name}: {proc.stderr[-3000:]}")
    rows = rows_from("triton", arch, proc.stdout + proc.stderr, ptx, threads)
    for r in rows:
        r.kernel = name
    return rows


#: arch -> [(name, ptx, threads)]: Triton kernels to include (filled by the Triton side).
TRITON_KERNELS = []


def triton_rows():
    rows = []
    for producer in TRITON_KERNELS:
        for arch in ARCHS:
            for name, ptx, threads in producer(arch):
                rows += resources_from_ptx(name, ptx, arch, threads)
    return rows


# ----------------------------------------------------------------------------- rules
@dataclasses.dataclass
class Rule:
    pattern: str           # regex on the short kernel name
    min_occupancy: float   # lowest acceptable theoretical occupancy (0..1) ...
    why: str               # ... and why that bound
    streaming: bool = False  # no spill allowed (but spill_ok), 16-byte accesses as below
    spill_ok: tuple = ()   # (regex, reason): instantiations allowed to spill, with the reason
    vld16: bool = False    # the PTX must contain 16-byte global loads ...
    vst16: bool = False    # ... / stores


_SCALAR = "fallback for layouts without 16-byte groups (vec_ok false): element-wise by design"
_V = dict(streaming=True, vld16=True, vst16=True)
RULES = [
    # --- up2_fuse (streaming: one read of each input, one write of each output)
    Rule(r"^up2_fwd_kernel<(bf16|fp16|f32), i\d+, 2, false>|^up2_fwd_kernel<\w+, i\d+, 1, true>",
         0.5, "pairs / one channel per thread (F10a path): <= 64 registers; " + _SCALAR,
         streaming=True),
    Rule(r"^up2_fwd_kernel<", 0.5,
         "streaming; 50% keeps >= 32 KiB of 16-byte loads in flight per SM; measured 50-100%", **_V),
    Rule(r"^up2_bwd_plane_kernel<(bf16|fp16|f32), i\d+, 1,", 0.375, _SCALAR, streaming=True),
    Rule(r"^up2_bwd_plane_kernel<.*, false>$", 0.375,
         "coarse-only: its one output, grad_coarse, is written in GC = V/2 groups (8 bytes), "
         "the fine side (grad_out) is read in 16-byte vectors", streaming=True, vld16=True),
    Rule(r"^up2_bwd_plane_kernel<", 0.375,
         "warp-per-plane gather with 16-byte loads and grad_fine stores; the 64-bit index "
         "variants need 74-80 registers", **_V,
         spill_ok=((r"<f64, i64, 1, true>", "fp64 (gradcheck only), 64-bit index: 16/8 B on "
                    "sm_80 since the vector-store change (F5); not in a bandwidth path"),)),
    Rule(r"^up2_bwd_nhwc_kernel<\w+, i\d+, 1,", 0.375, "one channel per thread (F10a path)",
         streaming=True),
    Rule(r"^up2_bwd_nhwc_kernel<", 0.25,
         "F8 open: the fine variant holds 5 x G accumulators (102-128 registers); "
         "__launch_bounds__(256, 3) spills 12-328 B, so 25% stays (16 x 16-byte loads in flight "
         "per thread)", **_V,
         spill_ok=((r"<(bf16|fp16), i32, 8, false>",
                    "coarse-only variant: ptxas now picks 64 registers with 8-28 B spills (was "
                    "80 registers, 0-8 B) since the gate scales are no longer held in registers; "
                    "not yet checked in SASS whether the spill sits in the item loop"),
                   (r"<f64, i32, 2, true>", "fp64 (gradcheck only), 4/8 B on sm_90"))),
    Rule(r"^sum_partials_kernel<", 0.5, "second-stage sums of [N*C] partials: tiny, latency-bound"),
    Rule(r"^sum_partials_wide_kernel<", 0.5,
         "second-stage sums of few outputs over many partials (bn_silu's [C]): a block each"),
    # --- lateral (channel mix: a small GEMM; loads staged in shared memory, F2 epilogue)
    Rule(r"^mix_kernel<", 0.25,
         "operand loads are scalar and staged through shared memory (audit F2's load half stays "
         "open, no 16-byte loads required); 16-byte epilogue stores required (F2); 64-bit index "
         "/ fp64 variants reach 25%", streaming=True, vst16=True),
    Rule(r"^gram_kernel<", 0.125,
         "reduction GEMM over pixels, not streaming; fp64 / 64-bit index variants use 120-168 "
         "registers; the symmetric (moments) path and the 64 x 32 tile (F12) cost the 32-bit "
         "bf16/fp16 variants 45-61 registers (was 32-46)",
         spill_ok=((r".", "prologue spills (audit F9), not in a streaming kernel"),)),
    # --- bn_silu (streaming elementwise + per-channel sums)
    Rule(r"^bn_ew_kernel<\w+, i\d+, \d, 1,", 0.5, "G = 1: " + _SCALAR, streaming=True),
    Rule(r"^bn_ew_kernel<", 0.5, "streaming elementwise, 16-byte loads and stores", **_V,
         spill_ok=((r"<f32, i64, 3, 4, true>",
                    "64-bit index (only for tensors >= 2^31 elements): 8/8 B on sm_90; not yet "
                    "located in SASS"),)),
    Rule(r"^bn_sums_(plane|nhwc)_kernel<\w+, i\d+, \d, 1>", 0.5, "G = 1: " + _SCALAR,
         streaming=True),
    Rule(r"^bn_sums_(plane|nhwc)_kernel<", 0.375,
         "streaming reads (16-byte), one partial per channel and unit; bwd_sums with 8 channels "
         "per thread and 64-bit index needs 69-74 registers (37.5%), all others >= 50%",
         streaming=True, vld16=True,
         spill_ok=((r"<(bf16|fp16), i64, 2, 8>",
                    "64-bit index (only for tensors >= 2^31 elements): 8/8 B on sm_90; not yet "
                    "located in SASS"),)),
]


def rule_for(row):
    for r in RULES:
        if re.search(r.pattern, row.kernel):
            return r
    return None


def violations(rows):
    """Human-readable rule violations of `rows` (empty when all pass)."""
    bad = []
    for row in rows:
        r = rule_for(row)
        where = f"{row.kernel} sm_{row.arch} ({row.source})"
        if r is None:
            bad.append(f"{where}: no rule in tests/gpu/static_resources.py RULES")
            continue
        spilled = row.spill_st or row.spill_ld
        allowed = [why for pat, why in r.spill_ok if re.search(pat, row.kernel)]
        if spilled and r.streaming and not allowed:
            bad.append(f"{where}: spills {row.spill_st}/{row.spill_ld} B in a streaming kernel")
        if row.occupancy + 1e-9 < r.min_occupancy:
            bad.append(f"{where}: occupancy {row.occupancy:.1%} < {r.min_occupancy:.1%} "
                       f"({row.regs} regs, {row.smem} B smem): {r.why}")
        if r.vld16 and row.vld16 == 0:
            bad.append(f"{where}: no 16-byte global loads in the PTX")
        if r.vst16 and row.vst16 == 0:
            bad.append(f"{where}: no 16-byte global stores in the PTX")
    return bad


# ----------------------------------------------------------------------------- table
def markdown(rows):
    lines = ["# Static GPU resources of the CUDA kernels", "",
             "Generated by `python tests/gpu/static_resources.py --write` (nvcc "
             f"{_nvcc_version()}, `-Xptxas -v`, device code only); checked by "
             "`tests/compile/test_gpu_static_resources.py`. Occupancy: theoretical, 256 threads/block, "
             "from registers and static shared memory. v16 ld/st: 16-byte global accesses in "
             "the PTX (of all global loads/stores). Nothing here ran on a GPU.", "",
             "| kernel | arch | regs | stack | spill st/ld (B) | smem (B) | occupancy | "
             "v16 ld / all | v16 st / all | min occ. | streaming |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.source, r.family, r.kernel, r.arch)):
        rule = rule_for(r)
        lines.append(
            f"| `{r.kernel}` | sm_{r.arch} | {r.regs} | {r.stack} | {r.spill_st}/{r.spill_ld} | "
            f"{r.smem} | {r.occupancy:.1%} | {r.vld16}/{r.ld} | {r.vst16}/{r.st} | "
            f"{'' if rule is None else f'{rule.min_occupancy:.1%}'} | "
            f"{'' if rule is None else ('yes' if rule.streaming else 'no')} |")
    lines += ["", "## Rules (tests/gpu/static_resources.py RULES)", ""]
    for rule in RULES:
        lines.append(f"* `{rule.pattern}`: occupancy >= {rule.min_occupancy:.1%} ({rule.why})"
                     + ("; streaming: no spills" if rule.streaming else "")
                     + ("; 16-byte loads" if rule.vld16 else "")
                     + ("; 16-byte stores" if rule.vst16 else "")
                     + "".join(f"; may spill `{p}`: {w}" for p, w in rule.spill_ok))
    return "\n".join(lines) + "\n"


def _nvcc_version():
    nvcc = find_nvcc()
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help=f"rewrite {TABLE.relative_to(ROOT)}")
    ap.add_argument("--jobs", type=int, default=None)
    args = ap.parse_args(argv)
    rows = cuda_rows(args.jobs) + triton_rows()
    text = markdown(rows)
    print(text)
    if args.write:
        TABLE.write_text(text)
    bad = violations(rows)
    for b in bad:
        print("VIOLATION:", b, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
