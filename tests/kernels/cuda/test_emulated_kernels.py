"""csrc/cuda's kernels and op bodies, run on the CPU through the host emulation (tests/cuda_emu):
the same source nvcc compiles, with blocks as std::threads, real barriers and warp shuffles.

Each op is checked against its float64 contract (csrc/ops.cpp) over dtypes, layouts (contiguous,
channels_last, strided, storage offset 1, expanded grad_out, grad_out in another layout than the
inputs), odd sizes, and every launch path; the emulation logs each launch by kernel
instantiation, and the tests assert which ones ran (plane / nhwc, vector widths, int32 / int64,
coarse-only backward, gram and channel-mix tiles, multi-chunk partials). The vector flags come
from the ops' own plan functions (litefpn_emu::_up2_*_plan).
"""
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: the cuda_emu package
from cuda_emu import build as emu_build  # noqa: E402
from cuda_emu import cases  # noqa: E402
from cuda_emu.cases import DTYPES, F64, KINDS  # noqa: E402

T_NAME = {torch.float64: "double", torch.float32: "float", torch.float16: "c10::Half",
          torch.bfloat16: "c10::BFloat16"}


@pytest.fixture(scope="module", autouse=True)
def emu():
    torch.ops.load_library(str(emu_build.build("plain")))
    yield torch.ops.litefpn_emu
    torch.ops.litefpn_emu._force_int64(False)


def vec_width(dtype):
    return 16 // torch.empty((), dtype=dtype).element_size()


def kernels(launches):
    """{instantiation: [blocks, ...]} without the namespace."""
    out = {}
    for entry in launches:
        name, blocks = entry.rsplit("@", 1)
        out.setdefault(name.replace("litefpn::cuda::{anonymous}::", ""), []).append(int(blocks))
    return out


def kname(kernel, dtype, idx64, *params):
    args = ", ".join([T_NAME[dtype], "long int" if idx64 else "int", *map(str, params)])
    return f"{kernel}<{args}>"


# ----------------------------------------------------------------------------- schemas
def test_schemas_match_ops_cpp(emu):
    """The emulated ops carry csrc/ops.cpp's schemas (copied into tests/cuda_emu/*_emu.cpp)."""
    try:
        import litefpn_kernels._C  # noqa: F401  (registers the litefpn schemas)
    except ImportError as e:
        pytest.skip(f"litefpn_kernels._C is not built: {e}")
    for name in ("_up2_fuse_fwd", "_up2_fuse_bwd", "_up2_fuse_bwd_coarse", "_lateral_gram",
                 "_lateral_up2_fuse_fwd", "_lateral_grad_z", "_bn_silu_stats", "_bn_silu_fwd",
                 "_bn_silu_bwd_sums", "_bn_silu_bwd"):
        want = str(getattr(torch.ops.litefpn, name).default._schema)
        got = str(getattr(emu, name).default._schema)
        assert got.replace("litefpn_emu::", "litefpn::") == want


# ----------------------------------------------------------------------------- up2_fuse fwd
def fwd_path_cases(dtype):
    """(shape, kind, expected plan [nhwc, G, vec_coarse, vec_fine, vec_out], kernel params)."""
    V = vec_width(dtype)
    wv = max(V // 2, 1)  # 2W % V == 0
    cases_ = [
        ((2, 3, 3, wv), "contiguous", [0, V, 0, 1, 1], (V, "false")),
        ((2, 3, 3, wv), "offset", [0, V, 0, 0, 1], (V, "false")),          # misaligned fine
        ((2, 2 * V, 2, 3), "channels_last", [1, V, 1, 1, 1], (V, "true")),
        ((2, 2 * V, 2, 3), "channels_last_offset", [1, V, 0, 0, 1], (V, "true")),
        # channels_last with C not a multiple of V: nhwc, one channel per thread (F10a)
        ((1, 3, 2, 3), "channels_last", [1, 1, 0, 0, 0], (1, "true")),
        ((2, V + 1, 3, 2), "channels_last_offset", [1, 1, 0, 0, 0], (1, "true")),
        ((2, 5, 1, 1), "strided", [0, 2, 0, 0, 1], (2, "false")),
    ]
    if V > 2:  # 2W % V != 0: pairs
        cases_.append(((2, 3, 4, 3), "contiguous", [0, 2, 0, 1, 1], (2, "false")))
    return cases_


@pytest.mark.parametrize("idx64", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_up2_fwd_paths(emu, dtype, idx64):
    emu._force_int64(idx64)
    try:
        for i, (shape, kind, plan, params) in enumerate(fwd_path_cases(dtype)):
            n, c, h, w = shape
            probe = cases.layout(torch.zeros(n, c, h, w, dtype=dtype), kind)
            probe_f = cases.layout(torch.zeros(n, c, 2 * h, 2 * w, dtype=dtype), kind)
            assert emu._up2_fwd_plan(probe, probe_f) == plan, (shape, kind)
            launches = kernels(cases.check_up2_fwd(shape, dtype, kind, seed=i))
            assert list(launches) == [kname("up2_fwd_kernel", dtype, idx64, *params)], (shape, kind)
    finally:
        emu._force_int64(False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_up2_fwd_matches_eager(emu, dtype, kind):
    shapes = [(2, 3, 4, 5), (1, 2, 1, 1), (2, 4, 3, 1), (1, 3, 1, 6), (2, 16, 7, 3)]
    options = ((False, False), (True, False), (False, True), (True, True))
    for i, shape in enumerate(shapes):
        cases.check_up2_fwd(shape, dtype, kind, *options[i % len(options)], seed=i)


def test_up2_fwd_many_blocks(emu):
    """More groups than one block of threads: grid-stride loop over several blocks."""
    launches = kernels(cases.check_up2_fwd((2, 4, 9, 20), torch.float32, "contiguous"))
    (blocks,) = launches[kname("up2_fwd_kernel", torch.float32, False, 4, "false")]
    assert blocks > 1


# ----------------------------------------------------------------------------- up2_fuse bwd
def bwd_path_cases(dtype):
    """(shape, kind, grad_kind, plan [nhwc, GC, vec_g, vec_coarse, vec_gc, vec_fine, vec_gf,
    nchunks], kernel params without WITH_FINE, partial chunks summed by a second kernel)."""
    V = vec_width(dtype)
    gcv = max(V // 2, 1)
    g3 = gcv if 3 % gcv == 0 else 1  # the plane group width for W = 3
    v = int(gcv > 1)  # coarse-side vectors need groups of 2 or more
    cases_ = [
        ((2, 3, 3, gcv), "contiguous", None, [0, gcv, 1, v, v, 1, 1, 1], ("up2_bwd_plane_kernel", gcv)),
        ((2, 3, 3, gcv), "offset", "contiguous", [0, gcv, 1, 0, v, 0, 1, 1], ("up2_bwd_plane_kernel", gcv)),
        ((2, 2 * V, 2, 3), "channels_last", None, [1, V, 1, 1, 1, 1, 1, 1], ("up2_bwd_nhwc_kernel", V)),
        # grad_out in another layout than the inputs: the path follows grad_fine (= fine's layout)
        ((2, 2 * V, 2, 3), "channels_last", "contiguous", [1, V, 0, 1, 1, 1, 1, 1], ("up2_bwd_nhwc_kernel", V)),
        ((2, 2 * V, 2, 3), "contiguous", "channels_last", [0, g3, 0, int(g3 > 1), int(g3 > 1), 1, 1, 1],
         ("up2_bwd_plane_kernel", g3)),
        ((2, 2 * V, 2, 3), "channels_last", "expand_all", [1, V, 0, 1, 1, 1, 1, 1], ("up2_bwd_nhwc_kernel", V)),
        ((1, 3, 2, 1), "contiguous", "expand_hw", [0, 1, 0, 0, 0, 1, 1, 1],
         ("up2_bwd_plane_kernel", 1)),
        # channels_last with C not a multiple of V: nhwc, one channel per thread (F10a)
        ((1, 3, 2, 3), "channels_last", None, [1, 1, 0, 0, 0, 0, 0, 1], ("up2_bwd_nhwc_kernel", 1)),
        ((1, 33, 19, 19), "channels_last", "expand_hw", None, ("up2_bwd_nhwc_kernel", 1)),  # 2 chunks
        # several chunks per (n, c) plane / per sample: partials + the fixed-order second stage
        ((1, 2, 9, 64), "contiguous", None, None, ("up2_bwd_plane_kernel", gcv)),
        ((1, 32 * V, 5, 7), "channels_last", None, None, ("up2_bwd_nhwc_kernel", V)),
        ((1, 3 * V, 19, 19), "channels_last", "strided", None, ("up2_bwd_nhwc_kernel", V)),  # ctile 3
    ]
    return cases_


@pytest.mark.parametrize("idx64", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_up2_bwd_paths(emu, dtype, idx64):
    emu._force_int64(idx64)
    try:
        for i, (shape, kind, grad_kind, plan, (kernel, g)) in enumerate(bwd_path_cases(dtype)):
            n, c, h, w = shape
            fshape = (n, c, 2 * h, 2 * w)
            probe_c = cases.layout(torch.zeros(shape, dtype=dtype), kind)
            probe_f = cases.layout(torch.zeros(fshape, dtype=dtype), kind)
            gk = grad_kind or kind
            probe_g = cases.grad_like(fshape, dtype, gk, torch.Generator().manual_seed(0))
            got = emu._up2_bwd_plan(probe_g, probe_c, probe_f)
            if plan is not None:
                assert got == plan, (shape, kind, grad_kind)
            nchunks = got[-1]
            for need_sums in (True, False):
                launches = kernels(cases.check_up2_bwd(shape, dtype, kind, grad_kind,
                                                       need_sums=need_sums, seed=i))
                want = [kname(kernel, dtype, idx64, g, "true")]
                if need_sums and nchunks > 1:
                    acc = "double" if dtype == F64 else "float"
                    want += [f"sum_partials_kernel<{acc}>"]
                assert list(launches) == want, (shape, kind, grad_kind, need_sums)
                if len(want) > 1:
                    assert len(launches[want[1]]) == 2  # sum_coarse and sum_fine
            if plan is None:
                assert nchunks > 1, (shape, kind)
    finally:
        emu._force_int64(False)


@pytest.mark.parametrize("idx64", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_up2_bwd_coarse_paths(emu, dtype, idx64):
    """The coarse-only backward: the path follows grad_out's layout (there is no grad_fine)."""
    V = vec_width(dtype)
    gcv = max(V // 2, 1)
    emu._force_int64(idx64)
    try:
        for i, (shape, kind, grad_kind, kernel, g) in enumerate([
                ((2, 3, 3, 2 * gcv), "contiguous", None, "up2_bwd_plane_kernel", gcv),
                ((2, 3, 3, 3), "strided", None, "up2_bwd_plane_kernel", 1 if 3 % gcv else gcv),
                ((2, 2 * V, 2, 3), "channels_last", None, "up2_bwd_nhwc_kernel", V),
                ((2, 2 * V, 2, 3), "contiguous", "channels_last", "up2_bwd_nhwc_kernel", V),
                ((2, 2 * V, 2, 3), "channels_last", "contiguous", "up2_bwd_plane_kernel",
                 1 if 3 % gcv else gcv),
                ((1, 4, 1, 1), "offset", "expand_all", "up2_bwd_plane_kernel", 1),
                ((1, 5, 2, 3), "contiguous", "channels_last", "up2_bwd_nhwc_kernel", 1),  # F10a
                ((1, 2, 9, 64), "contiguous", None, "up2_bwd_plane_kernel", gcv)]):
            n, c, h, w = shape
            probe_g = cases.grad_like((n, c, 2 * h, 2 * w), dtype, grad_kind or kind,
                                      torch.Generator().manual_seed(0))
            nchunks = emu._up2_bwd_plan(probe_g, cases.layout(torch.zeros(shape, dtype=dtype), kind),
                                        None)[-1]
            assert (nchunks > 1) == (h == 9), shape  # the last case covers the partials
            for need_sum in (True, False):
                launches = kernels(cases.check_up2_bwd_coarse(shape, dtype, kind, grad_kind,
                                                              need_sum=need_sum, seed=i))
                want = [kname(kernel, dtype, idx64, g, "false")]
                if need_sum and nchunks > 1:
                    want += [f"sum_partials_kernel<{'double' if dtype == F64 else 'float'}>"]
                assert list(launches) == want, (shape, kind, grad_kind)
    finally:
        emu._force_int64(False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_up2_bwd_matches_eager(emu, dtype, kind):
    shapes = [(2, 3, 4, 5), (1, 2, 1, 1), (2, 4, 3, 1), (1, 3, 1, 6), (2, 16, 7, 3)]
    grads = [None, "contiguous", "channels_last", "expand_hw", "expand_all"]
    options = ((False, False), (True, False), (True, True))
    for i, shape in enumerate(shapes):
        gk, opt = grads[i % len(grads)], options[i % len(options)]
        cases.check_up2_bwd(shape, dtype, kind, gk, *opt, seed=i)
        cases.check_up2_bwd_coarse(shape, dtype, kind, gk, *opt, seed=i)


def test_up2_bwd_sums_are_deterministic(emu):
    """The multi-chunk sums are bitwise the same run to run (no atomics, fixed order)."""
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(1, 128, 5, 7, generator=gen).contiguous(memory_format=torch.channels_last)
    f = torch.randn(1, 128, 10, 14, generator=gen).contiguous(memory_format=torch.channels_last)
    g = torch.randn(1, 128, 10, 14, generator=gen)
    w = torch.tensor([0.3]), torch.tensor([-0.2])
    r1 = emu._up2_fuse_bwd(g, c, f, *w, None, None, 1e-4, True)
    r2 = emu._up2_fuse_bwd(g, c, f, *w, None, None, 1e-4, True)
    assert all(torch.equal(x, y) for x, y in zip(r1, r2))


# ----------------------------------------------------------------------------- lateral
LAYOUT_PAIRS = [("contiguous", "contiguous"), ("channels_last", "channels_last"),
                ("strided", "offset"), ("contiguous", "channels_last"),
                ("channels_last_offset", "strided")]


@pytest.mark.parametrize("idx64", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lateral_gram_paths(emu, dtype, idx64):
    acc = "double" if dtype == F64 else "float"
    emu._force_int64(idx64)
    try:
        # (n, Ca, Cb, (h, w)), (a tile, b tile), chunks, tile pairs per (n, chunk), a's own gram
        for i, ((n, ca, cb, hw), tiles, chunks, pairs, itself) in enumerate([
                ((2, 5, 3, (3, 1)), (32, 32), 1, 1, False),
                ((1, 33, 7, (2, 3)), (64, 32), 1, 1, False),
                ((1, 7, 70, (1, 2)), (64, 64), 1, 2, False),
                ((2, 6, 17, (24, 25)), (32, 32), 2, 1, False),
                ((1, 40, 3, (1, 600)), (64, 32), 2, 1, False),
                ((1, 130, 40, (2, 3)), (64, 64), 1, 3, False),
                ((2, 130, 130, (2, 3)), (64, 64), 1, 6, True),    # 3 x 3 tiles: 6 on / above
                ((1, 70, 70, (24, 25)), (64, 64), 2, 3, True),    # the diagonal
                ((1, 20, 20, (3, 5)), (32, 32), 1, 1, True)]):
            for kinds in LAYOUT_PAIRS[i % 2::2]:
                launches = kernels(cases.check_gram(n, ca, cb, hw, dtype, kinds, seed=i,
                                                    itself=itself))
                names = list(launches)
                assert names[0] == kname("gram_kernel", dtype, idx64, *tiles), (n, ca, cb, hw)
                assert launches[names[0]] == [n * chunks * pairs]
                if chunks > 1:  # gram and colsum partials, summed in chunk order
                    assert names[1:] == [f"sum_partials_kernel<{acc}>"]
                    assert len(launches[names[1]]) == 2
                else:
                    assert names[1:] == []
    finally:
        emu._force_int64(False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kinds", LAYOUT_PAIRS, ids="-".join)
def test_lateral_gram_matches_eager(emu, dtype, kinds):
    for i, (n, ca, cb, hw) in enumerate([(2, 3, 5, (1, 3)), (1, 1, 1, (1, 1)), (2, 13, 6, (4, 5))]):
        for centers in (False, True):
            cases.check_gram(n, ca, cb, hw, dtype, kinds, centers, seed=i)


@pytest.mark.parametrize("idx64", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lateral_fwd_paths(emu, dtype, idx64):
    """The channel mix with the fuse epilogue (BM 64): channel tiles, pixel tiles, K slices."""
    emu._force_int64(idx64)
    try:
        for i, (n, cin, c, hw) in enumerate([(2, 3, 5, (1, 3)), (1, 20, 70, (3, 5)),
                                             (1, 17, 1, (1, 1)), (2, 33, 9, (5, 7))]):
            for kinds in LAYOUT_PAIRS[i % 2::2]:
                launches = kernels(cases.check_lateral_fwd(n, cin, c, hw, dtype, kinds, seed=i))
                name = kname("mix_kernel", dtype, idx64, 64, f"FuseEpilogue<{T_NAME[dtype]}> ")
                assert list(launches) == [name]
                tiles = n * -(-c // 64) * -(-(4 * hw[0] * hw[1]) // 64)
                assert launches[name] == [tiles]
    finally:
        emu._force_int64(False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kinds", LAYOUT_PAIRS, ids="-".join)
def test_lateral_fwd_matches_eager(emu, dtype, kinds):
    # (3, 4): 2W = 8, whole 16-byte pixel groups along W for every dtype (vector epilogue)
    for i, (n, cin, c, hw) in enumerate([(2, 3, 5, (1, 3)), (1, 4, 7, (3, 1)), (2, 17, 16, (3, 5)),
                                         (1, 5, 9, (3, 4)), (1, 6, 24, (1, 4))]):
        for weighted, gates in ((False, False), (True, False), (True, True)):
            cases.check_lateral_fwd(n, cin, c, hw, dtype, kinds, weighted, gates, seed=i)


@pytest.mark.parametrize("idx64", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lateral_grad_z_paths(emu, dtype, idx64):
    """BM 32 for C_in <= 32, else 64; one segment, or two with quad; grad_out in any layout."""
    emu._force_int64(idx64)
    try:
        for i, ((n, cin, c, hw), bm) in enumerate([((2, 3, 5, (1, 3)), 32), ((1, 32, 20, (3, 5)), 32),
                                                   ((1, 40, 7, (2, 9)), 64), ((2, 70, 33, (9, 8)), 64)]):
            for j, kinds in enumerate(LAYOUT_PAIRS[i % 2::2] + [("expand_hw", "contiguous")]):
                quad = (i + j) % 2 == 0
                launches = kernels(cases.check_grad_z(n, cin, c, hw, dtype, kinds, scale=j % 2 == 0,
                                                      quad=quad, shift=not quad, seed=i))
                name = kname("mix_kernel", dtype, idx64, bm, f"ShiftEpilogue<{T_NAME[dtype]}> ")
                assert list(launches) == [name]
                assert launches[name] == [n * -(-cin // bm) * -(-(hw[0] * hw[1]) // 64)]
    finally:
        emu._force_int64(False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kinds", LAYOUT_PAIRS + [("expand_all", "channels_last")], ids="-".join)
def test_lateral_grad_z_matches_eager(emu, dtype, kinds):
    for i, (n, cin, c, hw) in enumerate([(2, 3, 5, (1, 3)), (1, 4, 7, (3, 1)), (2, 17, 16, (3, 5)),
                                         (1, 16, 5, (2, 8)), (1, 9, 3, (3, 8))]):
        for scale, quad, shift in ((False, False, False), (True, True, True), (True, False, True)):
            cases.check_grad_z(n, cin, c, hw, dtype, kinds, scale, quad, shift, seed=i)


# ----------------------------------------------------------------------------- bn_silu
def bn_path_cases(dtype):
    """(shape, kind, grad_kind, elementwise (G, NHWC), sums kernel, sums G, chunks per sample)."""
    V = vec_width(dtype)
    return [
        ((2, 3, 3, 2 * V), "contiguous", None, (V, "false"), "bn_sums_plane_kernel", V, 1),
        ((2, 3, 3, 2 * V + 1), "contiguous", "expand_all", (1, "false"), "bn_sums_plane_kernel", 1, 1),
        ((1, 2, 80, 32 * V), "offset", "channels_last", (V, "false"), "bn_sums_plane_kernel", V, 2),
        ((2, 2 * V, 3, 5), "channels_last", "expand_hw", (V, "true"), "bn_sums_nhwc_kernel", V, 1),
        ((1, 2 * V, 40, 30), "channels_last_offset", None, (V, "true"), "bn_sums_nhwc_kernel", V, 2),
        ((1, 33, 9, 9), "channels_last", "strided", (1, "true"), "bn_sums_nhwc_kernel", 1, 2),
        # strided x: contiguous outputs (plane), sums along x's layout (no unit stride: plane)
        ((2, 5, 3, V), "strided", None, (V, "false"), "bn_sums_plane_kernel", V, 1),
    ]


@pytest.mark.parametrize("idx64", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_silu_paths(emu, dtype, idx64):
    """Elementwise ops follow the output's layout, sums x's; 16-byte groups where C / W allow,
    else one element per thread; per-unit partials always summed by the fixed-order stage."""
    acc = "double" if dtype == F64 else "float"
    emu._force_int64(idx64)
    try:
        for i, (shape, kind, gk, ew, sums, g, chunks) in enumerate(bn_path_cases(dtype)):
            launches = kernels(cases.check_bn_silu(shape, dtype, kind, gk, seed=i))
            n, c, h, w = shape
            if sums == "bn_sums_nhwc_kernel":
                cg = c // g
                units = n * chunks * -(-cg // min(cg, 32))
            else:
                units = n * c * chunks
            want = {kname(sums, dtype, idx64, 0, g): [units],
                    kname(sums, dtype, idx64, 2, g): [units],
                    kname("bn_ew_kernel", dtype, idx64, 1, *ew): [-(-n * c * h * w // ew[0] // 256)],
                    kname("bn_ew_kernel", dtype, idx64, 3, *ew): [-(-n * c * h * w // ew[0] // 256)],
                    f"sum_partials_kernel<{acc}>": [1, 1, 1, 1]}
            assert launches == want, (shape, kind, gk)
    finally:
        emu._force_int64(False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_silu_wide_sum_partials(emu, dtype):
    """N * chunks >= 128 partials per channel: stage two runs a block per channel
    (sum_partials_wide_kernel, a fixed tree over the block's threads), still matching eager.
    channels_last: its first stage runs N blocks here, the plane path N * C (30 s emulated);
    stage two is the same call for both."""
    kind = "channels_last"
    acc = "double" if dtype == F64 else "float"
    n, c = 128, 2  # 128 partials per channel: the first count that takes the wide kernel
    launches = kernels(cases.check_bn_silu((n, c, 1, 2), dtype, kind, "contiguous", seed=7))
    assert launches[f"sum_partials_wide_kernel<{acc}>"] == [c] * 4
    assert f"sum_partials_kernel<{acc}>" not in launches
    launches = kernels(cases.check_bn_silu((n - 1, c, 1, 2), dtype, kind, None, seed=8))
    assert launches[f"sum_partials_kernel<{acc}>"] == [1] * 4  # 127 partials: a thread each


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_bn_silu_matches_eager(emu, dtype, kind):
    shapes = [(2, 3, 4, 5), (1, 1, 1, 1), (2, 4, 3, 1), (1, 16, 1, 6), (3, 8, 7, 3)]
    grads = [None, "contiguous", "channels_last", "expand_hw", "expand_all"]
    for i, shape in enumerate(shapes):
        cases.check_bn_silu(shape, dtype, kind, grads[i % len(grads)], seed=i)


def test_bn_silu_centred_sums_large_mean(emu):
    """fp32 sums around the pilot stay accurate for data with a large mean (mean 1e3, unit
    spread): the kernels sum x - center, never x."""
    cases.check_bn_silu((2, 8, 33, 40), torch.float32, "channels_last", mean=1e3, seed=3)
    cases.check_bn_silu((2, 8, 33, 40), torch.float32, "contiguous", mean=1e3, seed=4)


def test_bn_silu_sums_are_deterministic(emu):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 40, 50, generator=gen).contiguous(memory_format=torch.channels_last)
    v = [torch.randn(24, generator=gen) for _ in range(3)]
    g = torch.randn(2, 24, 40, 50, generator=gen)
    for _ in range(2):
        r1 = (*emu._bn_silu_stats(x, v[0]), *emu._bn_silu_bwd_sums(g, x, v[1], v[2], v[0]))
        r2 = (*emu._bn_silu_stats(x, v[0]), *emu._bn_silu_bwd_sums(g, x, v[1], v[2], v[0]))
        assert all(torch.equal(a, b) for a, b in zip(r1, r2))
        x = x.contiguous()


def test_bn_silu_empty_and_errors(emu):
    emu._launches()
    v = torch.zeros(3)
    s1, s2 = emu._bn_silu_stats(torch.empty(0, 3, 2, 2), v)
    assert torch.equal(s1, torch.zeros(3)) and torch.equal(s2, torch.zeros(3))
    assert emu._bn_silu_fwd(torch.empty(2, 3, 0, 4), v, v).shape == (2, 3, 0, 4)
    assert emu._launches() == []
    x = torch.randn(1, 3, 2, 2)
    with pytest.raises(RuntimeError, match="scale must have shape"):
        emu._bn_silu_fwd(x, torch.ones(4), v)
    with pytest.raises(RuntimeError, match="center must have the accumulation dtype"):
        emu._bn_silu_stats(x, v.double())
    with pytest.raises(RuntimeError, match="grad_out must have x's shape"):
        emu._bn_silu_bwd(torch.randn(1, 3, 2, 3), x, v, v, v, v, v)
    assert emu._launches() == []


# ----------------------------------------------------------------------------- edges
def test_empty_inputs_launch_nothing(emu):
    emu._launches()
    e = torch.empty(0, 3, 2, 2)
    assert emu._up2_fuse_fwd(e, torch.empty(0, 3, 4, 4), None, None, None, None, 1e-4).shape == (0, 3, 4, 4)
    gc, gf, sc, sf = emu._up2_fuse_bwd(torch.empty(0, 3, 4, 4), e, torch.empty(0, 3, 4, 4),
                                       None, None, None, None, 1e-4, True)
    assert gc.shape == e.shape and sc.shape == (0, 3)
    gram, colsum = emu._lateral_gram(torch.randn(2, 3, 0, 4), torch.randn(2, 5, 0, 4), None, None)
    assert torch.equal(gram, torch.zeros(2, 3, 5)) and torch.equal(colsum, torch.zeros(2, 3))
    assert emu._launches() == []


def test_argument_errors_name_the_argument(emu):
    c, f = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 4, 4)
    with pytest.raises(RuntimeError, match="fine must be \\[N, C, 2H, 2W\\]"):
        emu._up2_fuse_fwd(c, torch.randn(1, 2, 4, 5), None, None, None, None, 1e-4)
    with pytest.raises(RuntimeError, match="fine has dtype"):
        emu._up2_fuse_fwd(c, f.double(), None, None, None, None, 1e-4)
    with pytest.raises(RuntimeError, match="w_coarse and w_fine must be given together"):
        emu._up2_fuse_fwd(c, f, torch.ones(1), None, None, None, 1e-4)
    with pytest.raises(RuntimeError, match="gate_coarse must have shape"):
        emu._up2_fuse_fwd(c, f, None, None, torch.ones(2), None, 1e-4)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        emu._lateral_up2_fuse_fwd(c, torch.randn(1, 3, 4, 4), torch.ones(2, 4), torch.ones(2),
                                  None, None, None, None, 1e-4)
    assert re.search("int", str(emu._launches())) is None  # nothing was launched
