"""Hostile inputs, run in a subprocess so that a crash (an abort, a segfault, a hang) fails the test
instead of killing the test run: every bad argument of test_errors.py's tables, plus the cases below
(odd dtypes and layouts, zero-size dimensions, outputs too large to exist or to allocate, out=
overlapping a feature, mixed devices). Each must raise a Python exception of the expected type
whose message names the problem, in msfast and in the reference path alike."""

from __future__ import annotations

import json

import torch
from conftest import run_python

NAN, INF = float("nan"), float("inf")

# Past any machine's memory (2.4e17 bytes, more than a 57-bit address space) but within int64:
# the allocator must refuse it whatever the kernel's overcommit policy, and raise.
UNALLOCATABLE = (10**8, 10**8)


def pyramid_cases(device: str) -> list:
    """(id, exception, match, args, kwargs) of msfast.pyramid, on `device`."""
    x = torch.randn(2, 3, 8, 10, device=device)
    other = "meta" if device == "cpu" else "cpu"
    return [
        ("x_empty_height", ValueError, r"x must have non-empty", (x[:, :, :0],), dict(scales=[0.5])),
        ("x_int16", TypeError, r"x must have dtype", (x.to(torch.int16),), dict(scales=[0.5])),
        ("x_uint16", TypeError, r"x must have dtype", (x.to(torch.uint16),), dict(scales=[0.5])),
        ("x_uint32", TypeError, r"x must have dtype", (x.to(torch.uint32),), dict(scales=[0.5])),
        ("x_complex128", TypeError, r"x must have dtype", (x.to(torch.complex128),), dict(scales=[0.5])),
        ("x_float8", TypeError, r"x must have dtype", (x.to(torch.float8_e4m3fn),), dict(scales=[0.5])),
        ("x_sparse", TypeError, r"x must be a dense \(strided\) tensor", (x.to_sparse(),), dict(scales=[0.5])),
        ("scale_huge", ValueError, r"scales\[0\]=1e\+300 gives a level past 2\^63", (x,), dict(scales=[1e300])),
        ("scale_max_float", ValueError, r"scales\[1\].* gives a level past 2\^63", (x,),
         dict(scales=[0.5, 1.7976931348623157e308])),
        ("scale_overflows_bytes", ValueError, r"scales\[0\]=10000000000.0 gives level 0 .* more than any tensor",
         (x,), dict(scales=[1e10])),
        ("sizes_overflow_bytes", ValueError, r"sizes\[1\] gives level 1 .* more than any tensor can hold", (x,),
         dict(sizes=[(4, 5), (10**12, 10**12)])),
        ("sizes_past_int64", ValueError, r"sizes\[0\] gives level 0", (x,), dict(sizes=[(2**64, 4)])),
        ("sizes_overflow_empty_batch", ValueError, r"sizes\[0\] gives level 0 .* more than any tensor can hold",
         (x[:0],), dict(sizes=[(2**62, 2**62)])),
        ("sizes_unallocatable", RuntimeError, r"memory", (x,), dict(sizes=[UNALLOCATABLE])),
        ("sizes_unallocatable_uint8", RuntimeError, r"memory", (x.to(torch.uint8),),
         dict(sizes=[(1, 1), UNALLOCATABLE], mode="nearest")),
        ("std_negative_zero", ValueError, r"std must not contain zeros", (x,), dict(scales=[0.5], std=[1, -0.0, 1])),
        ("mean_tensor_wrong_length", ValueError, r"mean must have one value per channel \(3\), got 4", (x,),
         dict(scales=[0.5], mean=torch.zeros(2, 2))),
        ("mean_meta_tensor", TypeError, r"mean must hold values", (x,),
         dict(scales=[0.5], mean=torch.zeros(3, device="meta"))),
        ("mean_complex", TypeError, r"mean must be a sequence of numbers", (x,), dict(scales=[0.5], mean=[1j] * 3)),
        ("std_nan", ValueError, r"std must be finite", (x,), dict(scales=[0.5], std=[1.0, 1.0, NAN])),
        ("std_zero_tensor_x_elsewhere", ValueError, r"std must not contain zeros", (x.to(other),),
         dict(scales=[0.5], std=torch.zeros(3))),
    ]


def concat_cases(device: str) -> list:
    """(id, exception, match, args, kwargs) of msfast.upsample_concat, on `device`."""
    f = torch.randn(2, 3, 5, 6, device=device)
    other = "meta" if device == "cpu" else "cpu"
    buf = torch.zeros(2 * 3 * 5 * 6 + 30, device=device)
    lower, upper = buf[:180].view(2, 3, 5, 6), buf[30:].view(2, 3, 5, 6)  # overlapping by 150 values
    return [
        ("features_empty_height", ValueError, r"features\[1\] must have non-empty", ([f, f[:, :, :0]], (4, 4)), {}),
        ("features_empty_width", ValueError, r"features\[0\] must have non-empty", ([f[..., :0]], (4, 4)), {}),
        ("features_int8", TypeError, r"features\[1\] must have dtype", ([f, f.to(torch.int8)], (4, 4)), {}),
        ("features_int64", TypeError, r"features\[0\] must have dtype", ([f.long()], (4, 4)), {}),
        ("features_uint16", TypeError, r"features\[0\] must have dtype", ([f.to(torch.uint16)], (4, 4)), {}),
        ("features_complex128", TypeError, r"features\[0\] must have dtype", ([f.to(torch.complex128)], (4, 4)),
         {}),
        ("features_sparse", TypeError, r"features\[1\] must be a dense", ([f, f.to_sparse()], (4, 4)), {}),
        ("features_mixed_devices", ValueError, r"share one device.*features\[2\]", ([f, f, f.to(other)], (4, 4)),
         {}),
        ("features_mixed_half_types", TypeError, r"share one dtype.*features\[1\]", ([f.half(), f.bfloat16()], 4),
         {}),
        ("size_overflow_bytes", ValueError, r"size=.* more than any tensor can hold", ([f], (2**62, 2**62)), {}),
        ("size_past_int64", ValueError, r"size=.* more than any tensor can hold", ([f], (2**64, 1)), {}),
        ("size_negative_huge", ValueError, r"size\[1\] must be >= 1", ([f], (4, -(2**70))), {}),
        ("size_unallocatable", RuntimeError, r"memory", ([f], UNALLOCATABLE), {}),
        ("size_unallocatable_nearest", RuntimeError, r"memory", ([f[:1, :1]], (1, 10**17)), dict(mode="nearest")),
        ("out_is_a_feature", ValueError, r"out must not overlap the memory of features\[0\]", ([f], (5, 6)),
         dict(out=f)),
        ("out_overlaps_a_feature", ValueError, r"out must not overlap the memory of features\[1\]",
         ([f[:, :1], lower[:, :2]], (5, 6)), dict(out=upper)),
        ("out_other_device", ValueError, r"out must be on", ([f], (5, 6)),
         dict(out=torch.empty(2, 3, 5, 6, device=other))),
        ("out_half_dtype", TypeError, r"out must have dtype torch.float32, got torch.float16", ([f], (5, 6)),
         dict(out=torch.empty(2, 3, 5, 6, dtype=torch.float16, device=device))),
        ("out_wrong_channels", ValueError, r"out must have shape \[2, 6, 5, 6\]", ([f, f], (5, 6)),
         dict(out=torch.empty(2, 5, 5, 6, device=device))),
        ("out_expanded", ValueError, r"out must be contiguous", ([f], (5, 6)),
         dict(out=torch.empty(1, 1, 1, 1, device=device).expand(2, 3, 5, 6))),
    ]


_SCRIPT = """
import json, re, sys
sys.path.insert(0, "tests")
import torch
import msfast
from msfast import reference
import test_errors, test_hostile

device = sys.argv[1]
tables = [("pyramid", test_hostile.pyramid_cases(device)), ("upsample_concat", test_hostile.concat_cases(device))]
if device == "cpu":
    tables += [("pyramid", test_errors.PYRAMID_ERRORS), ("upsample_concat", test_errors.CONCAT_ERRORS)]
for op, cases in tables:
    for case, exc, match, args, kwargs in cases:
        for impl in (msfast, reference):
            try:
                getattr(impl, op)(*args, **kwargs)
                got, msg = "no exception", ""
            except Exception as e:  # every kind is reported; the parent decides
                got, msg = type(e).__name__, str(e).splitlines()[0][:300]
                ok = isinstance(e, exc) and re.search(match, str(e)) is not None
            else:
                ok = False
            print(json.dumps([op, case, impl.__name__, ok, got, msg]), flush=True)
print("DONE", flush=True)
"""


def _run(device: str) -> list:
    proc = run_python(_SCRIPT.replace("sys.argv[1]", repr(device)), timeout=300)
    assert proc.returncode == 0, (f"the process died (rc={proc.returncode}):\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    lines = proc.stdout.splitlines()
    assert lines and lines[-1] == "DONE", proc.stdout[-3000:]
    return [json.loads(line) for line in lines[:-1]]


def test_hostile_inputs_raise_in_a_subprocess(device):
    rows = _run(device)
    expected = 2 * (len(pyramid_cases(device)) + len(concat_cases(device)))
    if device == "cpu":
        import test_errors

        expected += 2 * (len(test_errors.PYRAMID_ERRORS) + len(test_errors.CONCAT_ERRORS))
    assert len(rows) == expected
    wrong = [r for r in rows if not r[3]]
    assert not wrong, "unexpected outcomes:\n" + "\n".join(map(str, wrong))
