"""Memory formats and the nearest formulas that follow from them, against F.interpolate.

ATen gives an upsample's output the memory format suggest_memory_format picks for its input
(channels_last for a channels_last tensor sliced along C or W, though it is not dense), and its
CPU nearest kernels pick their formulas by whether the tensor they resize is channels_last
contiguous (index_math.h: NearestRule; they differ at a few outputs in float64 once h + w > 128).
msfast follows both: the levels' and the output's layout from the first rule, and each resize's
nearest formulas from the tensor the reference resizes, which for a normalized pyramid is x_norm,
a new dense tensor (plan.h: resize_layouts).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randn, ref_pyramid, ref_upsample_concat, resize_adjoint, tol
from test_fuzz import LAYOUTS, _make

import msfast


def _format(t: torch.Tensor):
    return t.is_contiguous(), t.is_contiguous(memory_format=torch.channels_last)


ALL_LAYOUTS = list(LAYOUTS)  # every fuzzed layout, channels_last ones sliced, strided and expanded included
SHAPES = [(1, 5, 6), (3, 5, 6), (4, 5, 6), (4, 1, 6), (4, 1, 1), (5, 7, 1)]


def _input(layout, shape, dtype, gen):
    C, H, W = shape
    return _make(int(torch.randint(0, 2**31, (1,), generator=gen)), (2, C, H, W), dtype, layout, "cpu")[1]


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_levels_take_the_reference_memory_format(layout, shape, normalize, gen):
    x = _input(layout, shape, torch.float32, gen)
    kw = {"mean": [0.25] * shape[0], "std": [0.5] * shape[0]} if normalize else {}
    for mode, antialias in (("bilinear", True), ("bicubic", False), ("nearest", False), ("area", False)):
        got = msfast.pyramid(x, sizes=[(7, 9), (3, 4)], mode=mode, antialias=antialias, **kw)
        want = ref_pyramid(x, sizes=[(7, 9), (3, 4)], mode=mode, antialias=antialias, **kw)
        for k, (o, r) in enumerate(zip(got, want)):
            assert _format(o) == _format(r), f"{mode} level {k}: strides {o.stride()}, reference {r.stride()}"
            torch.testing.assert_close(o, r, **tol(torch.float32))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_upsample_concat_takes_the_reference_memory_format(layout, shape, gen):
    """One feature: the output's layout is F.interpolate's (with several, features[0] decides)."""
    f = _input(layout, shape, torch.float32, gen)
    for mode in ("bilinear", "bicubic", "nearest-exact"):
        got = msfast.upsample_concat([f], (7, 9), mode=mode)
        want = ref_upsample_concat([f], (7, 9), mode=mode)
        assert _format(got) == _format(want), f"{mode}: strides {got.stride()}, reference {want.stride()}"
        torch.testing.assert_close(got, want, **tol(torch.float32, upscale=True))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_fake_kernels_give_the_real_strides(layout, shape, gen):
    """The fake kernels (msfast/_ops.py, used by torch.compile) decide the layout with the Python
    twin of the C++ rule: on meta tensors of the same strides they give the same outputs."""
    x = _input(layout, shape, torch.float32, gen)
    meta = torch.empty_strided(x.shape, x.stride(), device="meta")
    norm = {"mean": [0.5] * shape[0]}
    for got, fake in ((msfast.pyramid(x, sizes=[(7, 9)])[0], msfast.pyramid(meta, sizes=[(7, 9)])[0]),
                      (msfast.pyramid(x, sizes=[(7, 9)], **norm)[0], msfast.pyramid(meta, sizes=[(7, 9)], **norm)[0]),
                      (msfast.upsample_concat([x, x], (7, 9)), msfast.upsample_concat([meta, meta], (7, 9)))):
        assert fake.device.type == "meta" and fake.stride() == got.stride()


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_fake_kernels_with_size_one_dimensions(layout, gen):
    """A size-1 dimension's stride moves no element, but the layout rule reads it (vmap's expand
    gives such strides): the fake kernels' strides equal the real ones, normalized or not. (The
    fake pyramid took x_norm's layout from a meta empty_like, which restrides size-1 dimensions
    where ATen's empty_like keeps a dense x's strides: 1x2x1x2 with strides (2, 1, 4, 2) came
    back channels_last from the fake kernel and NCHW from the real one.)"""
    base = _make(int(torch.randint(0, 2**31, (1,), generator=gen)), (1, 4, 1, 3), torch.float32, layout, "cpu")[1]
    for n_stride, h_stride in [(1, 1), (2, 4), (3, 12), (12, 3), (100, 100), (0, 0)]:
        x = base.as_strided(base.shape, (n_stride, base.stride(1), h_stride, base.stride(3)), base.storage_offset())
        meta = torch.empty_strided(x.shape, x.stride(), device="meta")
        for kw in ({}, {"mean": [0.5] * 4}):
            got, fake = msfast.pyramid(x, sizes=[(5, 6)], **kw)[0], msfast.pyramid(meta, sizes=[(5, 6)], **kw)[0]
            assert fake.stride() == got.stride(), (x.stride(), kw)
            assert _format(got) == _format(ref_pyramid(x, sizes=[(5, 6)], **kw)[0]), (x.stride(), kw)
        assert msfast.upsample_concat([meta], (5, 6)).stride() == msfast.upsample_concat([x], (5, 6)).stride()


def _sliced_channels_last(gen, requires_grad=False):
    """8 of 10 channels of a channels_last float64 batch: channels_last strides, not dense."""
    base = randn(gen, 2, 10, 27, 12, dtype=torch.float64, channels_last=True, requires_grad=requires_grad)
    return base, base[:, 1:9]


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
def test_pyramid_nearest_formulas_of_a_sliced_channels_last_input(mode, normalize, gen):
    """F.interpolate(x) resizes the sliced tensor itself (not channels_last contiguous: the
    generic formulas); a normalized pyramid resizes x_norm, which is dense channels_last (the
    channels-last formulas). In float64 the two pick other columns of 12 -> 74."""
    _, x = _sliced_channels_last(gen)
    kw = {"mean": [0.1] * 8, "std": [0.5] * 8} if normalize else {}
    got = msfast.pyramid(x, sizes=[(92, 74)], mode=mode, **kw)[0]
    want = ref_pyramid(x, sizes=[(92, 74)], mode=mode, **kw)[0]
    assert _format(got) == _format(want)
    assert torch.equal(got, want)


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
def test_pyramid_nearest_backward_of_a_sliced_channels_last_input(mode, normalize, gen):
    """The backward is the adjoint of the forward's resize, with its formulas (built from
    F.interpolate on basis images resized as the reference resizes them), and the double
    backward resizes the incoming gradient with them again."""
    base, x = _sliced_channels_last(gen, requires_grad=True)
    h, w, size = 27, 12, (92, 74)
    std = 0.5
    kw = {"mean": [0.1] * 8, "std": [std] * 8} if normalize else {}
    (level,) = msfast.pyramid(x, sizes=[size], mode=mode, **kw)
    g = randn(gen, *level.shape, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(level, x, g, create_graph=True)
    # The resize the reference makes: of x itself (generic formulas), or of x_norm (channels_last).
    want = resize_adjoint(g.detach(), h, w, mode, channels_last=normalize) / (std if normalize else 1.0)
    torch.testing.assert_close(gx, want, rtol=0, atol=1e-12)
    gg = randn(gen, *gx.shape, dtype=torch.float64)
    (g2,) = torch.autograd.grad(gx, g, gg)
    scaled = gg / std if normalize else gg
    fmt = torch.channels_last if normalize else torch.contiguous_format
    torch.testing.assert_close(g2, F.interpolate(scaled.contiguous(memory_format=fmt), size=size, mode=mode),
                               rtol=0, atol=1e-12)
