"""Bad inputs raise TypeError / ValueError naming the argument, in the public functions (msfast and
the reference path alike) and in the raw torch.ops, without crashing the process."""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import run_python

import msfast
from msfast import reference

NAN, INF = float("nan"), float("inf")


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype) if shape else torch.randn(2, 3, 8, 10).to(dtype)


PYRAMID_ERRORS = [
    # (id, exception, match, args, kwargs)
    ("x_3d", ValueError, r"x must be a 4-D", (_x(3, 8, 10),), dict(scales=[0.5])),
    ("x_5d", ValueError, r"x must be a 4-D", (_x(1, 2, 3, 8, 10),), dict(scales=[0.5])),
    ("x_not_tensor", TypeError, r"x must be a torch.Tensor", ([[1.0, 2.0]],), dict(scales=[0.5])),
    ("x_none", TypeError, r"x must be a torch.Tensor", (None,), dict(scales=[0.5])),
    ("x_int32", TypeError, r"x must have dtype", (_x(dtype=torch.int32),), dict(scales=[0.5])),
    ("x_int64", TypeError, r"x must have dtype", (_x(dtype=torch.int64),), dict(scales=[0.5])),
    ("x_int8", TypeError, r"x must have dtype", (_x(dtype=torch.int8),), dict(scales=[0.5])),
    ("x_bool", TypeError, r"x must have dtype", (_x() > 0,), dict(scales=[0.5])),
    ("x_complex", TypeError, r"x must have dtype", (_x(dtype=torch.complex64),), dict(scales=[0.5])),
    ("x_empty_channels", ValueError, r"x must have non-empty", (_x(2, 0, 8, 10),), dict(scales=[0.5])),
    ("x_empty_width", ValueError, r"x must have non-empty", (_x(2, 3, 8, 0),), dict(scales=[0.5])),
    ("both_scales_and_sizes", ValueError, r"exactly one of scales or sizes", (_x(),),
     dict(scales=[0.5], sizes=[(3, 4)])),
    ("neither_scales_nor_sizes", ValueError, r"exactly one of scales or sizes", (_x(),), {}),
    ("scale_nan", ValueError, r"scales\[1\] must be positive and finite", (_x(),), dict(scales=[0.5, NAN])),
    ("scale_inf", ValueError, r"scales\[1\] must be positive and finite", (_x(),), dict(scales=[0.5, INF])),
    ("scale_neg_inf", ValueError, r"scales\[0\] must be positive and finite", (_x(),), dict(scales=[-INF])),
    ("scale_zero", ValueError, r"scales\[1\] must be positive and finite", (_x(),), dict(scales=[0.5, 0.0])),
    ("scale_negative", ValueError, r"scales\[2\] must be positive and finite", (_x(),),
     dict(scales=[0.5, 1.0, -0.5])),
    ("scale_empty_level", ValueError, r"scales\[1\]=0.1 gives an empty level", (_x(),), dict(scales=[0.5, 0.1])),
    ("scale_empty_level_w", ValueError, r"scales\[0\]=0.01 gives an empty level", (_x(2, 3, 200, 10),),
     dict(scales=[0.01])),
    ("scales_empty_list", TypeError, r"scales must be a non-empty sequence", (_x(),), dict(scales=[])),
    ("scales_string", TypeError, r"scales must be a non-empty sequence", (_x(),), dict(scales="0.5")),
    ("scale_bool", TypeError, r"scales\[0\] must be a number", (_x(),), dict(scales=[True])),
    ("scale_string", TypeError, r"scales\[1\] must be a number", (_x(),), dict(scales=[0.5, "2"])),
    ("size_zero_h", ValueError, r"sizes\[0\]\[0\] must be >= 1", (_x(),), dict(sizes=[(0, 4)])),
    ("size_zero_w", ValueError, r"sizes\[1\]\[1\] must be >= 1", (_x(),), dict(sizes=[(3, 4), (4, 0)])),
    ("size_negative", ValueError, r"sizes\[0\]\[0\] must be >= 1", (_x(),), dict(sizes=[(-3, 4)])),
    ("size_int_zero", ValueError, r"sizes\[0\] must be >= 1", (_x(),), dict(sizes=[0])),
    ("size_float", TypeError, r"sizes\[0\]\[0\] must be an int", (_x(),), dict(sizes=[(3.5, 4)])),
    ("size_triple", TypeError, r"sizes\[0\] must be an int or an \(h, w\) pair", (_x(),), dict(sizes=[(3, 4, 5)])),
    ("sizes_empty", TypeError, r"sizes must be a non-empty sequence", (_x(),), dict(sizes=[])),
    ("sizes_ambiguous_pair", TypeError, r"sizes=\[3, 4\] is ambiguous", (_x(),), dict(sizes=[3, 4])),
    ("mode_foo", ValueError, r"mode must be one of", (_x(),), dict(scales=[0.5], mode="foo")),
    ("mode_none", ValueError, r"mode must be one of", (_x(),), dict(scales=[0.5], mode=None)),
    ("mode_case", ValueError, r"mode must be one of", (_x(),), dict(scales=[0.5], mode="Bilinear")),
    ("antialias_nearest", ValueError, r"antialias=True", (_x(),), dict(scales=[0.5], mode="nearest",
                                                                       antialias=True)),
    ("antialias_nearest_exact", ValueError, r"antialias=True", (_x(),),
     dict(scales=[0.5], mode="nearest-exact", antialias=True)),
    ("antialias_area", ValueError, r"antialias=True", (_x(),), dict(scales=[0.5], mode="area", antialias=True)),
    ("antialias_not_bool", TypeError, r"antialias must be a bool", (_x(),), dict(scales=[0.5], antialias="yes")),
    ("align_corners_nearest", ValueError, r"align_corners", (_x(),),
     dict(scales=[0.5], mode="nearest", align_corners=True)),
    ("align_corners_false_nearest_exact", ValueError, r"align_corners", (_x(),),
     dict(scales=[0.5], mode="nearest-exact", align_corners=False)),
    ("align_corners_area", ValueError, r"align_corners", (_x(),), dict(scales=[0.5], mode="area",
                                                                       align_corners=True)),
    ("align_corners_not_bool", TypeError, r"align_corners must be a bool", (_x(),),
     dict(scales=[0.5], align_corners=1)),
    ("mean_short", ValueError, r"mean must have one value per channel \(3\), got 2", (_x(),),
     dict(scales=[0.5], mean=[0.5, 0.5])),
    ("mean_long", ValueError, r"mean must have one value per channel \(3\), got 4", (_x(),),
     dict(scales=[0.5], mean=[0.5] * 4)),
    ("std_short", ValueError, r"std must have one value per channel \(3\), got 1", (_x(),),
     dict(scales=[0.5], std=[0.5])),
    ("std_zero", ValueError, r"std must not contain zeros", (_x(),), dict(scales=[0.5], std=[0.5, 0.0, 0.5])),
    ("mean_nan", ValueError, r"mean must be finite", (_x(),), dict(scales=[0.5], mean=[0.0, NAN, 0.0])),
    ("std_inf", ValueError, r"std must be finite", (_x(),), dict(scales=[0.5], std=[1.0, INF, 1.0])),
    ("mean_string", TypeError, r"mean must be a sequence of numbers", (_x(),), dict(scales=[0.5], mean="abc")),
    ("std_bools", TypeError, r"std must be a sequence of numbers", (_x(),),
     dict(scales=[0.5], std=[True, True, True])),
    ("out_dtype_int32", TypeError, r"out_dtype must be a floating dtype", (_x(),),
     dict(scales=[0.5], out_dtype=torch.int32)),
    ("out_dtype_uint8", TypeError, r"out_dtype must be a floating dtype", (_x(dtype=torch.uint8),),
     dict(scales=[0.5], out_dtype=torch.uint8)),
    ("out_dtype_complex", TypeError, r"out_dtype must be a floating dtype", (_x(),),
     dict(scales=[0.5], out_dtype=torch.complex64)),
    ("out_dtype_string", TypeError, r"out_dtype must be a floating dtype", (_x(),),
     dict(scales=[0.5], out_dtype="float32")),
]


@pytest.mark.parametrize("impl", [msfast.pyramid, reference.pyramid], ids=["msfast", "reference"])
@pytest.mark.parametrize("exc,match,args,kwargs", [pytest.param(*c[1:], id=c[0]) for c in PYRAMID_ERRORS])
def test_pyramid_errors(impl, exc, match, args, kwargs):
    with pytest.raises(exc, match=match):
        impl(*args, **kwargs)


def _f(c=2, h=5, w=6, n=2, dtype=torch.float32, device="cpu"):
    return torch.randn(n, c, h, w).to(dtype=dtype, device=device)


CONCAT_ERRORS = [
    ("features_empty", ValueError, r"features must be a non-empty list", ([], (4, 4)), {}),
    ("features_tensor", TypeError, r"features must be a list of tensors", (_f(), (4, 4)), {}),
    ("features_none", TypeError, r"features must be a list of tensors", (None, (4, 4)), {}),
    ("features_element_not_tensor", TypeError, r"features\[1\] must be a torch.Tensor", ([_f(), "a"], (4, 4)), {}),
    ("features_3d", ValueError, r"features\[1\] must be a 4-D", ([_f(), torch.randn(2, 5, 6)], (4, 4)), {}),
    ("features_5d", ValueError, r"features\[0\] must be a 4-D", ([torch.randn(1, 2, 2, 5, 6)], (4, 4)), {}),
    ("features_int32", TypeError, r"features\[0\] must have dtype", ([_f(dtype=torch.int32)], (4, 4)), {}),
    ("features_uint8", TypeError, r"features\[0\] must have dtype", ([_f(dtype=torch.uint8)], (4, 4)), {}),
    ("features_bool", TypeError, r"features\[1\] must have dtype", ([_f(), _f() > 0], (4, 4)), {}),
    ("features_complex", TypeError, r"features\[0\] must have dtype", ([_f(dtype=torch.complex64)], (4, 4)), {}),
    ("features_empty_channels", ValueError, r"features\[1\] must have non-empty", ([_f(), _f(c=0)], (4, 4)), {}),
    ("mixed_dtypes", TypeError, r"share one dtype.*features\[1\]", ([_f(), _f(dtype=torch.float64)], (4, 4)), {}),
    ("mixed_devices", ValueError, r"share one device.*features\[1\]", ([_f(), _f(device="meta")], (4, 4)), {}),
    ("mixed_devices_meta_first", ValueError, r"share one device.*features\[1\]",
     ([_f(device="meta"), _f()], (4, 4)), {}),
    ("batch_mismatch", ValueError, r"batch size N.*features\[2\]", ([_f(), _f(), _f(n=3)], (4, 4)), {}),
    ("size_zero", ValueError, r"size must be >= 1", ([_f()], 0), {}),
    ("size_zero_h", ValueError, r"size\[0\] must be >= 1", ([_f()], (0, 4)), {}),
    ("size_negative_w", ValueError, r"size\[1\] must be >= 1", ([_f()], (4, -1)), {}),
    ("size_float", TypeError, r"size\[0\] must be an int", ([_f()], (3.0, 4)), {}),
    ("size_triple", TypeError, r"size must be an int or an \(h, w\) pair", ([_f()], (3, 4, 5)), {}),
    ("size_none", TypeError, r"size must be an int or an \(h, w\) pair", ([_f()], None), {}),
    ("mode_area", ValueError, r"mode must be one of", ([_f()], (4, 4)), dict(mode="area")),
    ("mode_foo", ValueError, r"mode must be one of", ([_f()], (4, 4)), dict(mode="foo")),
    ("align_corners_nearest", ValueError, r"align_corners", ([_f()], (4, 4)),
     dict(mode="nearest", align_corners=True)),
    ("align_corners_nearest_exact", ValueError, r"align_corners", ([_f()], (4, 4)),
     dict(mode="nearest-exact", align_corners=False)),
    ("align_corners_not_bool", TypeError, r"align_corners must be a bool", ([_f()], (4, 4)),
     dict(align_corners="yes")),
    ("out_wrong_shape", ValueError, r"out must have shape \[2, 5, 4, 4\], got \[2, 4, 4, 4\]",
     ([_f(c=2), _f(c=3)], (4, 4)), dict(out=torch.empty(2, 4, 4, 4))),
    ("out_wrong_spatial", ValueError, r"out must have shape", ([_f()], (4, 4)), dict(out=torch.empty(2, 2, 4, 5))),
    ("out_wrong_dtype", TypeError, r"out must have dtype torch.float32, got torch.float64", ([_f()], (4, 4)),
     dict(out=torch.empty(2, 2, 4, 4, dtype=torch.float64))),
    ("out_wrong_device", ValueError, r"out must be on cpu", ([_f()], (4, 4)),
     dict(out=torch.empty(2, 2, 4, 4, device="meta"))),
    ("out_not_dense", ValueError, r"out must be contiguous", ([_f()], (4, 4)),
     dict(out=torch.empty(2, 2, 4, 8)[..., ::2])),
    ("out_not_tensor", TypeError, r"out must be a torch.Tensor", ([_f()], (4, 4)), dict(out=[0.0])),
]


@pytest.mark.parametrize("impl", [msfast.upsample_concat, reference.upsample_concat], ids=["msfast", "reference"])
@pytest.mark.parametrize("exc,match,args,kwargs", [pytest.param(*c[1:], id=c[0]) for c in CONCAT_ERRORS])
def test_upsample_concat_errors(impl, exc, match, args, kwargs):
    with pytest.raises(exc, match=match):
        impl(*args, **kwargs)


def test_errors_leave_out_untouched():
    out = torch.full((2, 2, 4, 4), 7.0)
    with pytest.raises(ValueError):
        msfast.upsample_concat([_f()], (4, 4), mode="nearest", align_corners=True, out=out)
    assert torch.equal(out, torch.full((2, 2, 4, 4), 7.0))


def test_meta_tensors_give_shapes_without_error():
    """Meta tensors are a supported device (shape inference), not an error."""
    levels = msfast.pyramid(torch.empty(2, 3, 8, 10, device="meta"), scales=[0.5, 2.0])
    assert [tuple(lv.shape) for lv in levels] == [(2, 3, 4, 5), (2, 3, 16, 20)]
    assert all(lv.device.type == "meta" for lv in levels)
    out = msfast.upsample_concat([torch.empty(2, 3, 8, 10, device="meta")] * 2, (7, 9))
    assert out.shape == (2, 6, 7, 9) and out.device.type == "meta"


# ---------------------------------------------------------------------------- raw ops

_RAW_PRELUDE = """
import torch
import msfast  # registers the operators

ops = torch.ops.msfast
x = torch.randn(1, 2, 5, 6)
f = torch.randn(1, 2, 3, 4)
g = torch.randn(1, 3, 4, 4)
f32 = torch.float32


def run(name, fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 -- report every kind, the test decides
        print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
    else:
        print(f"{name}: OK", flush=True)
"""

# name -> (call, expected exception class names)
RAW_ERRORS = {
    "pyr_3d": ("ops.pyramid(torch.randn(2, 5, 6), [3, 4], [], 'bilinear', True, False, None, None, None)",
               ("ValueError",)),
    "pyr_5d": ("ops.pyramid(torch.randn(1, 1, 2, 5, 6), [3, 4], [], 'bilinear', True, False, None, None, None)",
               ("ValueError",)),
    "pyr_int32": ("ops.pyramid(x.int(), [3, 4], [], 'bilinear', True, False, None, None, None)", ("TypeError",)),
    "pyr_bool": ("ops.pyramid(x > 0, [3, 4], [], 'nearest', False, False, None, None, None)", ("TypeError",)),
    "pyr_complex": ("ops.pyramid(x.to(torch.complex64), [3, 4], [], 'nearest', False, False, None, None, None)",
                    ("TypeError",)),
    "pyr_empty_c": ("ops.pyramid(torch.randn(1, 0, 5, 6), [3, 4], [], 'bilinear', True, False, None, None, None)",
                    ("ValueError",)),
    "pyr_empty_h": ("ops.pyramid(torch.randn(1, 2, 0, 6), [3, 4], [], 'bilinear', True, False, None, None, None)",
                    ("ValueError",)),
    "pyr_odd_sizes": ("ops.pyramid(x, [3], [], 'bilinear', True, False, None, None, None)", ("ValueError",)),
    "pyr_no_levels": ("ops.pyramid(x, [], [], 'bilinear', True, False, None, None, None)", ("ValueError",)),
    "pyr_zero_size": ("ops.pyramid(x, [0, 4], [], 'bilinear', True, False, None, None, None)", ("ValueError",)),
    "pyr_negative_size": ("ops.pyramid(x, [3, -4], [], 'bilinear', True, False, None, None, None)",
                          ("ValueError",)),
    "pyr_scales_count": ("ops.pyramid(x, [3, 4, 2, 2], [0.5], 'bilinear', True, False, None, None, None)",
                         ("ValueError",)),
    "pyr_scale_nan": ("ops.pyramid(x, [3, 4], [float('nan')], 'bilinear', True, False, None, None, None)",
                      ("ValueError",)),
    "pyr_scale_inf": ("ops.pyramid(x, [3, 4], [float('inf')], 'bilinear', True, False, None, None, None)",
                      ("ValueError",)),
    "pyr_scale_negative": ("ops.pyramid(x, [3, 4], [-0.5], 'bilinear', True, False, None, None, None)",
                           ("ValueError",)),
    "pyr_mode_foo": ("ops.pyramid(x, [3, 4], [], 'foo', False, False, None, None, None)", ("ValueError",)),
    "pyr_antialias_nearest": ("ops.pyramid(x, [3, 4], [], 'nearest', True, False, None, None, None)",
                              ("ValueError",)),
    "pyr_mean_length": ("ops.pyramid(x, [3, 4], [], 'bilinear', True, False, [0.5], None, None)", ("ValueError",)),
    "pyr_std_length": ("ops.pyramid(x, [3, 4], [], 'bilinear', True, False, None, [1.0, 2.0, 3.0], None)",
                       ("ValueError",)),
    "pyr_std_zero": ("ops.pyramid(x, [3, 4], [], 'bilinear', True, False, None, [1.0, 0.0], None)",
                     ("ValueError",)),
    "pyr_mean_nan": ("ops.pyramid(x, [3, 4], [], 'bilinear', True, False, [float('nan'), 0.0], None, None)",
                     ("ValueError",)),
    "pyr_out_dtype_int": ("ops.pyramid(x, [3, 4], [], 'bilinear', True, False, None, None, torch.int32)",
                          ("TypeError",)),
    "pyr_out_dtype_uint8": ("ops.pyramid(x, [3, 4], [], 'bilinear', True, False, None, None, torch.uint8)",
                            ("TypeError",)),
    "pyr_sizes_wrong_type": ("ops.pyramid(x, 'ab', [], 'bilinear', True, False, None, None, None)",
                             ("RuntimeError",)),
    "pyr_x_none": ("ops.pyramid(None, [3, 4], [], 'bilinear', True, False, None, None, None)",
                   ("RuntimeError", "NotImplementedError")),
    "pyb_no_grads": ("ops.pyramid_backward([None], [1, 2, 5, 6], [], 'bilinear', True, False, None, f32, False, False)",
                     ("RuntimeError", "NotImplementedError", "ValueError")),
    "pyb_empty_grads": ("ops.pyramid_backward([], [1, 2, 5, 6], [], 'bilinear', True, False, None, f32, False, False)",
                        ("RuntimeError", "NotImplementedError", "ValueError")),
    "pyb_shape_3": ("ops.pyramid_backward([f], [2, 5, 6], [], 'bilinear', True, False, None, f32, False, False)",
                    ("ValueError",)),
    "pyb_batch": ("ops.pyramid_backward([f], [2, 2, 5, 6], [], 'bilinear', True, False, None, f32, False, False)",
                  ("ValueError",)),
    "pyb_channels": ("ops.pyramid_backward([f], [1, 3, 5, 6], [], 'bilinear', True, False, None, f32, False, False)",
                     ("ValueError",)),
    "pyb_negative_shape": ("ops.pyramid_backward([f], [1, 2, -5, 6], [], 'bilinear', True, False, None, f32, "
                           "False, False)", ("RuntimeError", "ValueError")),
    "pyb_dtype_int": ("ops.pyramid_backward([f], [1, 2, 5, 6], [], 'bilinear', True, False, None, torch.int64, "
                      "False, False)", ("TypeError",)),
    "pyb_grad_int": ("ops.pyramid_backward([f.int()], [1, 2, 5, 6], [], 'bilinear', True, False, None, f32, False, "
                     "False)",
                     ("TypeError",)),
    "pyb_grad_3d": ("ops.pyramid_backward([torch.randn(2, 3, 4)], [1, 2, 5, 6], [], 'bilinear', True, False, None, "
                    "f32, False, False)", ("ValueError",)),
    "pyb_mixed_dtypes": ("ops.pyramid_backward([f, f.double()], [1, 2, 5, 6], [], 'bilinear', True, False, None, "
                         "f32, False, False)", ("TypeError",)),
    "pyb_scales_count": ("ops.pyramid_backward([f], [1, 2, 5, 6], [0.5, 0.5], 'bilinear', True, False, None, f32, "
                         "False, False)", ("ValueError",)),
    "pyb_std_zero": ("ops.pyramid_backward([f], [1, 2, 5, 6], [], 'bilinear', True, False, [0.0, 1.0], f32, False, "
                     "False)",
                     ("ValueError",)),
    "pyb_mode_foo": ("ops.pyramid_backward([f], [1, 2, 5, 6], [], 'foo', False, False, None, f32, False, False)",
                     ("ValueError",)),
    "pyb_antialias_nearest": ("ops.pyramid_backward([f], [1, 2, 5, 6], [], 'nearest', True, False, None, f32, "
                              "False, False)", ("ValueError",)),
    "uc_empty": ("ops.upsample_concat([], [3, 4], 'bilinear', False)",
                 ("RuntimeError", "NotImplementedError", "ValueError")),
    "uc_size_length": ("ops.upsample_concat([f], [3], 'bilinear', False)", ("ValueError",)),
    "uc_size_zero": ("ops.upsample_concat([f], [0, 4], 'bilinear', False)", ("ValueError",)),
    "uc_size_negative": ("ops.upsample_concat([f], [3, -4], 'bilinear', False)", ("ValueError",)),
    "uc_mode_area": ("ops.upsample_concat([f], [3, 4], 'area', False)", ("ValueError",)),
    "uc_mode_foo": ("ops.upsample_concat([f], [3, 4], 'foo', False)", ("ValueError",)),
    "uc_int": ("ops.upsample_concat([f.int()], [3, 4], 'nearest', False)", ("TypeError",)),
    "uc_3d": ("ops.upsample_concat([f, torch.randn(2, 3, 4)], [3, 4], 'nearest', False)", ("ValueError",)),
    "uc_mixed_dtypes": ("ops.upsample_concat([f, f.double()], [3, 4], 'nearest', False)", ("TypeError",)),
    "uc_batch": ("ops.upsample_concat([f, torch.randn(2, 2, 3, 4)], [3, 4], 'nearest', False)", ("ValueError",)),
    "uc_empty_channels": ("ops.upsample_concat([torch.randn(1, 0, 3, 4)], [3, 4], 'nearest', False)",
                          ("ValueError",)),
    "uco_shape": ("ops.upsample_concat.out([f], [3, 4], 'nearest', False, out=torch.empty(1, 3, 3, 4))",
                  ("ValueError",)),
    "uco_dtype": ("ops.upsample_concat.out([f], [3, 4], 'nearest', False, out=torch.empty(1, 2, 3, 4, "
                  "dtype=torch.float64))", ("TypeError",)),
    "uco_not_dense": ("ops.upsample_concat.out([f], [3, 4], 'nearest', False, "
                      "out=torch.empty(1, 2, 4, 3).transpose(2, 3))", ("ValueError",)),
    "uco_overlap": ("ops.upsample_concat.out([f], [3, 4], 'nearest', False, out=f)", ("RuntimeError",)),
    "ucb_shapes_length": ("ops.upsample_concat_backward(g, [3, 2, 2, 4], 'bilinear', False, False, [False])",
                          ("ValueError",)),
    "ucb_no_shapes": ("ops.upsample_concat_backward(g, [], 'bilinear', False, False, [False])", ("ValueError",)),
    "ucb_channels": ("ops.upsample_concat_backward(g, [2, 2, 2], 'bilinear', False, False, [False])", ("ValueError",)),
    "ucb_zero_shape": ("ops.upsample_concat_backward(g, [3, 0, 2], 'bilinear', False, False, [False])",
                       ("ValueError",)),
    "ucb_negative_shape": ("ops.upsample_concat_backward(g, [3, -2, 2], 'bilinear', False, False, [False])",
                           ("ValueError",)),
    "ucb_3d": ("ops.upsample_concat_backward(torch.randn(3, 4, 4), [3, 2, 2], 'bilinear', False, False, [False])",
               ("ValueError",)),
    "ucb_int": ("ops.upsample_concat_backward(g.int(), [3, 2, 2], 'bilinear', False, False, [False])", ("TypeError",)),
    "ucb_mode_foo": ("ops.upsample_concat_backward(g, [3, 2, 2], 'foo', False, False, [False])", ("ValueError",)),
    "ucb_layouts_length": ("ops.upsample_concat_backward(g, [3, 2, 2], 'nearest', False, False, [False, True])",
                           ("ValueError",)),
    "ucb_layouts_missing": ("ops.upsample_concat_backward(g, [3, 2, 2], 'nearest', False, False, [])",
                            ("ValueError",)),
}


def _raw_script(cases: dict) -> str:
    lines = [f"run({name!r}, lambda: {call})" for name, (call, _) in cases.items()]
    return textwrap.dedent(_RAW_PRELUDE) + "\n".join(lines) + "\nprint('DONE', flush=True)\n"


def _parse(stdout: str) -> dict:
    results = {}
    for line in stdout.splitlines():
        name, sep, rest = line.partition(": ")
        if sep:
            results[name] = rest.split(":")[0]
    return results


# The same table through msfast._C's typed entry points (csrc/module.cpp; the backward operators
# have none and stay torch.ops): the operators' own checks raise the same exceptions there.
# Where pybind11 rejects an argument's type before the operator runs, it raises TypeError.
_ENTRY_PRELUDE = """
class _Entry:
    pyramid = staticmethod(msfast._C.pyramid)
    pyramid_backward = ops.pyramid_backward
    upsample_concat_backward = ops.upsample_concat_backward

    class upsample_concat:
        def __new__(cls, *args):
            return msfast._C.upsample_concat(*args)

        @staticmethod
        def out(*args, out):
            return msfast._C.upsample_concat_out(*args, out)


ops = _Entry
"""
ENTRY_TYPE_ERRORS = {"pyr_sizes_wrong_type": ("TypeError",), "pyr_x_none": ("TypeError",)}


@pytest.mark.parametrize("route", ["torch.ops", "entry"])
def test_raw_ops_bad_arguments_raise_and_do_not_crash(route):
    script = _raw_script(RAW_ERRORS)
    if route == "entry":
        script = script.replace("\n\ndef run(", textwrap.dedent(_ENTRY_PRELUDE) + "\n\ndef run(", 1)
    proc = run_python(script)
    assert proc.returncode == 0, f"the process died (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.stdout.rstrip().endswith("DONE")
    results = _parse(proc.stdout)
    expect = {name: expected for name, (_, expected) in RAW_ERRORS.items()}
    if route == "entry":
        expect.update(ENTRY_TYPE_ERRORS)
    wrong = {name: results.get(name) for name, expected in expect.items() if results.get(name) not in expected}
    assert not wrong, f"unexpected outcome (OK = no exception): {wrong}\n{proc.stdout}"


# Malformed raw calls that the public API never makes, each in its own process: they must raise
# (or return a well-formed result), not corrupt memory or kill the interpreter.
RAW_MEMORY_SAFETY = {
    "pyramid_backward_zero_height_input_shape": (
        "ops.pyramid_backward([f], [1, 2, 0, 6], [], 'bilinear', True, False, None, f32, False, False)"),
    "pyramid_backward_zero_width_input_shape": (
        "ops.pyramid_backward([f], [1, 2, 5, 0], [], 'nearest', False, False, None, f32, False, False)"),
    "pyramid_backward_zero_height_grad": (
        "ops.pyramid_backward([torch.randn(1, 2, 0, 4)], [1, 2, 5, 6], [], 'bilinear', False, False, None, f32, "
        "False, False)"),
    "upsample_concat_backward_zero_height_grad": (
        "ops.upsample_concat_backward(torch.randn(1, 2, 0, 4), [2, 3, 3], 'bilinear', False, False, [False])"),
    "pyramid_sizes_inconsistent_with_scales_antialias": (
        "ops.pyramid(x, [200, 240], [0.5], 'bicubic', True, False, None, None, None)"),
    "pyramid_backward_sizes_inconsistent_with_scales_antialias": (
        "ops.pyramid_backward([torch.randn(1, 2, 200, 240)], [1, 2, 5, 6], [0.5], 'bilinear', True, False, None, f32, "
        "False, False)"),
}


@pytest.mark.parametrize("name", list(RAW_MEMORY_SAFETY))
def test_raw_ops_malformed_calls_do_not_crash(name):
    call = RAW_MEMORY_SAFETY[name]
    script = textwrap.dedent(_RAW_PRELUDE) + f"run({name!r}, lambda: {call})\nprint('DONE', flush=True)\n"
    proc = run_python(script)
    assert proc.returncode == 0, (f"{call}\nkilled the process (rc={proc.returncode}):\n{proc.stdout}\n"
                                  f"{proc.stderr[-2000:]}")
    assert proc.stdout.rstrip().endswith("DONE")
    assert _parse(proc.stdout).get(name) in ("OK", "ValueError", "RuntimeError", "TypeError")
