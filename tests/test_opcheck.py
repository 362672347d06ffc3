"""torch.library.opcheck on every msfast operator, and torch.compile(fullgraph=True) of both."""

from __future__ import annotations

import pytest
import torch
from conftest import GRAD_TOL, randint_u8, randn, ref_pyramid, ref_upsample_concat, tol
from torch.library import opcheck

import msfast

ops = torch.ops.msfast
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def _x(gen, device, dtype=torch.float64, channels_last=False, requires_grad=True):
    return randn(gen, 2, 3, 7, 9, dtype=dtype, device=device, channels_last=channels_last,
                 requires_grad=requires_grad)


# Each case: (id, builder(gen, device) -> (op, args, kwargs)).
PYRAMID_CASES = {
    "by_scales_bilinear_aa": lambda g, d: (
        ops.pyramid.default, (_x(g, d), [7, 9, 3, 4, 11, 15], [1.0, 0.5, 1.7], "bilinear", True, False, None, None,
                              None), {}),
    "by_scales_area_channels_last": lambda g, d: (
        ops.pyramid.default, (_x(g, d, channels_last=True), [4, 5, 11, 15], [0.6, 1.7], "area", False, False, None,
                              [2.0, 3.0, 4.0], None), {}),
    "by_sizes_bicubic_mean_std": lambda g, d: (
        ops.pyramid.default, (_x(g, d), [3, 4, 5, 6], [], "bicubic", False, True, [0.1, 0.2, 0.3], [1.0, 2.0, 3.0],
                              None), {}),
    "by_sizes_nearest_channels_last_float32": lambda g, d: (
        ops.pyramid.default, (_x(g, d, torch.float32, channels_last=True), [3, 4, 14, 18], [], "nearest", False,
                              False, None, None, None), {}),
    "by_sizes_uint8_mean_std_half": lambda g, d: (
        ops.pyramid.default, (randint_u8(g, 2, 3, 7, 9, device=d), [3, 4, 5, 6], [], "bilinear", True, False, MEAN,
                              STD, torch.float16), {}),
    "by_scales_uint8_nhwc_mean_std": lambda g, d: (
        ops.pyramid.default, (randint_u8(g, 2, 7, 9, 3, device=d).permute(0, 3, 1, 2), [3, 4, 14, 18], [0.5, 2.0],
                              "nearest-exact", False, False, MEAN, STD, None), {}),
}

PYRAMID_BACKWARD_CASES = {
    "by_scales_with_none": lambda g, d: (
        ops.pyramid_backward.default,
        ([randn(g, 2, 3, 3, 4, dtype=torch.float64, device=d, requires_grad=True), None,
          randn(g, 2, 3, 11, 15, dtype=torch.float64, device=d, requires_grad=True)],
         [2, 3, 7, 9], [0.5, 1.0, 1.7], "bilinear", True, False, [1.0, 2.0, 3.0], torch.float64, False,
         False), {}),
    "by_sizes_channels_last": lambda g, d: (
        ops.pyramid_backward.default,
        ([randn(g, 2, 3, 3, 4, dtype=torch.float64, device=d, channels_last=True, requires_grad=True),
          randn(g, 2, 3, 9, 5, dtype=torch.float64, device=d, channels_last=True, requires_grad=True)],
         [2, 3, 7, 9], [], "bicubic", False, True, None, torch.float64, True, True), {}),
    "float32_grads_to_float16": lambda g, d: (
        ops.pyramid_backward.default,
        ([randn(g, 2, 3, 3, 4, device=d)], [2, 3, 7, 9], [], "area", False, False, None, torch.float16, False,
         False), {}),
    "nearest_formulas_of_another_layout": lambda g, d: (
        ops.pyramid_backward.default,
        ([randn(g, 2, 5, 70, 90, dtype=torch.float64, device=d, requires_grad=True)], [2, 5, 12, 27], [], "nearest",
         False, False, None, torch.float64, False, True), {}),
}

CONCAT_CASES = {
    "bilinear_nchw": lambda g, d: (
        ops.upsample_concat.default,
        ([randn(g, 2, 3, 7, 9, dtype=torch.float64, device=d, requires_grad=True),
          randn(g, 2, 2, 3, 4, dtype=torch.float64, device=d, requires_grad=True)], [5, 6], "bilinear", False), {}),
    "bicubic_ac_mixed_layouts": lambda g, d: (
        ops.upsample_concat.default,
        ([randn(g, 2, 3, 7, 9, device=d, channels_last=True, requires_grad=True),
          randn(g, 2, 2, 3, 4, device=d, requires_grad=True)], [5, 6], "bicubic", True), {}),
    "nearest_exact_no_grad": lambda g, d: (
        ops.upsample_concat.default,
        ([randn(g, 2, 3, 7, 9, device=d), randn(g, 2, 2, 3, 4, device=d)], [8, 3], "nearest-exact", False), {}),
}

CONCAT_OUT_CASES = {
    "nearest_nchw_out": lambda g, d: (
        ops.upsample_concat.out,
        ([randn(g, 2, 3, 7, 9, device=d), randn(g, 2, 2, 3, 4, device=d)], [5, 6], "nearest", False),
        {"out": torch.empty(2, 5, 5, 6, device=d)}),
    "bilinear_channels_last_out": lambda g, d: (
        ops.upsample_concat.out,
        ([randn(g, 2, 3, 7, 9, device=d), randn(g, 2, 2, 3, 4, device=d)], [5, 6], "bilinear", True),
        {"out": torch.empty(2, 5, 5, 6, device=d).contiguous(memory_format=torch.channels_last)}),
}

CONCAT_BACKWARD_CASES = {
    "bilinear_nchw": lambda g, d: (
        ops.upsample_concat_backward.default,
        (randn(g, 2, 5, 5, 6, dtype=torch.float64, device=d, requires_grad=True), [3, 7, 9, 2, 3, 4], "bilinear",
         False, False, [False, False]), {}),
    "bicubic_ac_channels_last": lambda g, d: (
        ops.upsample_concat_backward.default,
        (randn(g, 2, 5, 5, 6, device=d, channels_last=True, requires_grad=True), [3, 7, 9, 2, 3, 4], "bicubic",
         True, True, [True, True]), {}),
    "nearest": lambda g, d: (
        ops.upsample_concat_backward.default,
        (randn(g, 2, 4, 6, 6, dtype=torch.float64, device=d, requires_grad=True), [1, 2, 3, 3, 13, 4], "nearest",
         False, False, [True, False]), {}),
}


def _params(cases: dict, prefix: str):
    return [pytest.param(build, id=f"{prefix}-{name}") for name, build in cases.items()]


ALL_CASES = (_params(PYRAMID_CASES, "pyramid") + _params(PYRAMID_BACKWARD_CASES, "pyramid_backward")
             + _params(CONCAT_CASES, "upsample_concat") + _params(CONCAT_OUT_CASES, "upsample_concat.out")
             + _params(CONCAT_BACKWARD_CASES, "upsample_concat_backward"))


@pytest.mark.parametrize("build", ALL_CASES)
def test_opcheck(build, device, gen):
    op, args, kwargs = build(gen, device)
    result = opcheck(op, args, kwargs)
    assert result, "opcheck ran no sub-test"
    assert all(v == "SUCCESS" for v in result.values()), result


# --------------------------------------------------------------------------- torch.compile


def _model(x, feats, by_sizes=False):
    if by_sizes:
        levels = msfast.pyramid(x, sizes=[(16, 20), (8, 10), (5, 7)], mode="bicubic", std=[0.5, 2.0, 1.0])
    else:
        levels = msfast.pyramid(x, scales=[1.0, 0.5, 0.3], mode="bicubic", std=[0.5, 2.0, 1.0])
    y = msfast.upsample_concat(levels + feats, (12, 15), mode="bilinear")
    return y, (y * y).sum()


def _check_compiled(backend, by_sizes, device, gen, dynamic=None):
    x = randn(gen, 2, 3, 16, 20, device=device, requires_grad=True)
    feats = [randn(gen, 2, 4, 4, 5, device=device, channels_last=True, requires_grad=True)]
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, f: _model(x, f, by_sizes), backend=backend, fullgraph=True, dynamic=dynamic)
    y, loss = compiled(x, feats)
    grads = torch.autograd.grad(loss, [x, *feats])
    y_ref, loss_ref = _model(x, feats, by_sizes)
    grads_ref = torch.autograd.grad(loss_ref, [x, *feats])
    torch.testing.assert_close(y, y_ref, **tol(torch.float32))
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, **GRAD_TOL)
    # and against the pure-PyTorch oracle
    oracle = ref_upsample_concat(ref_pyramid(x.detach(), scales=None if by_sizes else [1.0, 0.5, 0.3],
                                             sizes=[(16, 20), (8, 10), (5, 7)] if by_sizes else None,
                                             mode="bicubic", std=[0.5, 2.0, 1.0]) + [f.detach() for f in feats],
                                 (12, 15))
    torch.testing.assert_close(y.detach(), oracle, **tol(torch.float32, upscale=True))


def test_compile_inductor_fullgraph(device, gen):
    _check_compiled("inductor", False, device, gen)


@pytest.mark.parametrize("by_sizes", [False, True], ids=["by_scales", "by_sizes"])
def test_compile_aot_eager_fullgraph(by_sizes, device, gen):
    _check_compiled("aot_eager", by_sizes, device, gen)


def test_compile_aot_eager_dynamic_shapes(device, gen):
    def fn(x, feats):
        levels = msfast.pyramid(x, scales=[1.0, 0.5], mode="bilinear")
        return msfast.upsample_concat(levels + feats, (x.shape[2], x.shape[3]))

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    for shape in [(2, 3, 16, 20), (1, 3, 18, 26), (3, 3, 9, 11)]:
        x = randn(gen, *shape, device=device, requires_grad=True)
        feats = [randn(gen, shape[0], 2, 4, 5, device=device, requires_grad=True)]
        y = compiled(x, feats)
        y_ref = fn(x, feats)
        assert y.shape == y_ref.shape == (shape[0], 8, shape[2], shape[3])
        torch.testing.assert_close(y, y_ref, **tol(torch.float32))
        (gx,) = torch.autograd.grad(y.sum(), x)
        (gx_ref,) = torch.autograd.grad(y_ref.sum(), x)
        torch.testing.assert_close(gx, gx_ref, **GRAD_TOL)


def test_compile_uint8_normalize_inference(device, gen):
    x = randint_u8(gen, 2, 16, 20, 3, device=device).permute(0, 3, 1, 2)
    fn = lambda x: msfast.pyramid(x, scales=[1.0, 0.5], mean=MEAN, std=STD, out_dtype=torch.float16)
    torch._dynamo.reset()
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(x)
    for g, r in zip(got, fn(x)):
        assert g.dtype == torch.float16
        torch.testing.assert_close(g, r, **tol(torch.float16))


def test_compile_upsample_concat_out(device, gen):
    feats = [randn(gen, 2, 3, 7, 9, device=device), randn(gen, 2, 2, 3, 4, device=device)]
    out = torch.empty(2, 5, 5, 6, device=device)
    fn = lambda feats, out: msfast.upsample_concat(feats, (5, 6), out=out)
    torch._dynamo.reset()
    res = torch.compile(fn, backend="aot_eager", fullgraph=True)(feats, out)
    torch.testing.assert_close(out, ref_upsample_concat(feats, (5, 6)), **tol(torch.float32))
    torch.testing.assert_close(res, out, rtol=0, atol=0)
