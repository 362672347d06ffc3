"""The CPU kernels' row stencil and row window (csrc/cpu/resample_kernels.h, Stencil and
window_row).

NCHW rows of an integer scale factor (2x, 4x, 8x; up, down, and the adjoints of those in the
backward) are computed with strided loads instead of one gather per output. The stencil uses the
gather's weights in the gather's order, so its results must equal those of the gather
(``msfast._C._set_cpu_runner("no-stencil")``) up to the last bit or two: the compiler fuses
multiply-adds differently in the two loops (the gather's generic tap loop has some unfused ones).
Both must match the reference. Under AVX2, float32 upscale rows take the window instead of the
stencil (one load of 8 inputs per 8 outputs, lane permutes for the taps), and float32 rows of 8
taps or more that have no stencil take dot products (dot_row: 8 taps a step, summed pairwise,
so they agree with the gather only to rounding); ``_stencil_terms`` counts the terms that took
any of them.
"""

from __future__ import annotations

import pytest
import torch
from conftest import GRAD_TOL, native_and, randn, ref_pyramid, ref_upsample_concat, tol

import msfast
from msfast import _ops

pytestmark = pytest.mark.skipif(_ops._C is None, reason="msfast._C is not built")

# (mode, antialias): 2-, 4- and 8-tap downscale tables, 2- and 4-tap upscale tables.
DOWN = [("bilinear", True), ("bilinear", False), ("bicubic", True), ("area", None)]
# Terms of a [1, 0.5, 0.25] pyramid's forward and backward that take the stencil. Antialiased
# bilinear: both levels and both adjoints. Plain bilinear and area: the adjoints are one-tap
# tables (each input feeds one output), which need no gather. Antialiased bicubic: the 16-tap
# 4x downscale has no compiled stencil; under AVX2 its float32 rows take dot products instead.
PLANNED = {"bilinear-aaTrue": 4, "bilinear-aaFalse": 2, "bicubic-aaTrue": 3, "area-aaNone": 2}
AVX2 = _ops._C is not None and _ops._C.build_info()["cpu_isa"] in ("avx2", "avx512bf16")
UP = [("bilinear", False), ("bicubic", False)]
# Width 88 = 8 * 11: every factor divides it, and the interior is not a multiple of a vector.
SHAPE = (2, 3, 12, 88)


def _kw(mode, aa):
    return {"mode": mode} if aa is None else {"mode": mode, "antialias": aa}


def _both(fn):
    """(fn() with the stencil, fn() with the gather only, stencil terms planned by the first)."""
    fast, slow, planned, _ = native_and("no-stencil", fn, _ops._C._stencil_terms)
    return fast, slow, planned


def _assert_same(a, b, ulps=4):
    """Equal up to rounding: a few units in the last place (the stencil and the window), more
    where dot products sum up to 18 taps in another order than the gather (a sum of terms of
    mixed signs keeps the absolute rounding error of its largest terms)."""
    for u, v in zip(a, b, strict=True):
        eps = torch.finfo(u.dtype).eps
        torch.testing.assert_close(u, v, rtol=ulps * eps, atol=ulps * eps)


DOT_ULPS = 64


def _pyramid_fwd_bwd(pyramid, x, scales, grads, kw):
    """pyramid(x, scales, **kw)'s levels, then x's gradient for the levels' gradients `grads`."""
    xx = x.clone().requires_grad_(True)
    outs = pyramid(xx, scales, **kw)
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs] + [xx.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("combo", DOWN, ids=lambda c: f"{c[0]}-aa{c[1]}")
def test_pyramid_downscale_forward_and_backward(combo, dtype, gen):
    kw = _kw(*combo)
    scales = [1.0, 0.5, 0.25]
    x = randn(gen, *SHAPE, dtype=dtype)
    grads = [randn(gen, SHAPE[0], SHAPE[1], int(SHAPE[2] * s), int(SHAPE[3] * s), dtype=dtype) for s in scales]

    fast, slow, planned = _both(lambda: _pyramid_fwd_bwd(msfast.pyramid, x, scales, grads, kw))
    dot = AVX2 and dtype == torch.float32 and combo == ("bicubic", True)
    assert planned == PLANNED[f"{combo[0]}-aa{combo[1]}"] + dot
    _assert_same(fast, slow, DOT_ULPS if dot else 4)
    ref = _pyramid_fwd_bwd(ref_pyramid, x, scales, grads, kw)
    for o, r in zip(fast[:-1], ref[:-1], strict=True):
        torch.testing.assert_close(o, r, **tol(dtype))
    torch.testing.assert_close(fast[-1], ref[-1], **(GRAD_TOL if dtype == torch.float32 else tol(dtype)))


@pytest.mark.parametrize("combo", UP, ids=lambda c: c[0])
def test_upsample_concat_upscale_forward_and_backward(combo, gen):
    mode, _ = combo
    size = (16, 88)
    feats = [randn(gen, 2, c, 16 // f, 88 // f) for c, f in [(3, 1), (4, 2), (5, 4), (6, 8)]]
    g = randn(gen, 2, 18, *size)

    def run():
        fs = [f.clone().requires_grad_(True) for f in feats]
        out = msfast.upsample_concat(fs, size, mode=mode)
        out.backward(g)
        return [out.detach()] + [f.grad for f in fs]

    fast, slow, planned = _both(run)
    assert planned >= 3  # the 2x, 4x and 8x features' forward rows
    _assert_same(fast, slow, DOT_ULPS)  # the 8x adjoint's 16 taps
    fr = [f.clone().requires_grad_(True) for f in feats]
    ref = ref_upsample_concat(fr, size, mode=mode)
    ref.backward(g)
    torch.testing.assert_close(fast[0], ref, **tol(torch.float32, upscale=True))
    for a, f in zip(fast[1:], fr, strict=True):
        torch.testing.assert_close(a, f.grad, **GRAD_TOL)


@pytest.mark.parametrize("width", [8, 9, 16, 40, 41, 200])
def test_odd_and_short_rows(width, gen):
    """Widths that the factors do not divide, or leave little interior, fall back to the
    gather where needed and still agree with it."""
    x = randn(gen, 1, 2, 6, width)
    kw = {"mode": "bilinear", "antialias": True}
    fast, slow, _ = _both(lambda: msfast.pyramid(x, [0.5, 0.25], **kw))
    _assert_same(fast, slow)
    for o, r in zip(fast, ref_pyramid(x, [0.5, 0.25], **kw), strict=True):
        torch.testing.assert_close(o, r, **tol(torch.float32))


def test_runner_name_is_checked():
    with pytest.raises(ValueError, match="no-stencil"):
        _ops._C._set_cpu_runner("stencil")


@pytest.mark.parametrize("aa", [True, False])
def test_fractional_factors(aa, gen):
    """3/4 (P = 3, S = 4) and 3/2 (P = 3, S = 2): the period is found in the table's starts."""
    kw = {"mode": "bilinear", "antialias": aa}
    x = randn(gen, 2, 3, 12, 88)
    scales = [0.75, 1.5]
    fast, slow, planned = _both(lambda: msfast.pyramid(x, scales, **kw))
    assert planned >= 2
    _assert_same(fast, slow)
    for o, r in zip(fast, ref_pyramid(x, scales, **kw), strict=True):
        torch.testing.assert_close(o, r, **tol(torch.float32, upscale=True))


# Widths of 3/4 rows: steps of q that fill blocks of 8 or leave a remainder (the last block
# then overlaps), a single block, and rows too short for one.
THREE_QUARTER_WIDTHS = [224, 88, 44, 36, 32, 24]


@pytest.mark.parametrize("combo", [("bilinear", False), ("bilinear", True), ("bicubic", False)],
                         ids=lambda c: f"{c[0]}-aa{c[1]}")
@pytest.mark.parametrize("width", THREE_QUARTER_WIDTHS)
def test_three_quarter_rows(width, combo, gen):
    """3/4 downscale rows of 2, 3 and 4 taps (under AVX2, float32: stencil_row_34, 8 steps
    of 3 outputs at a time, the last block overlapping the one before it), stored; and added
    into a sum: the backward of a [1, 4/3] pyramid adds the 3/4 adjoint rows of the 4/3
    level's gradient to the identity level's (bilinear; bicubic's adjoint rows have more
    taps and take the gather). Against the gather and the reference."""
    kw = _kw(*combo)
    x = randn(gen, 2, 3, 10, width)
    fast, slow, planned = _both(lambda: msfast.pyramid(x, [0.75], **kw))
    assert planned == 1
    _assert_same(fast, slow)
    torch.testing.assert_close(fast[0], ref_pyramid(x, [0.75], **kw)[0], **tol(torch.float32))
    # The backward: a width divisible by 3, so that 4/3 is exact and its adjoint rows 3/4.
    wb = width - width % 3
    xb = randn(gen, 2, 3, 10, wb)
    sizes = [(10, wb), (10, wb * 4 // 3)]
    grads = [randn(gen, 2, 3, h, w) for h, w in sizes]
    kw_sizes = dict(kw, sizes=sizes)
    got, gathered, planned = _both(lambda: _pyramid_fwd_bwd(msfast.pyramid, xb, None, grads, kw_sizes))
    assert planned >= (1 if combo[0] == "bilinear" else 0)  # bicubic's adjoint: more than 4 taps
    _assert_same(got[-1:], gathered[-1:])
    ref = _pyramid_fwd_bwd(ref_pyramid, xb, None, grads, kw_sizes)
    torch.testing.assert_close(got[-1], ref[-1], **GRAD_TOL)


# (input, output) widths of upscale rows: 8x from 7 inputs (fewer than 8: a masked load), 4x,
# a fractional 11 -> 40, and outputs that are not a multiple of 8 (the gather does the rest).
WINDOW_ROWS = [(7, 56), (14, 56), (11, 40), (10, 43), (3, 21)]


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("widths", WINDOW_ROWS, ids=lambda w: f"{w[0]}to{w[1]}")
def test_upscale_rows(widths, mode, gen):
    """Upscale rows through the window (or stencil), against the gather and the reference,
    forward and backward."""
    w_in, w_out = widths
    x = randn(gen, 2, 3, 5, w_in)
    g = randn(gen, 2, 3, 9, w_out)

    def run():
        xx = x.clone().requires_grad_(True)
        out = msfast.upsample_concat([xx], (9, w_out), mode=mode)
        out.backward(g)
        return [out.detach(), xx.grad]

    fast, slow, planned = _both(run)
    if w_out >= 8 and mode == "bilinear" and AVX2:  # (the baseline build has no window rows)
        assert planned >= 1
    _assert_same(fast, slow)
    xr = x.clone().requires_grad_(True)
    ref = ref_upsample_concat([xr], (9, w_out), mode=mode)
    ref.backward(g)
    torch.testing.assert_close(fast[0], ref, **tol(torch.float32, upscale=True))
    torch.testing.assert_close(fast[1], xr.grad, **GRAD_TOL)


def test_upscale_rows_added_into_a_sum(gen):
    """A level taller and narrower than the input: its adjoint shrinks rows first and widens
    them after, and adds into the gradient of the other level (the window's adding path)."""
    x = randn(gen, 2, 3, 12, 40)
    sizes = [(12, 40), (24, 10)]
    grads = [randn(gen, 2, 3, h, w) for h, w in sizes]

    def run():
        xx = x.clone().requires_grad_(True)
        outs = msfast.pyramid(xx, sizes=sizes, mode="bilinear")
        torch.autograd.backward(outs, grads)
        return [o.detach() for o in outs] + [xx.grad]

    fast, slow, _ = _both(run)
    _assert_same(fast, slow)
    xr = x.clone().requires_grad_(True)
    ref = ref_pyramid(xr, sizes=sizes, mode="bilinear")
    torch.autograd.backward(ref, grads)
    torch.testing.assert_close(fast[-1], xr.grad, **GRAD_TOL)


# (input, output) widths of rows of 8 taps or more: the adjoints of 8x and 4x upscales (16 and 8
# taps; 7 and 5 outputs, fewer than a vector), a 9x downscale with antialiasing (18 taps), and
# rows whose last windows would run past the row's end (moved left, weights shifted).
DOT_ROWS = [(56, 7), (40, 5), (88, 11), (63, 7), (19, 2)]


@pytest.mark.parametrize("widths", DOT_ROWS, ids=lambda w: f"{w[0]}to{w[1]}")
def test_dot_rows(widths, gen):
    """Rows of many taps through dot products (AVX2, float32), against the gather and the
    reference: an antialiased downscale's forward, and the backward of a bilinear upscale (the
    adjoint, which also adds into a sum of two levels' gradients)."""
    w_in, w_out = widths
    x = randn(gen, 2, 3, 6, w_in)
    sizes = [(6, w_out), (3, w_out)]
    grads = [randn(gen, 2, 3, h, w) for h, w in sizes]

    def run():
        xx = x.clone().requires_grad_(True)
        outs = msfast.pyramid(xx, sizes=sizes, mode="bilinear", antialias=True)
        torch.autograd.backward(outs, grads)
        return [o.detach() for o in outs] + [xx.grad]

    fast, slow, planned = _both(run)
    if AVX2:
        assert planned >= 2
    _assert_same(fast, slow, DOT_ULPS)
    xr = x.clone().requires_grad_(True)
    ref = ref_pyramid(xr, sizes=sizes, mode="bilinear", antialias=True)
    torch.autograd.backward(ref, grads)
    for o, r in zip(fast[:-1], ref, strict=True):
        torch.testing.assert_close(o, r, **tol(torch.float32))
    torch.testing.assert_close(fast[-1], xr.grad, **GRAD_TOL)

    # the adjoint of an upscale from w_out to w_in: rows of w_in gradients summed into w_out
    f = randn(gen, 2, 3, 4, w_out)
    g = randn(gen, 2, 3, 4, w_in)

    def run_up():
        ff = f.clone().requires_grad_(True)
        out = msfast.upsample_concat([ff], (4, w_in), mode="bilinear")
        out.backward(g)
        return [ff.grad]

    fast, slow, _ = _both(run_up)
    _assert_same(fast, slow, DOT_ULPS)
    fr = f.clone().requires_grad_(True)
    ref_upsample_concat([fr], (4, w_in), mode="bilinear").backward(g)
    torch.testing.assert_close(fast[0], fr.grad, **GRAD_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("combo", DOWN + UP, ids=lambda c: f"{c[0]}-aa{c[1]}")
def test_rgb_channels_last_rows_by_channel(combo, dtype, gen):
    """channels_last rows of 3 values per pixel (RGB) are split into one row per channel and
    take the NCHW row kernels (horizontal_planar): a pyramid of downscales and upscales,
    forward and backward (whose input gradient adds the levels' terms), from a uint8 image
    with mean/std as well; equal to the gather path up to rounding, and to the reference."""
    kw = _kw(*combo)
    scales = [0.5, 0.25, 0.75, 2.0] if combo in DOWN else [2.0, 4.0, 1.5]
    x = randn(gen, 2, 3, 24, 88, dtype=dtype, channels_last=True)
    grads = [randn(gen, 2, 3, int(24 * s), int(88 * s), dtype=dtype, channels_last=True) for s in scales]

    fast, slow, planned = _both(lambda: _pyramid_fwd_bwd(msfast.pyramid, x, scales, grads, kw))
    assert planned >= 2  # terms of the forward and of the backward took the row kernels
    assert all(o.is_contiguous(memory_format=torch.channels_last) for o in fast)
    _assert_same(fast, slow, DOT_ULPS)
    ref = _pyramid_fwd_bwd(ref_pyramid, x, scales, grads, kw)
    for o, r in zip(fast[:-1], ref[:-1], strict=True):
        torch.testing.assert_close(o, r, **tol(dtype, upscale=True))
    torch.testing.assert_close(fast[-1], ref[-1], **(GRAD_TOL if dtype == torch.float32 else tol(dtype)))


def test_rgb_channels_last_preprocess_and_concat_slices(gen):
    """The preprocess path (uint8 RGB channels_last, normalized, antialiased) and a concat of
    RGB channels_last features, whose rows are 3-value slices of wider output pixels, through
    the per-channel row kernels: equal to the gather path up to rounding, and to the reference."""
    img = torch.randint(0, 256, (2, 40, 64, 3), dtype=torch.uint8, generator=gen).permute(0, 3, 1, 2)
    kw = dict(mode="bilinear", antialias=True, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    fast, slow, planned = _both(lambda: msfast.pyramid(img, [1.0, 0.75, 0.5, 0.25], **kw))
    assert planned >= 3
    _assert_same(fast, slow, DOT_ULPS)
    for o, r in zip(fast, ref_pyramid(img, [1.0, 0.75, 0.5, 0.25], **kw), strict=True):
        torch.testing.assert_close(o, r, **tol(torch.float32))
    feats = [randn(gen, 2, 3, h, w, channels_last=True) for h, w in [(20, 32), (10, 16), (40, 64)]]
    fast, slow, planned = _both(lambda: [msfast.upsample_concat(feats, (20, 32))])
    assert planned >= 2
    _assert_same(fast, slow, DOT_ULPS)
    torch.testing.assert_close(fast[0], ref_upsample_concat(feats, (20, 32)), **tol(torch.float32, upscale=True))
