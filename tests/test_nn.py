"""msfast.nn modules: the msfast and torch backends agree in values and gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import GRAD_TOL, randint_u8, randn, tol

from msfast.nn import ImagePyramid, UpsampleConcat

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]

PYRAMID_CONFIGS = [
    dict(scales=[1.0, 0.5, 0.25]),
    dict(scales=[0.6, 1.7], mode="bicubic", align_corners=True, antialias=False),
    dict(sizes=[(8, 10), (5, 40)], mode="area", mean=MEAN, std=STD),
    dict(sizes=[(3, 4), 6], mode="nearest-exact"),
    dict(scales=[0.5], mode="bilinear", out_dtype=torch.float64, std=STD),
]


@pytest.mark.parametrize("cfg", PYRAMID_CONFIGS, ids=lambda c: "-".join(f"{k}" for k in c))
def test_image_pyramid_backends_agree(cfg, device, gen):
    x = randn(gen, 2, 3, 17, 23, device=device, channels_last=True)
    fast, slow = ImagePyramid(**cfg), ImagePyramid(**cfg, backend="torch")
    assert fast.backend == "msfast" and slow.backend == "torch"
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = fast(xa), slow(xb)
    assert len(a) == len(b)
    out_dtype = cfg.get("out_dtype", torch.float32)
    for la, lb in zip(a, b):
        assert la.dtype == lb.dtype == out_dtype and la.shape == lb.shape
        torch.testing.assert_close(la, lb, **tol(out_dtype, upscale=True))
    w = [randn(gen, *lv.shape, dtype=lv.dtype, device=device) for lv in a]
    sum((lv * wk).sum() for lv, wk in zip(a, w)).backward()
    sum((lv * wk).sum() for lv, wk in zip(b, w)).backward()
    torch.testing.assert_close(xa.grad, xb.grad, **GRAD_TOL)


def test_image_pyramid_uint8(device, gen):
    x = randint_u8(gen, 2, 17, 23, 3, device=device).permute(0, 3, 1, 2)
    # area: the torch backend has no float16 antialias kernel on CPU
    cfg = dict(scales=[1.0, 0.5], mode="area", mean=MEAN, std=STD, out_dtype=torch.float16)
    for la, lb in zip(ImagePyramid(**cfg)(x), ImagePyramid(**cfg, backend="torch")(x)):
        assert la.dtype == torch.float16
        torch.testing.assert_close(la, lb, **tol(torch.float16))


UPSAMPLE_CONFIGS = [
    dict(),
    dict(size=(9, 13), mode="bicubic", align_corners=True),
    dict(size=12, mode="nearest"),
    dict(mode="nearest-exact"),
]


@pytest.mark.parametrize("cfg", UPSAMPLE_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_upsample_concat_backends_agree(cfg, device, gen):
    specs = [(3, 17, 23), (4, 9, 12), (2, 5, 6)]
    feats = [randn(gen, 2, c, h, w, device=device) for c, h, w in specs]
    fast, slow = UpsampleConcat(**cfg), UpsampleConcat(**cfg, backend="torch")
    fa = [f.clone().requires_grad_() for f in feats]
    fb = [f.clone().requires_grad_() for f in feats]
    a, b = fast(fa), slow(fb)
    size = cfg.get("size", (17, 23))
    size = (size, size) if isinstance(size, int) else size
    assert a.shape == b.shape == (2, 9, *size)
    torch.testing.assert_close(a, b, **tol(torch.float32, upscale=True))
    w = randn(gen, *a.shape, device=device)
    (a * w).sum().backward()
    (b * w).sum().backward()
    for ga, gb in zip(fa, fb):
        torch.testing.assert_close(ga.grad, gb.grad, **GRAD_TOL)


def test_upsample_concat_forward_size_overrides(device, gen):
    feats = [randn(gen, 1, 2, 8, 8, device=device), randn(gen, 1, 1, 4, 4, device=device)]
    m = UpsampleConcat(size=(5, 5))
    assert m(feats).shape == (1, 3, 5, 5)
    assert m(feats, size=(3, 7)).shape == (1, 3, 3, 7)
    torch.testing.assert_close(m(feats, size=(3, 7)), UpsampleConcat(backend="torch")(feats, size=(3, 7)),
                               **tol(torch.float32))


def test_modules_in_a_sequential_pipeline(gen):
    x = randn(gen, 2, 3, 16, 20)
    model = torch.nn.Sequential(ImagePyramid(scales=[1.0, 0.5, 0.25]), UpsampleConcat())
    ref = torch.nn.Sequential(ImagePyramid(scales=[1.0, 0.5, 0.25], backend="torch"), UpsampleConcat(backend="torch"))
    out = model(x)
    assert out.shape == (2, 9, 16, 20)
    torch.testing.assert_close(out, ref(x), **tol(torch.float32))
    assert "backend='msfast'" in repr(model) and "scales=[1.0, 0.5, 0.25]" in repr(model)


@pytest.mark.parametrize("backend", ["cuda", "", "Torch", None])
def test_invalid_backend(backend):
    with pytest.raises(ValueError, match="backend"):
        ImagePyramid(scales=[0.5], backend=backend)
    with pytest.raises(ValueError, match="backend"):
        UpsampleConcat(backend=backend)


def test_image_pyramid_needs_exactly_one_of_scales_sizes():
    with pytest.raises(ValueError, match="exactly one of scales or sizes"):
        ImagePyramid()
    with pytest.raises(ValueError, match="exactly one of scales or sizes"):
        ImagePyramid(scales=[0.5], sizes=[(3, 4)])


@pytest.mark.parametrize("backend", ["msfast", "torch"])
def test_module_errors_name_the_argument(backend, gen):
    with pytest.raises(ValueError, match="mode"):
        ImagePyramid(scales=[0.5], mode="foo", backend=backend)(randn(gen, 1, 3, 8, 8))
    with pytest.raises(TypeError, match="features"):
        UpsampleConcat(backend=backend)(randn(gen, 1, 3, 8, 8))
    with pytest.raises(TypeError, match="features"):
        UpsampleConcat(backend=backend)([])
