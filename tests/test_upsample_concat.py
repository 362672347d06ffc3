"""msfast.upsample_concat against the pure-PyTorch reference: values, layouts, out=, slicing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CONCAT_MODES,
    FLOAT_DTYPES,
    INTERPOLATING,
    is_channels_last,
    randn,
    ref_upsample_concat,
    resize_adjoint,
    tol,
)

import msfast

# (C, H, W) per feature: larger, smaller, equal to and 1x1 against the output sizes below;
# odd sizes throughout, and one asymmetric map.
FEATURES = [(3, 17, 23), (4, 9, 12), (2, 30, 41), (1, 1, 1), (5, 5, 40)]
SIZES = [(17, 23), (1, 1), (5, 40), 8, (31, 7)]


def _combos():
    combos = []
    for mode in CONCAT_MODES:
        acs = [None, False, True] if mode in INTERPOLATING else [None]
        combos += [(mode, ac) for ac in acs]
    return combos


COMBOS = _combos()


def _features(gen, dtype, device, layout, specs=FEATURES, N=2, requires_grad=False):
    feats = []
    for i, (c, h, w) in enumerate(specs):
        cl = layout == "channels_last" or (layout == "mixed" and i % 2 == 1)
        feats.append(randn(gen, N, c, h, w, dtype=dtype, device=device, channels_last=cl,
                           requires_grad=requires_grad))
    return feats


def _hw(size):
    return (size, size) if isinstance(size, int) else tuple(size)


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "mixed"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("mode,align_corners", COMBOS)
def test_parity(mode, align_corners, dtype, layout, size, device, gen):
    feats = _features(gen, dtype, device, layout)
    out = msfast.upsample_concat(feats, size, mode=mode, align_corners=align_corners)
    ref = ref_upsample_concat(feats, size, mode=mode, align_corners=align_corners)
    h, w = _hw(size)
    assert out.shape == (2, sum(c for c, _, _ in FEATURES), h, w)
    assert out.dtype == dtype and out.device == feats[0].device
    torch.testing.assert_close(out, ref, **tol(dtype, upscale=True))
    if h * w > 1:
        # channels_last exactly when features[0] is ("mixed" starts with an NCHW map).
        assert is_channels_last(out) == (layout == "channels_last")
        assert out.is_contiguous() == (layout != "channels_last")


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "mixed"])
def test_nearest_is_bitwise_exact_float32(mode, layout, device, gen):
    feats = _features(gen, torch.float32, device, layout)
    for size in SIZES:
        out = msfast.upsample_concat(feats, size, mode=mode)
        assert torch.equal(out, ref_upsample_concat(feats, size, mode=mode)), f"size {size}"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_nearest_exact_is_bitwise_exact_wide_output(layout, device, gen):
    """(20 + 0.5) * 2 / 41 == 1 exactly: row 20 of a 2 -> 41 resize must read input row 1 as in F.interpolate."""
    f = randn(gen, 1, 2, 2, 40, device=device, channels_last=layout == "channels_last")
    out = msfast.upsample_concat([f], (41, 99), mode="nearest-exact")
    ref = ref_upsample_concat([f], (41, 99), mode="nearest-exact")
    assert torch.equal(out, ref), f"{int((out != ref).sum())} of {out.numel()} values differ"


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "mixed"])
@pytest.mark.parametrize("mode,align_corners", COMBOS)
def test_channel_slices_equal_single_feature_interpolation(mode, align_corners, layout, device, gen):
    feats = _features(gen, torch.float64, device, layout)
    size = (13, 19)
    out = msfast.upsample_concat(feats, size, mode=mode, align_corners=align_corners)
    c0 = 0
    for i, f in enumerate(feats):
        alone = F.interpolate(f, size=size, mode=mode, align_corners=align_corners)
        torch.testing.assert_close(out[:, c0 : c0 + f.shape[1]], alone, **tol(torch.float64),
                                   msg=lambda m, i=i: f"features[{i}]: {m}")
        # ... and the same slice from msfast with that feature alone: the same bits where that
        # call runs in the concat's layout. (The 1-channel feature is plain contiguous, so alone
        # it runs NCHW, where its small planes are summed in another order: to rounding.)
        single = msfast.upsample_concat([f], size, mode=mode, align_corners=align_corners)
        exact = single.is_contiguous() == out.is_contiguous()
        torch.testing.assert_close(out[:, c0 : c0 + f.shape[1]], single,
                                   **({"rtol": 0, "atol": 0} if exact else tol(torch.float64)))
        c0 += f.shape[1]
    assert c0 == out.shape[1]


@pytest.mark.parametrize("out_layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("in_layout", ["nchw", "channels_last", "mixed"])
@pytest.mark.parametrize("mode,align_corners", [("bilinear", None), ("bicubic", True), ("nearest", None),
                                                ("nearest-exact", None)])
def test_out(mode, align_corners, in_layout, out_layout, device, gen):
    feats = _features(gen, torch.float32, device, in_layout)
    size = (11, 14)
    C = sum(f.shape[1] for f in feats)
    out = torch.full((2, C, *size), float("nan"), device=device)
    if out_layout == "channels_last":
        out = out.contiguous(memory_format=torch.channels_last)
    ptr, strides = out.data_ptr(), out.stride()
    res = msfast.upsample_concat(feats, size, mode=mode, align_corners=align_corners, out=out)
    assert res is out
    assert out.data_ptr() == ptr and out.stride() == strides  # written in place, layout kept
    ref = ref_upsample_concat(feats, size, mode=mode, align_corners=align_corners)
    torch.testing.assert_close(out, ref, **tol(torch.float32, upscale=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_out_other_dtypes(dtype, device, gen):
    feats = _features(gen, dtype, device, "nchw")
    out = torch.empty(2, sum(f.shape[1] for f in feats), 9, 10, dtype=dtype, device=device)
    assert msfast.upsample_concat(feats, (9, 10), out=out) is out
    torch.testing.assert_close(out, ref_upsample_concat(feats, (9, 10)), **tol(dtype, upscale=True))


def test_out_with_requires_grad_features_raises(device, gen):
    feats = _features(gen, torch.float32, device, "nchw", requires_grad=True)
    out = torch.empty(2, sum(f.shape[1] for f in feats), 9, 10, device=device)
    with pytest.raises(RuntimeError, match="out="):
        msfast.upsample_concat(feats, (9, 10), out=out)
    # Under no_grad the same call is allowed.
    with torch.no_grad():
        assert msfast.upsample_concat(feats, (9, 10), out=out) is out
    torch.testing.assert_close(out, ref_upsample_concat([f.detach() for f in feats], (9, 10)),
                               **tol(torch.float32, upscale=True))


def test_out_overlapping_a_feature_raises(device, gen):
    f = randn(gen, 2, 3, 5, 6, device=device)
    with pytest.raises(ValueError, match=r"out must not overlap the memory of features\[0\]"):
        msfast.upsample_concat([f], (5, 6), out=f)


def test_single_feature_identity_size(device, gen):
    f = randn(gen, 2, 3, 17, 23, device=device)
    for mode in CONCAT_MODES:
        out = msfast.upsample_concat([f], (17, 23), mode=mode)
        torch.testing.assert_close(out, f, rtol=0, atol=0)
        assert out.data_ptr() != f.data_ptr()


def test_features_tuple_and_duplicates(device, gen):
    f = randn(gen, 2, 3, 9, 11, device=device)
    g = randn(gen, 2, 1, 4, 4, device=device)
    out = msfast.upsample_concat((f, g, f), (7, 8))
    torch.testing.assert_close(out, ref_upsample_concat([f, g, f], (7, 8)), **tol(torch.float32, upscale=True))


def test_non_dense_features(device, gen):
    big = randn(gen, 2, 6, 18, 24, device=device)
    feats = [big[:, :, ::2, ::2], big.contiguous(memory_format=torch.channels_last)[:, 2:5],
             randn(gen, 2, 1, 1, 5, device=device).expand(2, 4, 6, 5)]
    for mode in CONCAT_MODES:
        out = msfast.upsample_concat(feats, (10, 13), mode=mode)
        torch.testing.assert_close(out, ref_upsample_concat(feats, (10, 13), mode=mode),
                                   **tol(torch.float32, upscale=True))


def test_empty_batch(device, gen):
    feats = [randn(gen, 0, 3, 5, 6, device=device), randn(gen, 0, 2, 7, 3, device=device)]
    out = msfast.upsample_concat(feats, (4, 4))
    assert out.shape == (0, 5, 4, 4)


def test_inputs_not_modified(device, gen):
    feats = _features(gen, torch.float32, device, "mixed")
    before = [f.clone() for f in feats]
    msfast.upsample_concat(feats, (9, 9), mode="bicubic")
    assert all(torch.equal(a, b) for a, b in zip(feats, before))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("specs", [[(16, 32, 32), (16, 16, 16), (16, 8, 8), (8, 4, 4)], [(8, 4, 4)], [(3, 5, 5)],
                                   [(16, 7, 7)]], ids=["fpn", "8x", "rgb", "odd"])
@pytest.mark.parametrize("values", ["normal", "nonfinite", "subnormal", "small"])
def test_bfloat16_rows_are_the_float32_rows_rounded(specs, channels_last, values, gen):
    """The CPU kernels compute bfloat16 rows in float32 and round once: a bfloat16 concat is,
    bit for bit, the float32 concat of the same (widened) features rounded to bfloat16, also
    where the features hold NaN, infinities and values near bfloat16's largest (the blends
    skip the rounding's NaN test on chunks they have checked to be finite), and where blends
    are subnormal (AVX-512 BF16's conversion flushes those to zero, so such chunks take the
    exact path). "small": values on both sides of 2^-56, under which a block of NCHW rows takes
    the checked blends instead of the unchecked ones (blend_inputs_safe), all results normal.
    Only the bits of NaNs may differ (msfast writes one canonical NaN)."""
    feats = _features(gen, torch.bfloat16, "cpu", "nchw", specs=specs)
    nonfinite = values == "nonfinite"
    if values == "subnormal":  # around float32's smallest normal (1.2e-38): some rows subnormal, some not
        feats = [(f * 2e-38).bfloat16() for f in feats]
        for f in feats[::2]:
            f[:, ::2] *= 1e5
    if values == "small":  # 2^-56 is 1.4e-17: every other channel below it
        feats = [(f * 1e-16).bfloat16() for f in feats]
        for f in feats:
            f[:, ::2] *= 1e-3
    if nonfinite:
        for f in feats:
            flat = f.view(-1)
            flat[::37], flat[5::41], flat[9::43], flat[11::29] = float("nan"), float("inf"), -float("inf"), 3e38
    if channels_last:
        feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    out = msfast.upsample_concat(feats, (32, 32))
    want = msfast.upsample_concat([f.float() for f in feats], (32, 32)).to(torch.bfloat16)
    nan = out.isnan()
    assert torch.equal(nan, want.isnan())
    assert nonfinite == bool(nan.any())
    assert torch.equal(out.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
    if values == "subnormal":
        tiny = (out != 0) & (out.abs() < torch.finfo(torch.float32).tiny)
        assert tiny.any() and (out.abs() >= torch.finfo(torch.float32).tiny).any()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("specs", [[(16, 32, 32), (16, 16, 16), (16, 8, 8), (8, 4, 4)], [(8, 4, 4)], [(3, 5, 5)],
                                   [(16, 7, 7)]], ids=["fpn", "8x", "rgb", "odd"])
@pytest.mark.parametrize("values", ["normal", "nonfinite", "subnormal", "large", "overflow"])
def test_float16_rows_are_the_float32_rows_rounded(specs, channels_last, values, gen):
    """float16 rows are computed in float32 and rounded once, 8 values at a time with vcvtps2ph
    on AVX2 machines (f16x8) and one at a time in the tails: a float16 concat is, bit for bit,
    the float32 concat of the widened features rounded by torch, also where blends are float16
    subnormals, near 65504 and past it (rounded to infinity; bicubic overshoot), and where features hold NaN and
    infinities (a chunk checked finite skips the NaN test). Resampled NaNs are msfast's
    canonical one (0x7E00 with the sign, as c10's conversion writes it), whichever path wrote
    them, also from inputs with payloads."""
    feats = _features(gen, torch.float16, "cpu", "nchw", specs=specs)
    if values == "subnormal":  # float16's smallest normal is 6.1e-5: most blends below it
        feats = [(f * 3e-5).half() for f in feats]
    mode = "bicubic" if values == "overflow" else "bilinear"
    if values == "overflow":  # steps of +-64000: bicubic overshoots past 65520, which rounds to infinity
        feats = [(f.sign() * 64000).half() for f in feats]
    if values == "large":  # bilinear blends up to float16's largest, 65504
        feats = [(65504 - f.abs() * 40).half() for f in feats]
    if values == "nonfinite":
        for f in feats:
            flat = f.view(-1)
            flat[::37], flat[5::41], flat[9::43], flat[11::29] = float("nan"), float("inf"), -float("inf"), 65504
            flat.view(torch.int16)[3::31] = 0x7D55  # NaNs with payloads: vcvtps2ph would keep them
            flat.view(torch.int16)[7::47] = -0x02AB  # 0xFD55
    if channels_last:
        feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    out = msfast.upsample_concat(feats, (32, 32), mode=mode)
    want = msfast.upsample_concat([f.float() for f in feats], (32, 32), mode=mode).half()
    nan = out.isnan()
    assert torch.equal(nan, want.isnan())
    assert (values == "nonfinite") == bool(nan.any())
    assert torch.equal(out.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
    resized = torch.cat([torch.full((f.shape[1],), f.shape[2:] != (32, 32)) for f in feats]).view(1, -1, 1, 1)
    nan_bits = out.view(torch.int16)[nan & resized]  # (a feature at the output size is copied, bits and all)
    assert (values == "nonfinite") == bool(nan_bits.numel())
    assert bool(((nan_bits & 0x7FFF) == 0x7E00).all())
    if values == "subnormal":
        assert ((out != 0) & (out.abs() < torch.finfo(torch.float16).tiny)).any()
    if values == "overflow":
        assert out.isinf().any()
    if values == "large":
        assert (out == 65504).any()


@pytest.mark.parametrize("channels_last", [False, True])
def test_bfloat16_rounding_of_nan_payloads(channels_last, gen):
    """float32 NaNs whose payload fills the low 16 bits (0x7FFFFFFF, 0xFFFF8001) overflow the
    rounding's bias into the sign bit unless it tests for NaN: upscaled into bfloat16 (a
    pyramid's upscale levels, out_dtype=bfloat16), they must stay NaN, and every other value
    must be the float32 result rounded."""
    x = randn(gen, 2, 16, 7, 7)
    bits = x.view(torch.int32).view(-1)
    bits[::13] = 0x7FFFFFFF
    bits[6::17] = -0x7FFF  # 0xFFFF8001
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    kw = dict(mode="bilinear")
    outs = msfast.pyramid(x, [2.0, 8.0], out_dtype=torch.bfloat16, **kw)
    wants = [o.to(torch.bfloat16) for o in msfast.pyramid(x, [2.0, 8.0], **kw)]
    for out, want in zip(outs, wants, strict=True):
        nan = out.isnan()
        assert nan.any()
        assert torch.equal(nan, want.isnan())
        assert torch.equal(out.view(torch.int16)[~nan], want.view(torch.int16)[~nan])


@pytest.mark.parametrize("where", ["contiguous", "channel_slice", "out"])
def test_copied_features_in_runs_of_planes(where, gen):
    """A feature already at the output size is copied whole planes at a time where they follow
    each other in the feature and in the output: 2400 planes in runs of 600 (one image's slice
    of the output), cut by the chunks that tasks take (the first ends inside a run). Copies
    are exact: the bits of the feature, on one thread and on two, into a new output or out=."""
    if where == "channel_slice":
        big = randn(gen, 4, 700, 4, 4)
        f = big[:, 50:650]
    else:
        f = randn(gen, 4, 600, 4, 4)
    small = randn(gen, 4, 600, 2, 2)
    n = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            if where == "out":
                outs.append(msfast.upsample_concat([f, small], (4, 4), out=torch.full((4, 1200, 4, 4), 7.0)))
            else:
                outs.append(msfast.upsample_concat([f, small], (4, 4)))
    finally:
        torch.set_num_threads(n)
    for out in outs:
        assert torch.equal(out[:, :600], f)
        torch.testing.assert_close(out[:, 600:], ref_upsample_concat([small], (4, 4)), **tol(torch.float32))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("specs,size", [
    ([(6, 40, 40)], (80, 80)),  # 40 source rows: more than one block of 32 (run_rows2_nchw)
    ([(5, 45, 30), (3, 7, 7)], (100, 70)),  # fractional vertical factor, two features
    ([(600, 20, 20)], (41, 41)),  # 600 planes: tasks' chunks of rows end inside planes
], ids=["2x-40rows", "frac", "chunks"])
def test_nchw_bilinear_upscale_rows_in_blocks(specs, size, dtype, gen):
    """NCHW bilinear upscales blend output rows from blocks of horizontally resampled source
    rows: blocks of up to 32 source rows, cut inside planes by the blocks and by the chunks of
    rows tasks take. Values match the reference, and do not depend on the thread count."""
    feats = _features(gen, dtype, "cpu", "nchw", specs=specs)
    want = ref_upsample_concat(feats, size, mode="bilinear")
    n = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(msfast.upsample_concat(feats, size, mode="bilinear"))
    finally:
        torch.set_num_threads(n)
    torch.testing.assert_close(outs[0], want, **tol(dtype, upscale=True))
    assert torch.equal(outs[0], outs[1])


# One-channel features whose pixel stride is not 1: a transposed [N, 1, H, 1] column (rows 1
# element apart, pixels 2), a [N, 1, H, 1] slice of every third column, and a [N, 1, H, W] slice
# of a channels_last tensor. In a channels_last call such a feature is a "plane" of one value a
# pixel that is not packed; a blend of its rows once read them as one run of pixels, from past
# the tensor's end (found by a longer run of test_fuzz.py).
ODD_COLUMNS = {
    "transposed_column": lambda gen, dtype, h: randn(gen, 2, 1, 1, h, dtype=dtype).transpose(2, 3),
    "every_third_column": lambda gen, dtype, h: randn(gen, 2, 1, h, 3, dtype=dtype)[:, :, :, ::3],
    "channels_last_slice": lambda gen, dtype, h: randn(gen, 2, 3, h, 4, dtype=dtype, channels_last=True)[:, 1:2],
}


@pytest.mark.parametrize("out_layout", ["channels_last", "nchw", None])
@pytest.mark.parametrize("size", [(3, 3), (3, 40), (7, 5), (2, 17)], ids=str)
@pytest.mark.parametrize("h", [1, 2, 5])
@pytest.mark.parametrize("kind", list(ODD_COLUMNS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_one_channel_features_with_a_pixel_stride(dtype, kind, h, size, out_layout, gen):
    odd = ODD_COLUMNS[kind](gen, dtype, h)
    assert odd.shape[1] == 1 and (odd.shape[3] == 1 or odd.stride(3) != 1 or odd.stride(2) != odd.shape[3])
    feats = [odd, randn(gen, 2, 2, 3, 4, dtype=dtype, channels_last=out_layout == "channels_last")]
    for mode in ("bilinear", "bicubic", "nearest"):
        want = ref_upsample_concat(feats, size, mode=mode)
        if out_layout is None:
            got = msfast.upsample_concat(feats, size, mode=mode)
        else:
            fmt = torch.channels_last if out_layout == "channels_last" else torch.contiguous_format
            out = torch.full(want.shape, float("nan"), dtype=dtype).contiguous(memory_format=fmt)
            got = msfast.upsample_concat(feats, size, mode=mode, out=out)
        torch.testing.assert_close(got, want, **tol(dtype, upscale=True), msg=lambda m, mode=mode: f"{mode}: {m}")


# F.interpolate picks its nearest formulas from its input's layout (index_math.h: NearestRule):
# the channels-last kernel for a channels_last input of more than 3 channels, else the generic
# one, whose index is computed in the tensor's type. In float64 the two pick different columns of
# 12 -> 74 (column 37; 18 for nearest-exact), so a feature whose layout is not the call's shows
# whether msfast follows the feature (it once followed the call: 37 and 63 of 1,500 random such
# float64 resizes differed from F.interpolate, 4 in float32 and float16).
MIXED_LAYOUTS = {
    # an NCHW feature written into a channels_last out=
    "nchw_into_channels_last": (("nchw",), "channels_last"),
    # a channels_last feature in a call that runs NCHW (features[0]'s layout)
    "channels_last_in_nchw": (("nchw", "channels_last"), None),
    # both kinds in one channels_last call
    "both_into_channels_last": (("channels_last", "nchw"), "channels_last"),
}


def _mixed(gen, layouts, C=8, src=(27, 12), requires_grad=False):
    return [randn(gen, 2, C, *src, dtype=torch.float64, channels_last=lay == "channels_last",
                  requires_grad=requires_grad) for lay in layouts]


@pytest.mark.parametrize("case", list(MIXED_LAYOUTS))
@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
def test_nearest_rule_follows_each_features_layout_float64(mode, case, gen):
    layouts, out_layout = MIXED_LAYOUTS[case]
    feats = _mixed(gen, layouts)
    want = ref_upsample_concat(feats, (92, 74), mode=mode)
    if out_layout is None:
        got = msfast.upsample_concat(feats, (92, 74), mode=mode)
    else:
        out = torch.full(want.shape, float("nan"), dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        got = msfast.upsample_concat(feats, (92, 74), mode=mode, out=out)
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", ["channels_last_in_nchw", "both_into_channels_last"])
@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
def test_nearest_backward_follows_each_features_layout(mode, case, gen):
    """The backward (and the backward of the backward) of a call whose features' layouts differ:
    each feature's gradient is the adjoint of its own resize, with its own nearest formulas, and
    the double backward resizes each incoming gradient as its feature was. The adjoint comes from
    the forward's matrix, built with F.interpolate on basis images in the feature's layout
    (conftest: resize_adjoint)."""
    layouts = MIXED_LAYOUTS[case][0]
    h, w, size = 12, 12, (92, 74)
    feats = _mixed(gen, layouts, C=4, src=(h, w), requires_grad=True)
    out = msfast.upsample_concat(feats, size, mode=mode)
    assert torch.equal(out, ref_upsample_concat([f.detach() for f in feats], size, mode=mode))
    g = randn(gen, *out.shape, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(out, feats, g, create_graph=True)
    for i, lay in enumerate(layouts):
        want_i = resize_adjoint(g.detach()[:, 4 * i:4 * i + 4], h, w, mode, channels_last=lay == "channels_last")
        torch.testing.assert_close(grads[i], want_i, rtol=0, atol=1e-12, msg=lambda m, i=i: f"features[{i}]: {m}")
    ggs = [randn(gen, *gr.shape, dtype=torch.float64) for gr in grads]
    (gg_out,) = torch.autograd.grad(grads, g, ggs)
    like = [gg.contiguous(memory_format=torch.channels_last if lay == "channels_last" else torch.contiguous_format)
            for gg, lay in zip(ggs, layouts)]
    assert torch.equal(gg_out, ref_upsample_concat(like, size, mode=mode))


@pytest.mark.parametrize("mode,src,size", [("nearest", (2, 56), (127, 92)), ("nearest-exact", (4, 27), (121, 102)),
                                           ("nearest", (45, 44), (129, 50))], ids=str)
def test_nearest_backward_is_the_adjoint_of_the_forward(mode, src, size, gen):
    """In float64, with h + w > 128, ATen's nearest backward is not the adjoint of its own forward
    (its backward takes other formulas: gradients up to 9 apart here); msfast's backward is the
    adjoint of the forward, which equals F.interpolate's. The adjoint comes from the forward's
    matrix, built with F.interpolate (conftest: resize_adjoint)."""
    h, w = src
    x = randn(gen, 1, 1, h, w, dtype=torch.float64, requires_grad=True)
    out = msfast.upsample_concat([x], size, mode=mode)
    assert torch.equal(out, ref_upsample_concat([x.detach()], size, mode=mode))
    g = randn(gen, *out.shape, dtype=torch.float64)
    (got,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(got, resize_adjoint(g, h, w, mode), rtol=0, atol=1e-12)
