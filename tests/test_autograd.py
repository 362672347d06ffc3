"""Gradients of both operators: gradcheck / gradgradcheck in float64 (also forward-mode AD, forward
over reverse and the batched checks), float32 gradients against the reference path, bitwise
determinism (repeated runs, 1 vs 2 threads) and unused pyramid levels."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import CONCAT_MODES, GRAD_TOL, INTERPOLATING, MODES, DispatchLog, randn, ref_pyramid, ref_upsample_concat
from torch.autograd import gradcheck, gradgradcheck

import msfast

MEAN = [0.1, -0.2, 0.3]
STD = [0.5, 2.0, 1.5]
SCALES = [1.0, 0.5, 1.7]
SIZES = [(3, 4), (7, 9), (10, 5)]


def _pyramid_combos():
    combos = []
    for mode in MODES:
        if mode in INTERPOLATING:
            combos += [(mode, ac, aa) for ac, aa in itertools.product([None, True], [None, False])]
        else:
            combos.append((mode, None, None))
    return combos


PYRAMID_COMBOS = _pyramid_combos()
CONCAT_COMBOS = [(m, ac) for m in CONCAT_MODES for ac in ([None, True] if m in INTERPOLATING else [None])]


def _cid(c):
    return "-".join(str(v) for v in c)


def _cat(*feats, size=(5, 6), **kw):
    return msfast.upsample_concat(list(feats), size, **kw)


# -------------------------------------------------------------------- gradcheck, float64

# Besides the backward (and the backward of the backward): forward-mode AD, forward over
# reverse, and the batched checks (the gradients computed under vmap), which the operators serve
# with their own nodes (csrc/autograd.cpp), the batching kernels of msfast/_func.py and
# csrc/legacy_vmap.cpp.
EVERY_MODE = dict(check_forward_ad=True, check_batched_grad=True, check_batched_forward_grad=True)
EVERY_SECOND = dict(check_fwd_over_rev=True, check_batched_grad=True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "mean_std"])
@pytest.mark.parametrize("combo", PYRAMID_COMBOS, ids=_cid)
def test_pyramid_gradcheck(combo, normalize, layout, device, gen):
    mode, align_corners, antialias = combo
    x = randn(gen, 2, 3, 7, 9, dtype=torch.float64, device=device, channels_last=layout == "channels_last",
              requires_grad=True)
    kw = dict(mode=mode, align_corners=align_corners, antialias=antialias)
    if normalize:
        kw.update(mean=MEAN, std=STD)
    fn = lambda x: msfast.pyramid(x, scales=SCALES, **kw)
    assert gradcheck(fn, (x,), fast_mode=True, **EVERY_MODE)
    assert gradgradcheck(fn, (x,), fast_mode=True, **EVERY_SECOND)


@pytest.mark.parametrize("combo", PYRAMID_COMBOS, ids=_cid)
def test_pyramid_gradcheck_by_sizes(combo, device, gen):
    mode, align_corners, antialias = combo
    x = randn(gen, 2, 3, 7, 9, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda x: msfast.pyramid(x, sizes=SIZES, mode=mode, align_corners=align_corners, antialias=antialias,
                                  std=STD)
    assert gradcheck(fn, (x,), fast_mode=True, **EVERY_MODE)
    assert gradgradcheck(fn, (x,), fast_mode=True, **EVERY_SECOND)


@pytest.mark.parametrize("case", [
    dict(scales=SCALES, mode="bilinear"),
    dict(scales=SCALES, mode="bicubic", antialias=False, align_corners=True, mean=MEAN[:2], std=STD[:2]),
    dict(scales=[0.6, 1.3], mode="area"),
    dict(scales=[0.6, 2.0], mode="nearest-exact", std=STD[:2]),
    dict(sizes=[(3, 4), (8, 11)], mode="bicubic"),
], ids=["bilinear_aa", "bicubic_ac_norm", "area", "nearest_exact", "bicubic_aa_by_sizes"])
def test_pyramid_gradcheck_full(case, device, gen):
    """Full (not fast-mode) gradcheck on a few representative configurations."""
    x = randn(gen, 1, 2, 7, 9, dtype=torch.float64, device=device, channels_last=True, requires_grad=True)
    fn = lambda x: msfast.pyramid(x, **case)
    assert gradcheck(fn, (x,), **EVERY_MODE)
    assert gradgradcheck(fn, (x,), **EVERY_SECOND)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "mixed"])
@pytest.mark.parametrize("combo", CONCAT_COMBOS, ids=_cid)
def test_upsample_concat_gradcheck(combo, layout, device, gen):
    mode, align_corners = combo
    feats = [
        randn(gen, 2, c, h, w, dtype=torch.float64, device=device, requires_grad=True,
              channels_last=layout == "channels_last" or (layout == "mixed" and i == 1))
        for i, (c, h, w) in enumerate([(2, 7, 9), (3, 3, 4), (1, 10, 2)])
    ]
    fn = lambda *f: _cat(*f, mode=mode, align_corners=align_corners)
    assert gradcheck(fn, tuple(feats), fast_mode=True, **EVERY_MODE)
    assert gradgradcheck(fn, tuple(feats), fast_mode=True, **EVERY_SECOND)


@pytest.mark.parametrize("mode,align_corners", [("bilinear", True), ("bicubic", None), ("nearest-exact", None)])
def test_upsample_concat_gradcheck_full(mode, align_corners, device, gen):
    feats = (randn(gen, 1, 2, 7, 9, dtype=torch.float64, device=device, requires_grad=True),
             randn(gen, 1, 1, 3, 4, dtype=torch.float64, device=device, channels_last=True, requires_grad=True))
    fn = lambda *f: _cat(*f, mode=mode, align_corners=align_corners)
    assert gradcheck(fn, feats, **EVERY_MODE)
    assert gradgradcheck(fn, feats, **EVERY_SECOND)


# ------------------------------------------------------- float32 gradients vs the reference


def _pyramid_grad(fn, x, gen):
    x = x.detach().requires_grad_()
    levels = fn(x)
    grads = [randn(gen, *lv.shape, device=x.device) for lv in levels]
    (gx,) = torch.autograd.grad(levels, x, grads)
    return gx


@pytest.mark.parametrize("by", ["scales", "sizes"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("combo", PYRAMID_COMBOS, ids=_cid)
def test_pyramid_grad_matches_reference_float32(combo, layout, by, device, gen):
    mode, align_corners, antialias = combo
    x = randn(gen, 2, 3, 17, 23, device=device, channels_last=layout == "channels_last")
    levels = dict(scales=[1.0, 0.5, 0.6, 1.7, 0.06]) if by == "scales" else dict(sizes=[(1, 1), (5, 40), (9, 12)])
    kw = dict(mode=mode, align_corners=align_corners, antialias=antialias, mean=MEAN, std=STD, **levels)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    got = _pyramid_grad(lambda x: msfast.pyramid(x, **kw), x, torch.Generator().manual_seed(seed))
    want = _pyramid_grad(lambda x: ref_pyramid(x, **kw), x, torch.Generator().manual_seed(seed))
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got, want, **GRAD_TOL)
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_pyramid_grad_with_out_dtype(device, gen):
    """float32 input, float64 levels: the gradient comes back in float32."""
    x = randn(gen, 2, 3, 17, 23, device=device, requires_grad=True)
    levels = msfast.pyramid(x, scales=[0.5, 1.7], mode="bicubic", out_dtype=torch.float64, std=STD)
    assert all(lv.dtype == torch.float64 for lv in levels)
    sum((lv * lv).sum() for lv in levels).backward()
    xr = x.detach().clone().requires_grad_()
    ref = ref_pyramid(xr, scales=[0.5, 1.7], mode="bicubic", out_dtype=torch.float64, std=STD)
    sum((lv * lv).sum() for lv in ref).backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, xr.grad, **GRAD_TOL)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "mixed"])
@pytest.mark.parametrize("combo", CONCAT_COMBOS, ids=_cid)
def test_upsample_concat_grad_matches_reference_float32(combo, layout, device, gen):
    mode, align_corners = combo
    specs = [(3, 17, 23), (4, 9, 12), (2, 30, 41), (1, 1, 1)]
    feats = [randn(gen, 2, c, h, w, device=device,
                   channels_last=layout == "channels_last" or (layout == "mixed" and i % 2 == 1))
             for i, (c, h, w) in enumerate(specs)]
    grad = randn(gen, 2, 10, 13, 19, device=device)

    def grads(fn):
        fs = [f.detach().requires_grad_() for f in feats]
        out = fn(fs, (13, 19), mode=mode, align_corners=align_corners)
        return torch.autograd.grad(out, fs, grad)

    got, want = grads(msfast.upsample_concat), grads(ref_upsample_concat)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == feats[i].shape
        torch.testing.assert_close(g, w, **GRAD_TOL, msg=lambda m, i=i: f"features[{i}]: {m}")


def test_upsample_concat_grad_only_some_features_require_grad(device, gen):
    a = randn(gen, 2, 3, 9, 11, device=device, requires_grad=True)
    b = randn(gen, 2, 2, 4, 5, device=device)
    out = msfast.upsample_concat([a, b], (7, 8), mode="bicubic")
    assert out.requires_grad
    (out * out).sum().backward()
    assert b.grad is None
    ar = a.detach().clone().requires_grad_()
    ref = ref_upsample_concat([ar, b], (7, 8), mode="bicubic")
    (ref * ref).sum().backward()
    torch.testing.assert_close(a.grad, ar.grad, **GRAD_TOL)


def test_uint8_pyramid_is_not_differentiable(device, gen):
    x = torch.randint(0, 256, (1, 3, 8, 8), generator=gen, dtype=torch.uint8).to(device)
    assert not any(lv.requires_grad for lv in msfast.pyramid(x, scales=[0.5, 2.0]))


# ----------------------------------------------------------------------- unused levels


@pytest.mark.parametrize("used", [[0], [1], [2], [0, 2]], ids=str)
@pytest.mark.parametrize("by", ["scales", "sizes"])
def test_pyramid_unused_levels(used, by, device, gen):
    x = randn(gen, 2, 3, 17, 23, device=device, requires_grad=True)
    levels = dict(scales=[1.0, 0.5, 1.7]) if by == "scales" else dict(sizes=[(17, 23), (8, 11), (28, 39)])
    out = msfast.pyramid(x, mode="bicubic", std=STD, **levels)
    sum(out[k].sum() for k in used).backward()
    xr = x.detach().clone().requires_grad_()
    ref = ref_pyramid(xr, mode="bicubic", std=STD, **levels)
    sum(ref[k].sum() for k in used).backward()
    torch.testing.assert_close(x.grad, xr.grad, **GRAD_TOL)


def test_unused_levels_get_no_zero_gradients(device, gen):
    """A level the loss does not use reaches the backward as None, not as a tensor of zeros
    allocated, filled and resampled for nothing (set_materialize_grads(false))."""
    x = randn(gen, 2, 3, 16, 12, device=device, requires_grad=True)
    levels = msfast.pyramid(x, [1.0, 0.5, 0.25])
    with DispatchLog() as log:
        levels[1].sum().backward()
    grads = [a[0] for f, a in log.calls if f == torch.ops.msfast.pyramid_backward.default]
    assert len(grads) == 1 and grads[0][0] is None and grads[0][2] is None and grads[0][1] is not None
    names = {str(f) for f, _ in log.calls}
    assert not any("zero" in n or "fill" in n for n in names), names
    xr = x.detach().requires_grad_(True)
    ref_pyramid(xr, [1.0, 0.5, 0.25])[1].sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, **GRAD_TOL)
    # a graph that reaches the pyramid with no gradient at all (a backward returning None)

    class Cut(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a.clone()

        @staticmethod
        def backward(ctx, g):
            return None

    gx = torch.autograd.grad(Cut.apply(levels[0]).sum(), x, allow_unused=True)[0]
    assert gx is None


def test_pyramid_unused_levels_double_backward(device, gen):
    x = randn(gen, 1, 2, 7, 9, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda x: msfast.pyramid(x, scales=SCALES, mode="bilinear")[1]
    assert gradcheck(fn, (x,), fast_mode=True, **EVERY_MODE)
    assert gradgradcheck(fn, (x,), fast_mode=True, **EVERY_SECOND)


# ------------------------------------------------------------------------- determinism


def _pyramid_fwd_bwd(x, gy_gen_seed):
    x = x.detach().requires_grad_()
    levels = msfast.pyramid(x, scales=[1.0, 0.5, 1.7, 0.3], mode="bicubic", mean=MEAN, std=STD)
    g = torch.Generator().manual_seed(gy_gen_seed)
    grads = [torch.randn(lv.shape, generator=g).to(x.device) for lv in levels]
    (gx,) = torch.autograd.grad(levels, x, grads)
    return [lv.detach() for lv in levels], gx


def _concat_fwd_bwd(feats, seed):
    fs = [f.detach().requires_grad_() for f in feats]
    out = msfast.upsample_concat(fs, (80, 96), mode="bilinear")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    return [out.detach()], list(torch.autograd.grad(out, fs, g))


def _assert_bitwise(a, b):
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"tensor {i} differs"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_backward_is_bitwise_reproducible(layout, device, gen):
    cl = layout == "channels_last"
    x = randn(gen, 2, 3, 48, 64, device=device, channels_last=cl)
    out1, gx1 = _pyramid_fwd_bwd(x, 7)
    out2, gx2 = _pyramid_fwd_bwd(x, 7)
    _assert_bitwise(out1, out2)
    assert torch.equal(gx1, gx2)
    feats = [randn(gen, 2, c, h, w, device=device, channels_last=cl) for c, h, w in [(4, 80, 96), (8, 40, 48),
                                                                                      (16, 10, 12)]]
    o1, g1 = _concat_fwd_bwd(feats, 3)
    o2, g2 = _concat_fwd_bwd(feats, 3)
    _assert_bitwise(o1, o2)
    _assert_bitwise(g1, g2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_results_do_not_depend_on_thread_count(layout, dtype, gen):
    """CPU: one thread and two threads give bitwise identical forward and backward results.

    The tensors are large enough (> 64K output values) that the parallel loop really splits
    (an NCHW concat's rows into a dozen chunks, taken from both ends).
    """
    cl = layout == "channels_last"
    x = randn(gen, 2, 3, 96, 128, dtype=dtype, channels_last=cl)
    feats = [randn(gen, 2, c, h, w, dtype=dtype, channels_last=cl)
             for c, h, w in [(4, 80, 96), (8, 40, 48), (16, 10, 12)]]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        p1 = _pyramid_fwd_bwd(x, 11)
        c1 = _concat_fwd_bwd(feats, 5)
        torch.set_num_threads(2)
        assert torch.get_num_threads() == 2
        p2 = _pyramid_fwd_bwd(x, 11)
        c2 = _concat_fwd_bwd(feats, 5)
    finally:
        torch.set_num_threads(threads)
    _assert_bitwise(p1[0], p2[0])
    assert torch.equal(p1[1], p2[1])
    _assert_bitwise(c1[0], c2[0])
    _assert_bitwise(c1[1], c2[1])


def test_autograd_nodes_are_cpp(gen):
    """The formulas run in C++ (csrc/autograd.cpp): a Python autograd layer cost about 100 us per
    grad-mode call, more than a small call's kernel."""
    x = randn(gen, 1, 2, 8, 8, requires_grad=True)
    levels = msfast.pyramid(x, [1.0, 0.5])
    assert "CppNode" in levels[0].grad_fn.name() and "PyramidFn" in levels[0].grad_fn.name()
    out = msfast.upsample_concat([x, levels[1]], (8, 8))
    assert "UpsampleConcatFn" in out.grad_fn.name()
    g = randn(gen, *out.shape, requires_grad=True)
    (gx,) = torch.autograd.grad(out, x, g, create_graph=True)
    # through the pyramid level and the concat: a sum of two backward nodes
    names = {gx.grad_fn.name()} | {fn.name() for fn, _ in gx.grad_fn.next_functions if fn is not None}
    assert any("PyramidBackwardFn" in n or "UpsampleConcatBackwardFn" in n for n in names), names
