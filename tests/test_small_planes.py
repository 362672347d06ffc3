"""The CPU kernels' small-plane path (csrc/cpu/resample_kernels.h, plan_small and small_rows).

An NCHW job of short output rows whose planes make a small matrix (ResNet's coarse feature
maps, 8x8 digits) is computed as that matrix over whole planes instead of row by row. It sums
each output over its inputs in another order than the rows, so it agrees with them
(``msfast._C._set_cpu_runner("no-small")``) to rounding; both must match the reference.
``_small_plane_jobs`` counts the jobs that took it. A plane with a non-finite input value takes
the rows (a weight of 0 outside an output's taps would turn inf into NaN), and an output's
value must not depend on which planes and rows are computed together (four planes at a time,
chunks of rows that split planes, the thread count).
"""

from __future__ import annotations

import pytest
import torch
from conftest import GRAD_TOL, native_and, randint_u8, randn, ref_pyramid, ref_upsample_concat, tol

import msfast
from msfast import _ops

pytestmark = pytest.mark.skipif(_ops._C is None, reason="msfast._C is not built")

# MultiScaleResNet-18's fusion at 128 and 224 pixels: 4x4, 2x2, 1x1 maps (and 7x7, 4x4, 2x2)
# concatenated at the finest.
RESNET_HEADS = [((4, 4), [(6, 4, 4), (5, 2, 2), (3, 1, 1)]), ((7, 7), [(12, 7, 7), (10, 4, 4), (6, 2, 2)])]
CONCAT_KW = [{"mode": "bilinear"}, {"mode": "bilinear", "align_corners": True}, {"mode": "bicubic"},
             {"mode": "nearest"}, {"mode": "nearest-exact"}]
PYRAMID_KW = [{"mode": "bilinear"}, {"mode": "bilinear", "antialias": True}, {"mode": "bicubic", "antialias": True},
              {"mode": "area"}, {"mode": "nearest"}]


def _small_and_rows(fn):
    """(fn() on the small-plane path, fn() row by row, small-plane jobs run by the first)."""
    fast, slow, jobs, jobs_rows = native_and("no-small", fn, _ops._C._small_plane_jobs)
    assert jobs_rows == 0
    return fast, slow, jobs


def _assert_rounding(a, b, ulps=8):
    for u, v in zip(a, b, strict=True):
        eps = torch.finfo(u.dtype).eps
        torch.testing.assert_close(u, v, rtol=ulps * eps, atol=ulps * eps)


def _kw_id(kw):
    return "-".join(str(v) for v in kw.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kw", CONCAT_KW, ids=_kw_id)
@pytest.mark.parametrize("head", RESNET_HEADS, ids=lambda h: f"{h[0][0]}x{h[0][1]}")
def test_upsample_concat_forward_and_backward(head, kw, dtype, gen):
    size, specs = head
    feats = [randn(gen, 3, c, h, w, dtype=dtype) for c, h, w in specs]
    g = randn(gen, 3, sum(c for c, _, _ in specs), *size, dtype=dtype)

    def run():
        fs = [f.clone().requires_grad_(True) for f in feats]
        out = msfast.upsample_concat(fs, size, **kw)
        out.backward(g)
        return [out.detach()] + [f.grad for f in fs]

    fast, slow, jobs = _small_and_rows(run)
    # the 2x2 and 1x1 features (4x4 and 2x2 at 7x7), forward and backward; the finest is a copy
    assert jobs == 4
    if dtype == torch.bfloat16:  # the float sums round to the same bfloat16 or a neighbour
        torch.testing.assert_close(fast, slow, rtol=1e-2, atol=1e-2)
    else:
        _assert_rounding(fast, slow)
    fr = [f.clone().requires_grad_(True) for f in feats]
    ref = ref_upsample_concat(fr, size, **kw)
    ref.backward(g)
    torch.testing.assert_close(fast[0], ref, **tol(dtype, upscale=True))
    for a, f in zip(fast[1:], fr, strict=True):
        torch.testing.assert_close(a, f.grad, **(GRAD_TOL if dtype == torch.float32 else tol(dtype)))


@pytest.mark.parametrize("kw", PYRAMID_KW, ids=_kw_id)
def test_pyramid_of_digits_forward_and_backward(kw, gen):
    """8x8 images (the default dataset's), levels 1, 0.5, 0.25, normalized inside the kernel."""
    x = randn(gen, 40, 3, 8, 8, dtype=torch.float64)
    scales = [1.0, 0.5, 0.25]
    norm = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 1.5, 2.0]}
    grads = [randn(gen, 40, 3, 8 >> k, 8 >> k, dtype=torch.float64) for k in range(3)]

    def run():
        xx = x.clone().requires_grad_(True)
        outs = msfast.pyramid(xx, scales, **kw, **norm)
        torch.autograd.backward(outs, grads)
        return [o.detach() for o in outs] + [xx.grad]

    fast, slow, jobs = _small_and_rows(run)
    # the three normalized levels; the gradient (one job, three terms) unless an adjoint term's
    # matrix is too much work (antialiased bicubic's 4x)
    assert jobs == 3 + (kw != {"mode": "bicubic", "antialias": True})
    _assert_rounding(fast, slow)
    xr = x.clone().requires_grad_(True)
    ref = ref_pyramid(xr, scales, **kw, **norm)
    torch.autograd.backward(ref, grads)
    for o, r in zip(fast[:-1], ref, strict=True):
        torch.testing.assert_close(o, r, **tol(torch.float64))
    torch.testing.assert_close(fast[-1], xr.grad, **tol(torch.float64))


def test_pyramid_of_uint8_images(gen):
    x = randint_u8(gen, 16, 3, 8, 8)
    kw = {"mode": "bilinear", "antialias": True, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.25]}
    fast, slow, jobs = _small_and_rows(lambda: msfast.pyramid(x, [1.0, 0.5, 0.25], **kw))
    assert jobs == 3
    _assert_rounding(fast, slow)
    for o, r in zip(fast, ref_pyramid(x, [1.0, 0.5, 0.25], **kw), strict=True):
        torch.testing.assert_close(o, r, **tol(torch.float32))


def test_only_small_nchw_planes_take_it(gen):
    before = _ops._C._small_plane_jobs()
    msfast.upsample_concat([randn(gen, 1, 2, 2, 2, channels_last=True)] * 2, (4, 4))  # channels_last
    msfast.upsample_concat([randn(gen, 1, 2, 4, 4)], (4, 4))  # a copy
    msfast.upsample_concat([randn(gen, 1, 64, 2, 2)], (16, 16))  # rows of 16
    msfast.upsample_concat([randn(gen, 1, 64, 32, 32)], (8, 8))  # 1024 x 64 weights
    msfast.upsample_concat([randn(gen, 1, 64, 16, 16)], (4, 4))  # 8 outputs read 6 rows: 12 steps each
    assert _ops._C._small_plane_jobs() == before
    msfast.upsample_concat([randn(gen, 1, 3, 16, 16)], (8, 8))  # three planes do not pay for the matrix
    assert _ops._C._small_plane_jobs() == before
    msfast.upsample_concat([randn(gen, 1, 64, 16, 16)], (8, 8))  # 256 x 64 weights: the bound, 4 steps each
    msfast.upsample_concat([randn(gen, 1, 64, 7, 7)], (14, 15))  # rows of 15
    assert _ops._C._small_plane_jobs() == before + 2


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_plane_with_a_non_finite_value_takes_the_rows(bad, gen):
    """That plane gets the rows' exact bits (where a weight of 0 outside an output's taps would
    make inf NaN); the other planes still take the small path."""
    feats = [randn(gen, 2, 6, 2, 2), randn(gen, 2, 4, 1, 3)]
    feats[0][1, 3, 0, 1] = bad
    feats[1][0, 2, 0, 0] = bad
    out, rows, jobs = _small_and_rows(lambda: msfast.upsample_concat(feats, (5, 7)))
    assert jobs == 2
    for n, c in [(1, 3), (0, 6 + 2)]:  # the two planes with the value: the rows' exact bits
        assert torch.equal(out[n, c].isnan(), rows[n, c].isnan())
        assert torch.equal(out[n, c].nan_to_num(), rows[n, c].nan_to_num())
    assert torch.isfinite(out[0, :6]).all() and torch.isfinite(out[1, 6:]).all()
    torch.testing.assert_close(out, rows, equal_nan=True, **tol(torch.float32))


def test_values_do_not_depend_on_which_planes_or_rows_go_together(gen):
    """2400 planes of 3 x 5 outputs: chunks of rows split planes, whole planes go four at a
    time, the rest one at a time. Every plane must equal that plane computed in a call of five
    planes (four at a time, then one), and one thread must give two threads' bits."""
    x = randn(gen, 4, 600, 2, 3)
    out = msfast.upsample_concat([x], (3, 5))
    for n, c in [(0, 0), (1, 7), (2, 599), (3, 598), (3, 599)]:
        lo = min(c, 595)
        before = _ops._C._small_plane_jobs()
        few = msfast.upsample_concat([x[n : n + 1, lo : lo + 5]], (3, 5))
        assert _ops._C._small_plane_jobs() == before + 1
        assert torch.equal(out[n, c], few[0, c - lo]), (n, c)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = msfast.upsample_concat([x], (3, 5))
        torch.set_num_threads(2)
        two = msfast.upsample_concat([x], (3, 5))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, out) and torch.equal(two, out)


def test_runner_name_is_checked():
    with pytest.raises(ValueError, match="no-small"):
        _ops._C._set_cpu_runner("small")
