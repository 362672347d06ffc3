"""Property-based parity (hypothesis): drawn shapes, scales or sizes, modes, align_corners, antialias,
dtypes, normalization and memory layouts (channels_last, permuted, sliced, strided, transposed,
expanded and zero-stride views), forward and backward, against the pure-PyTorch reference.

Reproducible: derandomized, no example database (MSFAST_FUZZ=N: N times the examples from a random
seed, see conftest.py). Shapes stay small so each test runs in seconds.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    CONCAT_MODES,
    FLOAT_DTYPES,
    GRAD_TOL,
    INTERPOLATING,
    MODES,
    aa_weights,
    fuzz_settings,
    level_dtype,
    ref_pyramid,
    ref_upsample_concat,
    tol,
)
from hypothesis import given
from hypothesis import strategies as st

import msfast
from msfast import reference
from msfast._args import is_channels_last

NEAREST = ("nearest", "nearest-exact")

# Each layout builds a leaf tensor (what autograd differentiates) and an [N, C, H, W] view of it.
LAYOUTS = {
    "contiguous": (lambda N, C, H, W: (N, C, H, W), lambda t, N, C, H, W: t),
    "channels_last": (lambda N, C, H, W: (N, C, H, W), lambda t, N, C, H, W: t),
    "nhwc_permuted": (lambda N, C, H, W: (N, H, W, C), lambda t, N, C, H, W: t.permute(0, 3, 1, 2)),
    "sliced": (lambda N, C, H, W: (N + 1, C + 2, H + 3, W + 2),
               lambda t, N, C, H, W: t[1:, 1 : C + 1, 2 : H + 2, 1 : W + 1]),
    "strided": (lambda N, C, H, W: (N, C, 2 * H, 3 * W), lambda t, N, C, H, W: t[:, :, ::2, ::3]),
    "transposed": (lambda N, C, H, W: (N, C, W, H), lambda t, N, C, H, W: t.transpose(2, 3)),
    "channels_last_sliced": (lambda N, C, H, W: (N, C + 1, H, W + 1), lambda t, N, C, H, W: t[:, 1:, :, 1:]),
    "expanded_batch": (lambda N, C, H, W: (1, C, H, W), lambda t, N, C, H, W: t.expand(N, C, H, W)),
    "zero_stride_rows": (lambda N, C, H, W: (N, C, 1, W), lambda t, N, C, H, W: t.expand(N, C, H, W)),
    "zero_stride_channels": (lambda N, C, H, W: (N, 1, H, W), lambda t, N, C, H, W: t.expand(N, C, H, W)),
    # channels_last strides that are not dense: one image broadcast to a batch (ATen calls it
    # NCHW, its normalized copy channels_last), and every other column.
    "channels_last_expanded": (lambda N, C, H, W: (1, C, H, W), lambda t, N, C, H, W: t.expand(N, C, H, W)),
    "channels_last_strided": (lambda N, C, H, W: (N, C, H, 2 * W), lambda t, N, C, H, W: t[..., ::2]),
}
CL_LEAF = ("channels_last", "channels_last_sliced", "channels_last_expanded", "channels_last_strided")


def _make(seed, shape, dtype, layout, device, requires_grad=False):
    """(leaf, view): random values (bytes for uint8) in the given layout."""
    leaf_shape, view = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        leaf = torch.randint(0, 256, leaf_shape(*shape), generator=g, dtype=torch.uint8)
    else:
        leaf = torch.randn(leaf_shape(*shape), generator=g, dtype=torch.float64).to(dtype)
    leaf = leaf.to(device)
    if layout in CL_LEAF:
        leaf = leaf.contiguous(memory_format=torch.channels_last)
    leaf.requires_grad_(requires_grad)
    x = view(leaf, *shape)
    assert tuple(x.shape) == tuple(shape)
    return leaf, x


def _format(t):
    return t.is_contiguous(), t.is_contiguous(memory_format=torch.channels_last)


def _assert_close(got, want, dtype, exact, what):
    if exact:
        assert torch.equal(got, want), f"{what}: not bitwise equal, max diff {(got - want).abs().max()}"
    else:
        torch.testing.assert_close(got, want, **tol(dtype, upscale=True), msg=lambda m: f"{what}: {m}")


def _grad_tol(dtype):
    return {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else GRAD_TOL


# ------------------------------------------------------------------------------ pyramid


@st.composite
def pyramid_calls(draw, dtypes):
    N, C = draw(st.integers(1, 2)), draw(st.integers(1, 4))
    H, W = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    mode = draw(st.sampled_from(MODES))
    if mode in INTERPOLATING:
        antialias = draw(st.sampled_from([None, True, False]))
        align_corners = draw(st.sampled_from([None, False, True]))
    else:
        antialias, align_corners = draw(st.sampled_from([None, False])), None
    kw = dict(mode=mode, antialias=antialias, align_corners=align_corners)
    if draw(st.booleans()):
        # 1.05: an axis that keeps its size but is resampled by 1 / 1.05.
        scale = st.one_of(st.sampled_from([1.0, 1.05, 2.0, 0.5, 0.25, 3.0]), st.floats(0.05, 3.5))
        kw["scales"] = draw(st.lists(scale.filter(lambda s: int(H * s) >= 1 and int(W * s) >= 1),
                                     min_size=1, max_size=3))
    else:
        kw["sizes"] = draw(st.lists(st.tuples(st.integers(1, 16), st.integers(1, 16)), min_size=1, max_size=3))
    dtype = draw(st.sampled_from(dtypes))
    if draw(st.booleans()):
        kw["mean"] = draw(st.lists(st.floats(-1, 1), min_size=C, max_size=C))
    if draw(st.booleans()):
        kw["std"] = draw(st.lists(st.floats(0.5, 2) | st.floats(-2, -0.5), min_size=C, max_size=C))
    if dtype == torch.uint8 or draw(st.booleans()):
        kw["out_dtype"] = draw(st.sampled_from([None, *(d for d in dtypes if d != torch.uint8)]))
    layout = draw(st.sampled_from(list(LAYOUTS)))
    return (N, C, H, W), dtype, layout, draw(st.integers(0, 2**16)), kw


def _aa(kw):
    return kw["mode"] in INTERPOLATING and kw["antialias"] is not False


def _exact_aa_levels(x, kw):
    """Antialiased levels from the separable weight matrices of the definition, in float64 (and
    differentiable): F.interpolate is not the oracle here, as ATen's CPU antialias kernel is
    wrong where an axis keeps its size under a scale other than 1 (test_pyramid.py)."""
    H, W = x.shape[2], x.shape[3]
    xn = reference.normalize(x, torch.float64, kw.get("mean"), kw.get("std"))
    if "scales" in kw:
        levels = [(int(H * s), int(W * s), s) for s in kw["scales"]]
    else:
        levels = [(h, w, None) for h, w in kw["sizes"]]
    ac = bool(kw["align_corners"])
    out = []
    for h, w, s in levels:
        mh = aa_weights(H, h, kw["mode"], ac, s).to(x.device)
        mw = aa_weights(W, w, kw["mode"], ac, s).to(x.device)
        out.append(mh @ xn @ mw.T)
    return out


def _oracle_is_the_reference(x, kw):
    """Whether _oracle is the reference path itself (whose levels also have the memory format
    F.interpolate gives them), not exact weights or the reference of x in float64."""
    out_dtype = level_dtype(x.dtype, kw.get("out_dtype"))
    return not _aa(kw) and not (out_dtype in (torch.float16, torch.bfloat16) and kw["mode"] not in NEAREST)


def _oracle(x, kw):
    if _aa(kw):
        return _exact_aa_levels(x, kw)
    if not _oracle_is_the_reference(x, kw):
        # The reference in 16 bits rounds the normalized input and its intermediate sums to 16
        # bits: a float16 bicubic level of an input divided by std = 0.547 came out up to 14 ulps
        # from the exact values, where msfast (float32 sums, one rounding) was within half an ulp
        # (found by a longer run of this test). So the oracle is the reference in float64. Not for
        # the nearest modes: they sum nothing, and their source index is computed in the
        # tensor's op type (float for 16 bits), which in float64 picks other pixels at ties.
        return ref_pyramid(x if x.dtype == torch.uint8 else x.double(), **dict(kw, out_dtype=torch.float64))
    return ref_pyramid(x, **kw)


def _exact(device, kw, in_dtype, out_dtype):
    """Nearest modes copy values: bitwise equal on the CPU unless there is arithmetic to round."""
    return (device == "cpu" and kw["mode"] in NEAREST and in_dtype == out_dtype and kw.get("mean") is None
            and kw.get("std") is None)


@fuzz_settings(100)
@given(call=pyramid_calls(dtypes=(torch.uint8, *FLOAT_DTYPES)))
def test_pyramid_forward(device, call):
    shape, dtype, layout, seed, kw = call
    _, x = _make(seed, shape, dtype, layout, device)
    out = msfast.pyramid(x, **kw)
    ref = _oracle(x, kw)
    out_dtype = level_dtype(dtype, kw.get("out_dtype"))
    assert len(out) == len(ref)
    for k, (o, r) in enumerate(zip(out, ref)):
        assert o.shape == r.shape and o.dtype == out_dtype and o.device == x.device, k
        # The levels' memory format is the reference's, but for an input of one pixel in a
        # batch of one: there the reference's `x / std` (std shaped [1, C, 1, 1], the same shape)
        # takes TensorIterator's contiguous fast path and makes x_norm NCHW whatever x's strides.
        if _oracle_is_the_reference(x, kw) and x.shape[0] * x.shape[2] * x.shape[3] > 1:
            assert _format(o) == _format(r), f"level {k}: strides {o.stride()}, the reference's {r.stride()}"
        _assert_close(o, r.to(out_dtype), out_dtype, _exact(device, kw, dtype, out_dtype), f"level {k}")


@fuzz_settings(60)
@given(call=pyramid_calls(dtypes=(torch.float32, torch.float64)))
def test_pyramid_backward(device, call):
    """The gradient is the adjoint of the reference forward: <grad, v> = <g, F(v)> for random v.

    ATen's own backward is no oracle here: its bicubic backward copies the gradient where an axis
    keeps its size under a scale other than 1, while its forward (and msfast's) resamples it."""
    shape, dtype, layout, seed, kw = call
    kw.pop("out_dtype", None)  # gradients flow in the input's dtype
    kw.pop("mean", None)  # the gradient of the affine normalization is its linear part
    leaf, x = _make(seed, shape, dtype, layout, device, requires_grad=True)
    out = msfast.pyramid(x, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    grads = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device) for o in out]
    (got,) = torch.autograd.grad(out, leaf, grads)
    got = got.double()
    rtol = 1e-11 if dtype == torch.float64 else 1e-5
    for probe in range(3):
        v_leaf, v = _make(seed + 2 + probe, shape, torch.float64, layout, device)
        fv = _oracle(v, kw)
        lhs = (got * v_leaf).sum()
        rhs = sum((gk.double() * fk).sum() for gk, fk in zip(grads, fv))
        bound = rtol * (got.norm() * v_leaf.norm() + sum(gk.double().norm() * fk.norm() for gk, fk in zip(grads, fv)))
        assert abs(lhs - rhs) <= bound, f"probe {probe}: <grad, v> = {lhs.item()}, <g, F(v)> = {rhs.item()}"


# ------------------------------------------------------------------------ upsample_concat


@st.composite
def concat_calls(draw, dtypes):
    N = draw(st.integers(1, 2))
    feats = draw(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 10), st.integers(1, 10),
                                    st.sampled_from(list(LAYOUTS))), min_size=1, max_size=3))
    mode = draw(st.sampled_from(CONCAT_MODES))
    align_corners = draw(st.sampled_from([None, False, True])) if mode in INTERPOLATING else None
    size = draw(st.integers(1, 12) | st.tuples(st.integers(1, 12), st.integers(1, 12)))
    dtype = draw(st.sampled_from(dtypes))
    out = draw(st.sampled_from([None, "contiguous", "channels_last"]))
    return N, feats, dtype, draw(st.integers(0, 2**16)), dict(size=size, mode=mode, align_corners=align_corners), out


def _features(N, feats, dtype, seed, device, requires_grad=False):
    made = [_make(seed + i, (N, c, h, w), dtype, layout, device, requires_grad) for i, (c, h, w, layout) in
            enumerate(feats)]
    return [m[0] for m in made], [m[1] for m in made]


@fuzz_settings(100)
@given(call=concat_calls(dtypes=FLOAT_DTYPES))
def test_upsample_concat_forward(device, call):
    N, feats, dtype, seed, kw, out_layout = call
    _, xs = _features(N, feats, dtype, seed, device)
    size = kw["size"] if isinstance(kw["size"], tuple) else (kw["size"], kw["size"])
    want = ref_upsample_concat(xs, **kw)
    if out_layout is None:
        got = msfast.upsample_concat(xs, **kw)
        if size[0] * size[1] > 1:
            assert is_channels_last(got) == is_channels_last(xs[0])
    else:
        fmt = torch.channels_last if out_layout == "channels_last" else torch.contiguous_format
        out = torch.full(want.shape, float("nan"), dtype=dtype, device=device).contiguous(memory_format=fmt)
        got = msfast.upsample_concat(xs, **kw, out=out)
        assert got is out
    assert got.shape == (N, sum(f[0] for f in feats), *size) and got.dtype == dtype
    exact = device == "cpu" and kw["mode"] in NEAREST
    _assert_close(got, want, dtype, exact, "output")


@fuzz_settings(60)
@given(call=concat_calls(dtypes=(torch.float32, torch.float64)))
def test_upsample_concat_backward(device, call):
    N, feats, dtype, seed, kw, _ = call
    leaves, xs = _features(N, feats, dtype, seed, device, requires_grad=True)
    got_out = msfast.upsample_concat(xs, **kw)
    grad = torch.randn(got_out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grad = grad.to(dtype=dtype, device=device)
    got = torch.autograd.grad(got_out, leaves, grad)
    ref_leaves = [leaf.detach().clone().requires_grad_() for leaf in leaves]
    ref_xs = [LAYOUTS[layout][1](leaf, N, c, h, w) for leaf, (c, h, w, layout) in zip(ref_leaves, feats)]
    want = torch.autograd.grad(ref_upsample_concat(ref_xs, **kw), ref_leaves, grad)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **_grad_tol(dtype), msg=lambda m, i=i: f"features[{i}]: {m}")


# ------------------------------------------------------------------------------------ vmap


def _batched_leaf(seed, shape, dtype, layout, device, batch, bdim):
    """(physical, per-sample leaves): `batch` leaves as _make builds them, stored in one tensor
    whose dimension `bdim` is the batch and whose samples keep the leaves' strides; vmap over it
    and apply the layout's view inside to get samples in `layout`."""
    leaves = [_make(seed + b, shape, dtype, layout, device)[0] for b in range(batch)]
    first = leaves[0]
    physical = torch.empty_strided((batch, *first.shape), (first.numel(), *first.stride()), dtype=dtype,
                                   device=device)
    for b, leaf in enumerate(leaves):
        physical[b].copy_(leaf)
    return physical.movedim(0, bdim), leaves


def _assert_as_alone(got, want, dtype, exact, what):
    """A vmapped sample against the same call alone: bitwise where the values are copies (the
    nearest modes), else within the dtype's rounding (another N can take another summation path)."""
    assert _format(got) == _format(want), f"{what}: strides {got.stride()}, alone {want.stride()}"
    _assert_close(got, want, dtype, exact, what)


def _as_seen(t, strides):
    """t with the strides its vmapped twin had inside vmap. vmap can give a size-1 dimension
    another stride (its expand does), which the layout rule reads; a size-1 dimension's stride
    moves no element, so t's values stay where they are."""
    assert all(a == b or n == 1 for a, b, n in zip(t.stride(), strides, t.shape)), (t.stride(), strides)
    return t.as_strided(t.shape, strides, t.storage_offset())


@fuzz_settings(30)
@given(call=pyramid_calls(dtypes=(torch.uint8, *FLOAT_DTYPES)), bdim=st.integers(0, 4))
def test_pyramid_vmap_equals_a_loop(device, call, bdim):
    """torch.vmap over samples in every layout, the batch stored at any dimension (so that
    folding it into N is a view or a copy): each sample as msfast.pyramid gives it alone."""
    shape, dtype, layout, seed, kw = call
    bdim = min(bdim, len(LAYOUTS[layout][0](*shape)))
    physical, leaves = _batched_leaf(seed, shape, dtype, layout, device, 2, bdim)
    view, seen = LAYOUTS[layout][1], []

    def call_on(leaf):
        x = view(leaf, *shape)
        seen.append(x.stride())
        return msfast.pyramid(x, **kw)

    got = torch.vmap(call_on, in_dims=bdim)(physical)
    out_dtype = level_dtype(dtype, kw.get("out_dtype"))
    for b, leaf in enumerate(leaves):
        alone = msfast.pyramid(_as_seen(view(leaf, *shape), seen[0]), **kw)
        for k, (g, a) in enumerate(zip(got, alone)):
            _assert_as_alone(g[b], a, out_dtype, kw["mode"] in NEAREST, f"sample {b}, level {k}")


@fuzz_settings(30)
@given(call=concat_calls(dtypes=FLOAT_DTYPES), bdim=st.integers(0, 4))
def test_upsample_concat_vmap_equals_a_loop(device, call, bdim):
    N, feats, dtype, seed, kw, _ = call
    dims = tuple(min(bdim, len(LAYOUTS[layout][0](N, c, h, w))) for c, h, w, layout in feats)
    batched = [_batched_leaf(seed + 10 * i, (N, c, h, w), dtype, layout, device, 2, d)
               for i, ((c, h, w, layout), d) in enumerate(zip(feats, dims))]
    seen = []

    def views(leaves):
        return [LAYOUTS[layout][1](leaf, N, c, h, w) for leaf, (c, h, w, layout) in zip(leaves, feats)]

    def call_on(*leaves):
        xs = views(leaves)
        seen.extend(x.stride() for x in xs)
        return msfast.upsample_concat(xs, **kw)

    got = torch.vmap(call_on, in_dims=dims)(*(p for p, _ in batched))
    for b in range(2):
        xs = [_as_seen(x, st) for x, st in zip(views([leaves[b] for _, leaves in batched]), seen)]
        _assert_as_alone(got[b], msfast.upsample_concat(xs, **kw), dtype, kw["mode"] in NEAREST, f"sample {b}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_is_what_it_claims(layout):
    """The fuzzed layouts really are the strides they are named after."""
    leaf, x = _make(0, (2, 3, 4, 5), torch.float32, layout, "cpu")
    if layout in ("channels_last", "nhwc_permuted"):
        assert is_channels_last(x)
    elif layout == "contiguous":
        assert x.is_contiguous()
    else:
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    if layout.startswith(("expanded", "zero_stride")):
        assert 0 in x.stride()
