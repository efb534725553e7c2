"""Static resource gate of the CUDA kernels, without a GPU (tests/gpu/static_resources.py).

Compiles every csrc/cuda/*.cu device-only for sm_80 and sm_90 with `-Xptxas -v --keep` (cached
under build/gpu_static/ by a hash of every input: about 20 s per file and arch cold on 2 cores,
a parse warm) and checks each kernel instantiation against its rule in static_resources.RULES:
theoretical occupancy at 256 threads not below the bound written beside the kernel family (with
its reason), no register spills in streaming kernels (known-cold exceptions listed with the
reason), and 16-byte global loads / stores in the PTX of the kernels that must move their data
as vectors. Also: the committed table benchmarks/results/gpu_static.md is what the current
sources give (regenerate: `python tests/gpu/static_resources.py --write`), and the checks fail
on seeded violations (a spilling, a low-occupancy and a scalar row).
"""
import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
import static_resources as sr  # noqa: E402


@pytest.fixture(scope="module")
def rows():
    if sr.find_nvcc() is None:
        pytest.skip("nvcc not found: cannot compile csrc/cuda for the static resource table")
    try:
        import torch.utils.cpp_extension  # noqa: F401
    except ImportError as e:
        pytest.skip(f"torch headers unavailable: {e}")
    return sr.cuda_rows()


def test_every_kernel_compiled_for_both_archs(rows):
    by_arch = {a: {r.kernel for r in rows if r.arch == a} for a in sr.ARCHS}
    assert by_arch["80"] == by_arch["90"] and by_arch["90"]
    families = {r.family for r in rows}
    assert {"up2_fwd_kernel", "up2_bwd_plane_kernel", "up2_bwd_nhwc_kernel", "mix_kernel",
            "gram_kernel", "sum_partials_kernel"} <= families


def test_resources_within_rules(rows):
    bad = sr.violations(rows)
    assert not bad, "\n".join(bad)


def test_int64_instantiations_store_16_byte_vectors(rows):
    """Audit F5: the 64-bit index kernels keep their 16-byte stores (nvcc used to split them)."""
    for r in rows:
        rule = sr.rule_for(r)
        if ", i64," in r.kernel and rule is not None and rule.vst16:
            assert r.vst16 > 0, f"{r.kernel} sm_{r.arch}: no 16-byte stores"


def test_committed_table_is_current(rows):
    want = sr.markdown(rows)
    got = sr.TABLE.read_text() if sr.TABLE.exists() else ""
    if f"(nvcc {sr._nvcc_version()}," not in got:  # another toolkit gives other numbers
        pytest.skip(f"the committed table is from another nvcc than {sr._nvcc_version()}")
    assert got == want, (f"{sr.TABLE.relative_to(sr.ROOT)} is stale: regenerate with "
                         f"`python tests/gpu/static_resources.py --write`")


def test_checks_catch_seeded_violations(rows):
    """The gate can fail: a spill, an occupancy drop and a scalar-only row are each reported."""
    base = next(r for r in rows if r.kernel.startswith("up2_fwd_kernel<bf16, i32, 8, true>"))
    assert sr.violations([base]) == []
    spill = dataclasses.replace(base, spill_st=8, spill_ld=8)
    low = dataclasses.replace(base, regs=255)
    scalar = dataclasses.replace(base, vst16=0)
    unknown = dataclasses.replace(base, kernel="new_kernel<float>")
    assert any("spills" in v for v in sr.violations([spill]))
    assert any("occupancy" in v for v in sr.violations([low]))
    assert any("16-byte global stores" in v for v in sr.violations([scalar]))
    assert any("no rule" in v for v in sr.violations([unknown]))


def test_occupancy_model():
    """Known points of the CUDA occupancy calculator at 256 threads."""
    assert sr.occupancy(32, 0, 256, "90") == 1.0
    assert sr.occupancy(64, 0, 256, "90") == 0.5
    assert sr.occupancy(80, 0, 256, "90") == 0.375
    assert sr.occupancy(81, 0, 256, "90") == 0.25   # 88 allocated: 23 warps -> 2 blocks
    assert sr.occupancy(128, 0, 256, "80") == 0.25
    assert sr.occupancy(255, 0, 256, "80") == 0.125
    assert sr.occupancy(32, 48 * 1024, 256, "80") == 3 * 8 / 64  # 164 KiB / 49 KiB
    assert sr.occupancy(32, 48 * 1024, 256, "90") == 4 * 8 / 64  # 228 KiB / 49 KiB


def test_parsers_on_fixed_text():
    ptxas = ("ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'\n"
             "ptxas info    : Function properties for _Z1kPf\n"
             "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
             "ptxas info    : Used 40 registers, used 1 barriers, 8704 bytes smem, 368 bytes cmem[0]\n")
    assert sr.parse_ptxas(ptxas) == [("_Z1kPf", 40, 8, 4, 12, 8704)]
    ptx = (".entry _Z1kPf(\n.param .u64 p)\n{\n ld.global.v4.u32 {%r1,%r2,%r3,%r4}, [%rd1];\n"
           " ld.global.nc.v2.f64 {%fd1,%fd2}, [%rd2];\n ld.global.u16 %rs1, [%rd3];\n"
           " st.global.v4.f32 [%rd4], {%f1,%f2,%f3,%f4};\n st.global.v2.f32 [%rd5], {%f1,%f2};\n}\n")
    (row,) = sr.rows_from("x.cu", "90", ptxas, ptx)
    assert (row.kernel, row.vld16, row.ld, row.vst16, row.st) == ("k", 2, 3, 1, 2)
