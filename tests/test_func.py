"""torch.func transforms and forward-mode AD (msfast/_func.py).

F.interpolate works under vmap, grad, vjp, jvp, jacrev, jacfwd and hessian, and with
forward-mode AD; so must msfast. Checked here:
- vmap (of msfast.* and of the raw operators: the operators' batching kernels) equals a loop
  over the samples, in values (bitwise for the nearest modes; the others can take another summation
  path for another N, an ulp apart) and in layout, for per-sample layouts that fold into N as
  a view and for those that need a copy (the batch inside, channels_last not dense), in the
  modes whose formulas depend on the layout (nearest with h + w > 128 and more than 3
  channels); test_fuzz.py fuzzes the same over every layout;
- every transform, and forward-mode AD, gives the reference path's results (F.interpolate);
- gradcheck with forward-mode AD and its batched checks, gradgradcheck forward-over-reverse;
- the older vmap (torch._vmap_internals) of autograd.grad(is_grads_batched=True) and of
  torch.autograd.functional's vectorized jacobian and hessian;
- the gradients of torch.func.grad (the operators' own nodes) equal, bit for bit, those of
  loss.backward() (their C++ Function); each route records the node it should; the raw
  operators under transforms and with dual tensors;
- per-sample gradients of MultiScaleResNet (vmap of grad of functional_call), msfast against
  the torch backend; torch.compile of vmap, of grad and of vmap of grad, each whole.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import randn

import msfast
from msfast import reference
from msfast.models import MultiScaleResNet

OPS = torch.ops.msfast
F64 = {"rtol": 1e-10, "atol": 1e-10}

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's forward AD scripts a helper

B, N = 3, 2


def _like_a_loop(mode, dtype=torch.float64):
    """How close a vmapped call is to the same call per sample: the nearest modes copy values,
    the others sum taps in an order that can depend on the batch size (the CPU kernels'
    small-plane path, for one), an ulp or so apart."""
    if mode.startswith("nearest"):
        return {"rtol": 0, "atol": 0}
    return {"rtol": 1e-14, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-6}


def _physical(gen, layout, C, H, W, device, dtype=torch.float64):
    """(tensor, in_dim): B samples of [N, C, H, W], each in `layout`, stored as vmap finds them."""
    if layout == "nchw":
        return randn(gen, B, N, C, H, W, dtype=dtype, device=device), 0
    if layout == "channels_last":  # folds into N as a view
        return randn(gen, B, N, H, W, C, dtype=dtype, device=device).permute(0, 1, 4, 2, 3), 0
    if layout == "batch_inside":  # the batch between N and C: folding it copies
        return randn(gen, N, B, C, H, W, dtype=dtype, device=device), 1
    if layout == "sliced_channels_last":  # each sample channels_last but not dense
        return randn(gen, B, N, H, W, C + 1, dtype=dtype, device=device).permute(0, 1, 4, 2, 3)[:, :, :C], 0
    if layout == "channels_last_gapped":  # dense channels_last samples, a gap between them: a copy
        return randn(gen, B, N + 1, H, W, C, dtype=dtype, device=device).permute(0, 1, 4, 2, 3)[:, :N], 0
    if layout == "channels_last_batch_last":  # channels_last strides, the batch innermost
        return randn(gen, N, H, W, C, B, dtype=dtype, device=device).permute(4, 0, 3, 1, 2), 0
    raise ValueError(layout)


VMAP_LAYOUTS = ["nchw", "channels_last", "batch_inside", "sliced_channels_last", "channels_last_gapped",
                "channels_last_batch_last"]

# (input C, H, W, pyramid keyword arguments): the nearest calls have more than 3 channels and
# levels of h + w > 128, where ATen's two CPU nearest kernels, chosen by layout, disagree.
PYRAMID_VMAP_CALLS = [
    ((5, 2, 56), dict(sizes=[(127, 92), (3, 40)], mode="nearest")),
    ((5, 3, 50), dict(sizes=[(120, 77)], mode="nearest-exact", mean=[0.1, 0.2, 0.3, 0.4, 0.5])),
    ((3, 13, 11), dict(scales=[0.5, 1.7], mean=[0.1, -0.2, 0.3], std=[0.5, 2.0, 1.5])),
    ((4, 9, 12), dict(scales=[0.6], mode="bicubic", align_corners=True, out_dtype=torch.float32)),
]


def _sample_layout(t):
    return (t.is_contiguous(), t.is_contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize("layout", VMAP_LAYOUTS)
@pytest.mark.parametrize("shape,kw", PYRAMID_VMAP_CALLS, ids=lambda v: str(v)[:40])
def test_vmap_pyramid_equals_a_loop(layout, shape, kw, device, gen):
    x, in_dim = _physical(gen, layout, *shape, device)
    got = torch.vmap(lambda t: msfast.pyramid(t, **kw), in_dims=in_dim)(x)
    samples = [x.select(in_dim, b) for b in range(B)]
    loops = [msfast.pyramid(s, **kw) for s in samples]
    refs = [reference.pyramid(s, **kw) for s in samples]
    for k, level in enumerate(got):
        assert level.shape[0] == B
        for b in range(B):
            torch.testing.assert_close(level[b], loops[b][k], **_like_a_loop(kw.get("mode", "bilinear")))
            torch.testing.assert_close(level[b], refs[b][k], **(F64 if level.dtype == torch.float64 else {}))
            assert _sample_layout(level[b]) == _sample_layout(loops[b][k])


def test_vmap_uint8_preprocessing_equals_a_loop(device, gen):
    """Per-sample preprocessing of uint8 NHWC images (permuted, read in place) under vmap."""
    images = torch.randint(0, 256, (B, N, 20, 24, 3), generator=gen, dtype=torch.uint8).to(device)
    kw = dict(scales=[1.0, 0.5], mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    x = images.permute(0, 1, 4, 2, 3)
    got = torch.vmap(lambda t: msfast.pyramid(t, **kw))(x)
    for b in range(B):
        for level, loop, ref in zip(got, msfast.pyramid(x[b], **kw), reference.pyramid(x[b], **kw)):
            torch.testing.assert_close(level[b], loop, **_like_a_loop("bilinear", torch.float32))
            torch.testing.assert_close(level[b], ref)
            assert _sample_layout(level[b]) == _sample_layout(loop)


def _concat_features(gen, layout, device):
    """Features of upsample_concat: a batched one in `layout`, an NCHW one unbatched (the same
    for every sample), a batched channels_last one; the nearest calls resize to h + w > 128."""
    a, da = _physical(gen, layout, 5, 2, 56, device)
    b = randn(gen, N, 4, 3, 5, dtype=torch.float64, device=device)
    c, dc = _physical(gen, "channels_last", 6, 7, 9, device)
    return [a, b, c], [da, None, dc]


@pytest.mark.parametrize("layout", VMAP_LAYOUTS)
@pytest.mark.parametrize("mode", ["nearest", "nearest-exact", "bilinear", "bicubic"])
def test_vmap_upsample_concat_equals_a_loop(layout, mode, device, gen):
    feats, dims = _concat_features(gen, layout, device)
    size = (127, 92) if mode.startswith("nearest") else (11, 13)
    got = torch.vmap(lambda *f: msfast.upsample_concat(list(f), size, mode=mode), in_dims=tuple(dims))(*feats)
    for b in range(B):
        sample = [f if d is None else f.select(d, b) for f, d in zip(feats, dims)]
        loop = msfast.upsample_concat(sample, size, mode=mode)
        torch.testing.assert_close(got[b], loop, **_like_a_loop(mode))
        torch.testing.assert_close(got[b], reference.upsample_concat(sample, size, mode=mode), **F64)
        assert _sample_layout(got[b]) == _sample_layout(loop)


def test_vmap_of_the_raw_operators(device, gen):
    """The batching kernels serve torch.ops.msfast.* directly, the backward operators included: an
    unbatched gradient is the same for every sample, a missing one (None) stays missing."""
    x, _ = _physical(gen, "channels_last", 3, 10, 12, device)
    flat, scales = [5, 6, 20, 24], [0.5, 2.0]
    levels = torch.vmap(lambda t: OPS.pyramid(t, flat, scales, "bilinear", True, False, None, [2.0, 3.0, 4.0],
                                              None))(x)
    for b in range(B):
        for got, want in zip(levels, OPS.pyramid(x[b], flat, scales, "bilinear", True, False, None,
                                                   [2.0, 3.0, 4.0], None)):
            torch.testing.assert_close(got[b], want, **_like_a_loop("bilinear"))

    g0 = randn(gen, B, N, 3, 5, 6, dtype=torch.float64, device=device)
    g1 = randn(gen, N, 3, 20, 24, dtype=torch.float64, device=device)
    args = ([N, 3, 10, 12], scales, "bilinear", True, False, [2.0, 3.0, 4.0], torch.float64, True, True)
    for grads, dims in [([g0, g1], ([0, None],)), ([g0, None], ([0, None],))]:
        gx = torch.vmap(lambda gs: OPS.pyramid_backward(gs, *args), in_dims=dims)(grads)
        for b in range(B):
            want = OPS.pyramid_backward([grads[0][b], grads[1]], *args)
            torch.testing.assert_close(gx[b], want, **_like_a_loop("bilinear"))

    feats = [randn(gen, B, N, 2, 4, 5, dtype=torch.float64, device=device),
             randn(gen, N, 3, 9, 8, dtype=torch.float64, device=device)]
    out = torch.vmap(lambda fs: OPS.upsample_concat(fs, [7, 6], "bicubic", True), in_dims=([0, None],))(feats)
    g = randn(gen, B, N, 5, 7, 6, dtype=torch.float64, device=device)
    parts = torch.vmap(lambda t: OPS.upsample_concat_backward(t, [2, 4, 5, 3, 9, 8], "bicubic", True, False,
                                                              [False, False]))(g)
    for b in range(B):
        torch.testing.assert_close(out[b], OPS.upsample_concat([feats[0][b], feats[1]], [7, 6], "bicubic", True),
                                   **_like_a_loop("bilinear"))
        want = OPS.upsample_concat_backward(g[b], [2, 4, 5, 3, 9, 8], "bicubic", True, False, [False, False])
        for p, w in zip(parts, want):
            torch.testing.assert_close(p[b], w, **_like_a_loop("bilinear"))


def test_vmap_with_regular_autograd_and_nested_vmaps(monkeypatch, gen):
    """vmap folds the batch in the operators' batching kernels: with regular autograd through
    the vmap (the C++ autograd of the folded call), with vmaps nested (the inner one batching
    other tensors than msfast's input), and inside grad."""
    from msfast import _func

    folds = []
    monkeypatch.setattr(_func, "_batched_pyramid", lambda *a, _f=_func._batched_pyramid: folds.append(1) or _f(*a))
    kw = dict(scales=[0.5, 1.5], mean=[0.1, 0.2, 0.3], std=[0.5, 2.0, 4.0])
    x = randn(gen, B, N, 3, 7, 9, dtype=torch.float64).requires_grad_()
    feats = [randn(gen, B, N, 2, 4, 5, dtype=torch.float64).requires_grad_(),
             randn(gen, N, 3, 9, 8, dtype=torch.float64)]

    def f(y, f0, f1):
        levels = msfast.pyramid(y, **kw)
        return levels[0].sum() * levels[1] + msfast.upsample_concat([f0, f1], (10, 14))[:, :3].mean()

    got = torch.vmap(f, in_dims=(0, 0, None))(x, *feats)
    assert len(folds) == 1
    weights = randn(gen, *got.shape, dtype=torch.float64)
    grads = torch.autograd.grad((got * weights).sum(), (x, feats[0]))

    def f_ref(y, f0, f1):
        levels = reference.pyramid(y, **kw)
        return levels[0].sum() * levels[1] + reference.upsample_concat([f0, f1], (10, 14))[:, :3].mean()

    want = torch.stack([f_ref(x[b], feats[0][b], feats[1]) for b in range(B)])
    torch.testing.assert_close(got, want, **F64)
    for g, w in zip(grads, torch.autograd.grad((want * weights).sum(), (x, feats[0]))):
        torch.testing.assert_close(g, w, **F64)

    # Nested: the outer vmap batches x, the inner one only z.
    z = randn(gen, 4, N, 3, 10, 13, dtype=torch.float64)
    nested = torch.vmap(lambda y: torch.vmap(lambda w: msfast.pyramid(y, **kw)[1] * w)(z))(x.detach())
    for b in range(B):
        torch.testing.assert_close(nested[b], msfast.pyramid(x[b].detach(), **kw)[1] * z, **F64)

    folds.clear()
    got = torch.func.grad(lambda y: torch.vmap(lambda w: msfast.pyramid(w, **kw)[0].sum())(y).sum())(x.detach())
    want = torch.func.grad(lambda y: torch.vmap(lambda w: reference.pyramid(w, **kw)[0].sum())(y).sum())(x.detach())
    assert folds
    torch.testing.assert_close(got, want, **F64)


# ---------------------------------------------------------------- transforms against the reference

# Small calls (jacobians are dense): the pyramid with mean/std and two levels, upsample_concat
# of two features. Nearest outputs stay at h + w <= 128, where ATen's nearest backward is the
# adjoint of its forward (README: Where F.interpolate itself is wrong).
PYRAMID_KW = [
    dict(scales=[0.5, 1.5], mean=[0.1, 0.2, 0.3], std=[0.5, 2.0, 4.0]),
    dict(sizes=[(3, 7), (9, 4)], mode="bicubic", align_corners=True),
    dict(scales=[0.7], mode="nearest-exact"),
    dict(scales=[0.5], mode="area"),
]


def _pyramid_loss(impl, kw, weights):
    def loss(x):
        return sum((level * w).sum() for level, w in zip(impl(x, **kw), weights))

    return loss


def _pyramid_outputs(impl, kw):
    return lambda x: torch.cat([level.flatten() for level in impl(x, **kw)])


def _transforms(loss, outputs, x, v, t):
    """What each transform gives for a scalar loss and a vector of outputs, at x, with a
    cotangent v of the outputs and a tangent t of x."""
    return {
        "grad": torch.func.grad(loss)(x),
        "vjp": torch.func.vjp(outputs, x)[1](v)[0],
        "jacrev": torch.func.jacrev(outputs)(x),
        "jvp": torch.func.jvp(outputs, (x,), (t,))[1],
        "jacfwd": torch.func.jacfwd(outputs)(x),
        "hessian": torch.func.hessian(lambda y: loss(y) ** 2)(x),
        "vmap_grad": torch.func.vmap(torch.func.grad(loss))(torch.stack([x, t])),
        "grad_vmap": torch.func.grad(lambda y: torch.func.vmap(loss)(y).sum())(torch.stack([x, t])),
        "jvp_of_vjp": torch.func.jvp(lambda y: torch.func.vjp(outputs, y)[1](v)[0], (x,), (t,))[1],
    }


@pytest.mark.parametrize("kw", PYRAMID_KW, ids=lambda kw: f"{kw.get('mode', 'bilinear')}")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_pyramid_transforms_match_reference(kw, channels_last, device, gen):
    x = randn(gen, 1, 3, 6, 5, dtype=torch.float64, device=device, channels_last=channels_last)
    t = torch.randn_like(x)
    sizes = [level.shape for level in reference.pyramid(x, **kw)]
    weights = [randn(gen, *s, dtype=torch.float64, device=device) for s in sizes]
    v = randn(gen, sum(s.numel() for s in sizes), dtype=torch.float64, device=device)
    got = _transforms(_pyramid_loss(msfast.pyramid, kw, weights), _pyramid_outputs(msfast.pyramid, kw), x, v, t)
    want = _transforms(_pyramid_loss(reference.pyramid, kw, weights), _pyramid_outputs(reference.pyramid, kw),
                       x, v, t)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **F64, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest", "nearest-exact"])
def test_upsample_concat_transforms_match_reference(mode, device, gen):
    # The two features are one tensor's halves along W, so that one input carries them; the
    # second is channels_last.
    x = randn(gen, 1, 3, 4, 10, dtype=torch.float64, device=device)

    def impl_of(fn):
        def features(y):
            return [y[:, :2, :, :5], y[:, :, :, 5:].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)]

        return lambda y, **kw: [fn(features(y), (7, 6), mode=mode)]

    t = torch.randn_like(x)
    weights = [randn(gen, 1, 5, 7, 6, dtype=torch.float64, device=device)]
    v = randn(gen, 5 * 7 * 6, dtype=torch.float64, device=device)
    got = _transforms(_pyramid_loss(impl_of(msfast.upsample_concat), {}, weights),
                      _pyramid_outputs(impl_of(msfast.upsample_concat), {}), x, v, t)
    want = _transforms(_pyramid_loss(impl_of(reference.upsample_concat), {}, weights),
                       _pyramid_outputs(impl_of(reference.upsample_concat), {}), x, v, t)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **F64, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_forward_ad_matches_reference(grad_mode, device, gen):
    x = randn(gen, 2, 3, 8, 7, dtype=torch.float64, device=device, channels_last=True)
    t = randn(gen, 2, 3, 8, 7, dtype=torch.float64, device=device)  # a tangent in another layout
    feats = [randn(gen, 2, 2, 4, 4, dtype=torch.float64, device=device), x]
    kw = dict(scales=[0.5, 1.25], mean=[0.1, 0.2, 0.3], std=[0.5, 2.0, 4.0])
    with fwAD.dual_level(), torch.set_grad_enabled(grad_mode):
        dual = fwAD.make_dual(x, t)
        for got, want in zip(msfast.pyramid(dual, **kw), reference.pyramid(dual, **kw)):
            torch.testing.assert_close(fwAD.unpack_dual(got).tangent, fwAD.unpack_dual(want).tangent, **F64)
            torch.testing.assert_close(fwAD.unpack_dual(got).primal, fwAD.unpack_dual(want).primal, **F64)
        got = msfast.upsample_concat([feats[0], dual], (6, 9), mode="bicubic")
        want = reference.upsample_concat([feats[0], dual], (6, 9), mode="bicubic")
        torch.testing.assert_close(fwAD.unpack_dual(got).tangent, fwAD.unpack_dual(want).tangent, **F64)


def test_raw_operators_under_transforms(gen):
    """torch.ops.msfast.* themselves work under grad-like transforms and with dual tensors, the
    backward operators included: their autograd (csrc/autograd.cpp) is what msfast.* run."""
    x = randn(gen, 2, 3, 8, 9, dtype=torch.float64)
    feat = randn(gen, 2, 2, 5, 4, dtype=torch.float64)
    args = ([4, 4, 12, 13], [0.5, 1.5], "bicubic", True, False, [0.1, 0.2, 0.3], [0.5, 2.0, 4.0], None)
    kw = dict(scales=[0.5, 1.5], mode="bicubic", align_corners=False, mean=[0.1, 0.2, 0.3], std=[0.5, 2.0, 4.0])

    def raw(y, f):
        levels = OPS.pyramid(y, *args)
        return (levels[0].sum(0) * levels[1][:, :, :4, :4]).sum() + OPS.upsample_concat([f, y], [7, 7], "bilinear",
                                                                                          False).square().sum()

    def ref(y, f):
        levels = reference.pyramid(y, **kw)
        return (levels[0].sum(0) * levels[1][:, :, :4, :4]).sum() + reference.upsample_concat([f, y], (7, 7)
                                                                                              ).square().sum()

    for transform in (torch.func.grad, torch.func.hessian):
        got = transform(raw, argnums=(0, 1))(x, feat)
        want = transform(ref, argnums=(0, 1))(x, feat)
        torch.testing.assert_close(got, want, **F64)
    t = randn(gen, *x.shape, dtype=torch.float64)
    for grad_mode in (True, False):
        with fwAD.dual_level(), torch.set_grad_enabled(grad_mode):
            got = [fwAD.unpack_dual(v).tangent for v in OPS.pyramid(fwAD.make_dual(x, t), *args)]
            want = [fwAD.unpack_dual(v).tangent for v in reference.pyramid(fwAD.make_dual(x, t), **kw)]
        torch.testing.assert_close(got, want, **F64)


def test_nodes_of_each_route(gen):
    """Plain autograd records the operators' C++ Function (which compiled autograd traces); with
    forward-mode tangents, and under torch.func's transforms (which refuse a C++ Function), the
    operators record nodes of their own, with the same formulas."""
    x = randn(gen, 1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    plain = msfast.pyramid(x, scales=[0.5])[0]
    assert plain.grad_fn.name() != "msfast::PyramidBackward"
    with fwAD.dual_level():
        dual = msfast.pyramid(fwAD.make_dual(x, torch.ones_like(x)), scales=[0.5])[0]
        assert dual.grad_fn.name() == "msfast::PyramidBackward"
        torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, msfast.pyramid(torch.ones_like(x), scales=[0.5])[0])
    (g_plain,) = torch.autograd.grad(plain.sum(), x)
    (g_dual,) = torch.autograd.grad(dual.sum(), x)
    torch.testing.assert_close(g_dual, g_plain, rtol=0, atol=0)


def test_gradcheck_in_every_mode(gen):
    """gradcheck with forward-mode AD and the batched checks (the backward and the forward under
    vmap), gradgradcheck forward-over-reverse and batched."""
    x = randn(gen, 2, 3, 6, 7, dtype=torch.float64, channels_last=True).requires_grad_()
    checks = dict(check_forward_ad=True, check_batched_grad=True, check_batched_forward_grad=True)
    second = dict(check_fwd_over_rev=True, check_batched_grad=True)

    def pyr(y):
        return msfast.pyramid(y, scales=[0.5, 1.3], mode="bicubic", mean=[0.1, 0.2, 0.3], std=[0.5, 2.0, 3.0])

    assert torch.autograd.gradcheck(pyr, (x,), **checks)
    assert torch.autograd.gradgradcheck(pyr, (x,), **second)
    feats = (randn(gen, 2, 2, 3, 4, dtype=torch.float64).requires_grad_(),
             randn(gen, 2, 4, 6, 5, dtype=torch.float64, channels_last=True).requires_grad_())
    for mode in ("bilinear", "nearest"):
        def cat(a, b, mode=mode):
            return msfast.upsample_concat([a, b], (5, 7), mode=mode)

        assert torch.autograd.gradcheck(cat, feats, **checks)
        assert torch.autograd.gradgradcheck(cat, feats, **second)


def test_older_vmap_batched_gradients_and_jacobians(device, gen):
    """torch.autograd.grad(is_grads_batched=True) and torch.autograd.functional's vectorized
    jacobian and hessian run under torch._vmap_internals (csrc/legacy_vmap.cpp), nested for the
    hessian: the reference's results, and each sample's layout."""
    x = randn(gen, 2, 3, 7, 6, dtype=torch.float64, device=device, channels_last=True)
    kw = dict(scales=[0.5, 1.5], mode="bicubic", mean=[0.1, 0.2, 0.3], std=[0.5, 2.0, 3.0])
    leaf = x.clone().requires_grad_()
    for impl in (msfast.pyramid, reference.pyramid):
        levels = impl(leaf, **kw)
        cot = [randn(torch.Generator().manual_seed(k), 4, *lv.shape, dtype=torch.float64, device=device)
               for k, lv in enumerate(levels)]
        batched = torch.autograd.grad(levels, leaf, cot, is_grads_batched=True)[0]
        if impl is msfast.pyramid:
            got = batched
            for b in range(4):
                assert _sample_layout(got[b]) == _sample_layout(torch.autograd.grad(levels, leaf, [c[b] for c in cot],
                                                                                    retain_graph=True)[0])
    torch.testing.assert_close(got, batched, **F64)

    def outputs(impl):
        return lambda y: torch.cat([lv.flatten() for lv in impl(y, **kw)])

    def loss(impl):
        return lambda y: (outputs(impl)(y) ** 2).sum()

    small = x[:1, :, :4, :5]
    for fn in (lambda f: torch.autograd.functional.jacobian(outputs(f), small, vectorize=True),
               lambda f: torch.autograd.functional.hessian(loss(f), small, vectorize=True)):
        torch.testing.assert_close(fn(msfast.pyramid), fn(reference.pyramid), **F64)
    feats = [randn(gen, 1, 2, 3, 4, dtype=torch.float64, device=device), small]

    def fused(impl):
        return lambda a, b: impl([a, b], (5, 6), mode="bilinear").flatten()

    torch.testing.assert_close(torch.autograd.functional.jacobian(fused(msfast.upsample_concat), tuple(feats),
                                                                  vectorize=True),
                               torch.autograd.functional.jacobian(fused(reference.upsample_concat), tuple(feats),
                                                                  vectorize=True), **F64)


def test_func_grad_equals_cpp_autograd_bitwise(gen):
    """torch.func.grad records the operators' own nodes, loss.backward() their C++ Function
    (test_nodes_of_each_route): the same formulas, the same bits."""
    x = randn(gen, 2, 4, 30, 20, channels_last=True)
    feats = [randn(gen, 2, 3, 8, 5), randn(gen, 2, 2, 40, 41)]

    def loss(y, *fs):
        levels = msfast.pyramid(y, scales=[0.5, 0.25], mean=[0.1, 0.2, 0.3, 0.4])
        fused = msfast.upsample_concat([levels[0], *fs], (15, 10), mode="nearest")
        return (levels[1] * levels[1]).sum() + (fused * fused.detach()).sum()

    got = torch.func.grad(loss, argnums=(0, 1, 2))(x, *feats)
    leaves = [t.clone().requires_grad_() for t in (x, *feats)]
    out = loss(*leaves)
    assert not isinstance(out.grad_fn.next_functions[0][0], torch.autograd.function.BackwardCFunction)
    out.backward()
    for g, leaf in zip(got, leaves):
        torch.testing.assert_close(g, leaf.grad, rtol=0, atol=0)


def test_upsample_concat_out_under_vmap(gen):
    feats = [randn(gen, B, N, 2, 3, 4, dtype=torch.float64), randn(gen, B, N, 3, 5, 5, dtype=torch.float64)]
    out = torch.empty(B, N, 5, 6, 6, dtype=torch.float64)
    torch.vmap(lambda a, b, o: msfast.upsample_concat([a, b], (6, 6), out=o))(*feats, out)
    for b in range(B):
        torch.testing.assert_close(out[b], msfast.upsample_concat([feats[0][b], feats[1][b]], (6, 6)),
                                   **_like_a_loop("bilinear"))


def test_per_sample_gradients_of_the_model(gen):
    """vmap(grad(functional_call)) of MultiScaleResNet: the msfast backend gives the per-sample
    gradients of the torch backend."""
    kw = dict(num_classes=3, depth=18, width=4, stem="small", scales=(1.0, 0.5), mean=[0.5] * 3, std=[0.25] * 3)
    torch.manual_seed(0)
    models = {b: MultiScaleResNet(**kw, backend=b).eval() for b in ("msfast", "torch")}
    models["torch"].load_state_dict(models["msfast"].state_dict())
    images = randn(gen, 4, 3, 16, 16)
    labels = torch.tensor([0, 2, 1, 0])
    grads = {}
    for backend, model in models.items():
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.detach() for k, v in model.named_buffers()}

        def loss(p, image, label, model=model, buffers=buffers):
            logits = torch.func.functional_call(model, (p, buffers), (image[None],))
            return torch.nn.functional.cross_entropy(logits, label[None])

        grads[backend] = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, images, labels)
    for k, g in grads["torch"].items():
        assert g.shape[0] == 4
        torch.testing.assert_close(grads["msfast"][k], g, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_compile_of_transforms(gen):
    x = randn(gen, 2, 3, 9, 8, dtype=torch.float64)

    def level(y):
        return msfast.pyramid(y, scales=[0.5], mean=[0.1, 0.2, 0.3])[0]

    def loss(y):
        return (level(y) ** 2).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = x[None].expand(3, -1, -1, -1, -1)
        batched = torch.compile(torch.vmap(level), backend="aot_eager", fullgraph=True)(batch)
        grad = torch.compile(torch.func.grad(loss), backend="aot_eager", fullgraph=True)(x)
        per_sample = torch.compile(torch.vmap(torch.func.grad(loss)), backend="aot_eager", fullgraph=True)(batch)
    torch.testing.assert_close(batched, torch.vmap(level)(batch), rtol=0, atol=0)
    torch.testing.assert_close(grad, torch.func.grad(loss)(x), rtol=0, atol=0)
    torch.testing.assert_close(per_sample, torch.vmap(torch.func.grad(loss))(batch), rtol=0, atol=0)
    torch.testing.assert_close(grad, torch.func.grad(lambda y: (reference.pyramid(
        y, scales=[0.5], mean=[0.1, 0.2, 0.3])[0] ** 2).sum())(x), **F64)
