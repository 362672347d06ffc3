"""The CUDA kernel's arithmetic, checked on the CPU.

csrc/msfast/gather.h holds what each CUDA thread computes (gather_item) and gather_plan.h the
descriptors and tables the CUDA launcher uploads. ``msfast._C._set_cpu_runner("gather")`` makes
CPU calls run that same code item by item, so these tests check the CUDA path's indexing, plane
groups and their partial tails, channel slices, affine and 32/64-bit index variants against the
reference on a machine without a GPU. ("gather64" forces the 64-bit index path that only tensors
past 2^31 elements would take on a GPU.) "tiles" and "tiles64" run the CUDA tiled path's code
(gather.h: TileJob; opt-in on CUDA) for the calls that fit it, the gather for the others.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import GRAD_TOL, fuzz_settings, make_input, randn, ref_pyramid, ref_upsample_concat, tol
from hypothesis import given
from hypothesis import strategies as st

import msfast
from msfast import _ops

pytestmark = pytest.mark.skipif(_ops._C is None, reason="msfast._C is not built")

PYRAMID_COMBOS = [
    ("bilinear", None, True), ("bilinear", None, False), ("bilinear", True, False),
    ("bicubic", None, True), ("bicubic", None, False), ("bicubic", True, False),
    ("nearest", None, None), ("nearest-exact", None, None), ("area", None, None),
]
CONCAT_COMBOS = [("bilinear", False), ("bilinear", True), ("bicubic", None), ("nearest", None),
                 ("nearest-exact", None)]
# N * C = 6, 10, 6, 16 planes: groups of 2 or 4 planes (gather.h's two item shapes), with and without a
# partial last group.
SHAPE = (2, 3, 17, 23)
SCALES = [1.0, 0.5, 1.7, 0.3]
FEATURES = [(5, 8, 13), (3, 4, 7), (8, 20, 48)]
SIZE = (21, 40)


@pytest.fixture(params=["gather", "gather64", "tiles", "tiles64"])
def runner(request):
    _ops._C._set_cpu_runner(request.param)
    try:
        yield request.param
    finally:
        _ops._C._set_cpu_runner("native")


_UNIQUE = itertools.count(1)


def test_tap_tables_are_built_once_per_key(runner, gen):
    """The gather path builds a call's tap tables once per key (msfast/gather_plan.h:
    gather_tables) and checks every later hit against a fresh build (tests/conftest.py)."""
    x = randn(gen, 2, 3, 19, 23)
    u = next(_UNIQUE) * 1e-3  # tables are kept across tests: keys no earlier call made
    kw = dict(scales=[1.0, 0.6, 1.9], mode="bicubic", mean=[0.1, 0.2, 0.3 + u], std=[1.5, 0.5, 2.0])
    first = msfast.pyramid(x, **kw)
    hits, misses = _ops._C._table_cache()
    again = msfast.pyramid(randn(gen, 2, 3, 19, 23), **kw)
    assert _ops._C._table_cache() == (hits + 1, misses)
    # tables depend on the axes, not on N or on the data: a batch of 5 hits too
    x5 = randn(gen, 5, 3, 19, 23)
    more = msfast.pyramid(x5, **kw)
    assert _ops._C._table_cache() == (hits + 2, misses)
    # anything they depend on is a new key: align_corners, the affine, the direction
    msfast.pyramid(x, **dict(kw, align_corners=True))
    msfast.pyramid(x, **dict(kw, mean=[0.1, 0.2, 0.4 + u]))
    assert _ops._C._table_cache() == (hits + 2, misses + 2)
    for got, inp in ((first, x), (more, x5)):
        for g, r in zip(got, ref_pyramid(inp, **kw)):
            torch.testing.assert_close(g, r, **tol(torch.float32, upscale=True))
    assert [t.shape for t in again] == [t.shape for t in first] and more[0].shape[0] == 5


def _native(fn):
    """fn() with the CPU kernels (the runner fixture restores its own runner only at teardown,
    so call this last)."""
    _ops._C._set_cpu_runner("native")
    return fn()


def _combo_kw(mode, ac, aa):
    kw = {"mode": mode}
    if ac is not None:
        kw["align_corners"] = ac
    if aa is not None:
        kw["antialias"] = aa
    return kw


def test_runner_names_are_checked():
    with pytest.raises(ValueError, match="cpu runner"):
        _ops._C._set_cpu_runner("gpu")


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nhwc_permuted"])
@pytest.mark.parametrize("combo", PYRAMID_COMBOS, ids=lambda c: "-".join(map(str, c)))
def test_pyramid_forward(combo, layout, runner, gen):
    x = make_input(gen, SHAPE, torch.float32, layout=layout)
    kw = _combo_kw(*combo)
    got = msfast.pyramid(x, SCALES, **kw)
    for g, r in zip(got, ref_pyramid(x, SCALES, **kw)):
        torch.testing.assert_close(g, r, **tol(torch.float32, upscale=True))
    if combo[0].startswith("nearest"):
        for g, r in zip(got, ref_pyramid(x, SCALES, **kw)):
            assert torch.equal(g, r)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16, torch.uint8], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_pyramid_dtypes_and_affine(dtype, layout, runner, gen):
    x = make_input(gen, (2, 3, 19, 26), dtype, layout=layout)
    kw = dict(mode="bilinear", antialias=True, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    got = msfast.pyramid(x, [1.0, 0.61, 0.25], **kw)
    out_dtype = torch.float32 if dtype == torch.uint8 else dtype
    for g, r in zip(got, ref_pyramid(x, [1.0, 0.61, 0.25], **kw)):
        assert g.dtype == out_dtype
        torch.testing.assert_close(g, r, **tol(out_dtype))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("combo", PYRAMID_COMBOS, ids=lambda c: "-".join(map(str, c)))
def test_pyramid_backward(combo, layout, runner, gen):
    x = make_input(gen, SHAPE, torch.float32, layout=layout).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    kw = _combo_kw(*combo)
    outs = msfast.pyramid(x, SCALES, **kw)
    gs = [randn(gen, *o.shape) for o in outs]
    torch.autograd.backward(outs, gs)
    torch.autograd.backward(ref_pyramid(xr, SCALES, **kw), gs)
    torch.testing.assert_close(x.grad, xr.grad, **GRAD_TOL)


def _check_concat_forward_backward(feats, size, gen, **kw):
    """upsample_concat of feats (which require grad) and its gradients, against the reference."""
    refs = [f.detach().clone().requires_grad_() for f in feats]
    out = msfast.upsample_concat(feats, size, **kw)
    ref = ref_upsample_concat(refs, size, **kw)
    torch.testing.assert_close(out, ref, **tol(torch.float32, upscale=True))
    g = randn(gen, *out.shape)
    out.backward(g)
    ref.backward(g)
    for f, r in zip(feats, refs):
        torch.testing.assert_close(f.grad, r.grad, **GRAD_TOL)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "mixed"])
@pytest.mark.parametrize("combo", CONCAT_COMBOS, ids=lambda c: "-".join(map(str, c)))
def test_upsample_concat_forward_backward(combo, layout, runner, gen):
    mode, ac = combo
    feats = []
    for i, (c, h, w) in enumerate(FEATURES):
        cl = layout == "channels_last" or (layout == "mixed" and i % 2 == 1)
        feats.append(randn(gen, 2, c, h, w, channels_last=cl, requires_grad=True))
    _check_concat_forward_backward(feats, SIZE, gen, mode=mode, align_corners=ac)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_upsample_concat_out_channel_slices(layout, runner, gen):
    """Into a preallocated out=: each feature lands in its channel slice (a strided view)."""
    cl = layout == "channels_last"
    feats = [randn(gen, 2, c, h, w, channels_last=cl) for c, h, w in FEATURES]
    out = torch.empty(2, sum(c for c, _, _ in FEATURES), *SIZE)
    if cl:
        out = out.contiguous(memory_format=torch.channels_last)
    msfast.upsample_concat(feats, SIZE, out=out)
    torch.testing.assert_close(out, ref_upsample_concat(feats, SIZE), **tol(torch.float32, upscale=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lane_strided_and_consecutive_chunks_in_one_call(dtype, runner, gen):
    """In a call of the general item shape (here: antialias downscales), NCHW planes that
    nearly fill chunks of 64 values run lane-strided (gather_plan.h: lane_strided), others in
    consecutive chunks; one call mixes them, so lane-strided jobs start after padding items.
    Levels: 40x44 (1760 values: lane-strided), 9x10, 31x33 (1023: lane-strided, one value
    short of whole chunks), 3x2, 13x15 (195: consecutive), with 7 planes (a partial group),
    forward and backward."""
    x = make_input(gen, (1, 7, 40, 44), dtype).requires_grad_()
    sizes = [(40, 44), (9, 10), (31, 33), (3, 2), (13, 15)]
    outs = msfast.pyramid(x, sizes=sizes, mode="bilinear", antialias=True)
    xr = x.detach().clone().requires_grad_()
    refs = ref_pyramid(xr, sizes=sizes, mode="bilinear", antialias=True)
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, **tol(dtype))
    gs = [randn(gen, *o.shape, dtype=dtype) for o in outs]
    torch.autograd.backward(outs, gs)
    torch.autograd.backward(refs, gs)
    torch.testing.assert_close(x.grad, xr.grad, **(GRAD_TOL if dtype == torch.float32 else tol(dtype)))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_upscale_shape_mixed_tap_counts(layout, runner, gen):
    """Calls whose terms have 1 or 2 taps per axis take the upscale item shape, with a kernel
    specialized for each of 1x1, 1x2, 2x1 and 2x2: a copy, an upscale of the width only, of
    the height only, of both, in one call (and their gradients, which take the general
    shape)."""
    cl = layout == "channels_last"
    feats = [randn(gen, 2, c, h, w, channels_last=cl, requires_grad=True)
             for c, h, w in [(3, 12, 20), (5, 12, 9), (6, 5, 20), (7, 6, 7)]]
    _check_concat_forward_backward(feats, (12, 20), gen)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_same_values_as_the_cpu_kernels(layout, runner, gen):
    """float64: the two code paths read the same tables; they agree to rounding."""
    x = make_input(gen, (2, 5, 31, 44), torch.float64, layout=layout)
    got = msfast.pyramid(x, [1.0, 0.7, 0.33], mode="bicubic", antialias=True)
    want = _native(lambda: msfast.pyramid(x, [1.0, 0.7, 0.33], mode="bicubic", antialias=True))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_empty_batch(runner):
    x = torch.randn(0, 3, 10, 12)
    assert [tuple(t.shape) for t in msfast.pyramid(x, [1.0, 0.5])] == [(0, 3, 10, 12), (0, 3, 5, 6)]
    assert msfast.upsample_concat([torch.randn(0, 2, 4, 4)], (8, 8)).shape == (0, 2, 8, 8)


# Calls that fit the tiled path (NCHW, every feature an upscale or a copy): fpn_concat's
# pattern; rows wider than a tile (128 columns: 3 tiles of 101, 101 and 99); a plane of 500
# rows of 5 (25 groups of 5 threads in one tile); upscales by 1.01, whose window would exceed
# 4096 values at 32 rows of 128 (the tiles shrink to 16 rows); the modes with 1 or 2 taps.
TILE_CASES = {
    "fpn": ([(3, 24, 24), (4, 12, 12), (5, 6, 6), (6, 3, 3)], (24, 24), {}),
    "wide": ([(2, 7, 150), (3, 20, 301)], (41, 301), {}),
    "tall": ([(2, 90, 3), (3, 500, 5)], (500, 5), {}),
    "near_copy": ([(2, 63, 255), (3, 64, 256)], (64, 256), {}),
    "align_corners": ([(3, 5, 7), (2, 11, 13)], (17, 19), {"align_corners": True}),
    "nearest": ([(3, 5, 7), (2, 11, 13)], (17, 19), {"mode": "nearest"}),
    "nearest-exact": ([(3, 5, 7), (2, 11, 13)], (17, 19), {"mode": "nearest-exact"}),
}


@pytest.mark.parametrize("bits", ["", "64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(TILE_CASES))
def test_tiled_path(case, dtype, bits, gen):
    """The tiled path's calls: bit for bit the gather's values (the same sums in the same
    order), close to the reference, written into out='s channel slices too."""
    spec, size, kw = TILE_CASES[case]
    feats = [randn(gen, 2, c, h, w, dtype=dtype) for c, h, w in spec]
    try:
        _ops._C._set_cpu_runner("tiles" + bits)
        before = _ops._C._tiled_calls()
        got = msfast.upsample_concat(feats, size, **kw)
        out = torch.full_like(got, float("nan"))
        msfast.upsample_concat(feats, size, out=out, **kw)
        assert _ops._C._tiled_calls() == before + 2
        _ops._C._set_cpu_runner("gather" + bits)
        want = msfast.upsample_concat(feats, size, **kw)
    finally:
        _ops._C._set_cpu_runner("native")
    assert torch.equal(got, want)
    assert torch.equal(out, want)
    # Sizes that do not divide (150 -> 301) put the float32 reference itself 3.4e-5 from the
    # float64 result: atol 5e-5 there.
    t = tol(dtype, upscale=True)
    if dtype == torch.float32:
        t["atol"] = max(t["atol"], 5e-5)
    torch.testing.assert_close(got, ref_upsample_concat(feats, size, **kw), **t)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=str)
def test_tiled_pyramid_with_affine(dtype, gen):
    """A pyramid of upscales and a copy fits the tiled path, with uint8 sources and the
    per-channel mean and std applied to each value."""
    x = make_input(gen, (2, 3, 13, 10), dtype)
    kw = dict(mode="bilinear", mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    scales = [1.0, 1.5, 2.25]
    try:
        _ops._C._set_cpu_runner("tiles")
        before = _ops._C._tiled_calls()
        got = msfast.pyramid(x, scales, **kw)
        assert _ops._C._tiled_calls() == before + 1
    finally:
        _ops._C._set_cpu_runner("native")
    for g, r in zip(got, ref_pyramid(x, scales, **kw)):
        torch.testing.assert_close(g, r, **tol(torch.float32, upscale=True))


@pytest.mark.parametrize("case", ["channels_last", "downscale", "two_terms"])
def test_calls_the_tiled_path_does_not_take(case, gen):
    """channels_last, a feature larger than the output, a backward that sums two levels: the
    gather runs them, with the right values."""
    try:
        _ops._C._set_cpu_runner("tiles")
        before = _ops._C._tiled_calls()
        if case == "two_terms":
            x = randn(gen, 2, 3, 8, 9, requires_grad=True)
            xr = x.detach().clone().requires_grad_()
            outs = msfast.pyramid(x, [1.0, 2.0], mode="nearest")
            gs = [randn(gen, *o.shape) for o in outs]
            torch.autograd.backward(outs, gs)
            torch.autograd.backward(ref_pyramid(xr, [1.0, 2.0], mode="nearest"), gs)
            torch.testing.assert_close(x.grad, xr.grad, **GRAD_TOL)
            assert _ops._C._tiled_calls() == before + 1  # the forward only
            return
        feats = [randn(gen, 2, 3, 5, 7, channels_last=case == "channels_last"),
                 randn(gen, 2, 4, 30 if case == "downscale" else 9, 11, channels_last=case == "channels_last")]
        got = msfast.upsample_concat(feats, (12, 14))
        assert _ops._C._tiled_calls() == before
    finally:
        _ops._C._set_cpu_runner("native")
    torch.testing.assert_close(got, ref_upsample_concat(feats, (12, 14)), **tol(torch.float32, upscale=True))


@st.composite
def _tiled_calls(draw):
    """An upsample_concat call the tiled path takes: NCHW features (some of them row slices of a
    wider tensor) no larger than the output, in a mode of 1 or 2 taps; outputs up to 300 wide
    (column tiles past 128) and 40 tall."""
    H, W = draw(st.integers(1, 40)), draw(st.integers(1, 300))
    feats = draw(st.lists(st.tuples(st.integers(1, 3), st.integers(1, H), st.integers(1, W), st.booleans()),
                          min_size=1, max_size=3))
    mode = draw(st.sampled_from(["bilinear", "nearest", "nearest-exact"]))
    align_corners = draw(st.sampled_from([None, False, True])) if mode == "bilinear" else None
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    return (H, W), feats, dict(mode=mode, align_corners=align_corners), dtype, draw(st.integers(0, 2**16))


@fuzz_settings(60)
@given(call=_tiled_calls())
def test_tiled_path_fuzzed(call):
    """Drawn sizes, slices, modes and dtypes: the tiled path runs and gives the gather's values
    bit for bit."""
    size, spec, kw, dtype, seed = call
    g = torch.Generator().manual_seed(seed)
    feats = []
    for c, h, w, sliced in spec:
        t = torch.randn(2, c, h, w + 3 if sliced else w, generator=g, dtype=torch.float64).to(dtype)
        feats.append(t[..., 2 : w + 2] if sliced else t)
    try:
        _ops._C._set_cpu_runner("tiles")
        before = _ops._C._tiled_calls()
        got = msfast.upsample_concat(feats, size, **kw)
        assert _ops._C._tiled_calls() == before + 1
        _ops._C._set_cpu_runner("gather")
        want = msfast.upsample_concat(feats, size, **kw)
    finally:
        _ops._C._set_cpu_runner("native")
    assert torch.equal(got, want)
