"""Argument checking shared by the compiled operators and the reference path.

Both paths accept and reject exactly the same calls, with exceptions that name the
offending argument. Type problems raise TypeError, bad values ValueError.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple

import torch
from torch._prims_common import suggest_memory_format

MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")
CONCAT_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic")
INTERPOLATING = ("bilinear", "bicubic")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PYRAMID_DTYPES = (torch.uint8, *FLOAT_DTYPES)


class PyramidArgs(NamedTuple):
    """The checked arguments of a pyramid call (a NamedTuple: a frozen dataclass cost 1 us a
    call to build, a twentieth of a small CPU call)."""

    sizes: list  # [(h, w)] per level, ints or SymInts
    flat: list  # the same sizes as [h0, w0, h1, w1, ...], as the operator takes them
    scales: list | None  # per level, or None when given by size
    mode: str
    antialias: bool
    align_corners: bool
    mean: list | None
    std: list | None
    out_dtype: torch.dtype


def is_channels_last(t: torch.Tensor) -> bool:
    """The layout rule of every msfast operator (C++ uses the same, csrc/msfast/plan.h):
    channels_last when ATen's suggest_memory_format says so, the rule that gives
    F.interpolate's output its memory format (a channels_last tensor sliced along C or W is
    channels_last, a plain contiguous one is not). The fake kernels use it, so it must give
    what Tensor.suggest_memory_format gives in C++; _prims_common's is its Python twin, the
    one torch's own meta functions use."""
    return t.dim() == 4 and suggest_memory_format(t) == torch.channels_last


def pyramid_normalizes(x_dtype: torch.dtype, out_dtype: torch.dtype, mean, std) -> bool:
    """Whether the reference pyramid resizes a normalized copy x_norm rather than x itself
    (csrc/msfast/plan.h: pyramid_normalizes)."""
    return x_dtype == torch.uint8 or out_dtype != x_dtype or mean is not None or std is not None


def _check_tensor(t, name: str, dtypes) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"msfast: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"msfast: {name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dim() != 4:
        raise ValueError(
            f"msfast: {name} must be a 4-D [N, C, H, W] tensor, got {t.dim()}-D with shape {tuple(t.shape)}"
        )
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"msfast: {name} must have dtype in ({names}), got {t.dtype}")
    if t.shape[1] == 0 or t.shape[2] == 0 or t.shape[3] == 0:
        raise ValueError(f"msfast: {name} must have non-empty C, H and W, got shape {tuple(t.shape)}")


def _check_mode(mode, allowed) -> str:
    if not isinstance(mode, str) or mode not in allowed:
        raise ValueError(f"msfast: mode must be one of {', '.join(map(repr, allowed))}, got {mode!r}")
    return mode


def _align_corners(mode: str, align_corners) -> bool:
    if align_corners is None:
        return False
    if mode not in INTERPOLATING:
        raise ValueError(
            f"msfast: align_corners can only be set with the interpolating modes 'bilinear' and 'bicubic', "
            f"not with mode={mode!r} (as in F.interpolate)"
        )
    if not isinstance(align_corners, bool):
        raise TypeError(f"msfast: align_corners must be a bool or None, got {type(align_corners).__name__}")
    return align_corners


# The most bytes one tensor can span: its element count and byte size are int64 in ATen.
MAX_BYTES = 2**63 - 1


def _check_fits(shape, dtype: torch.dtype, name, what: str) -> None:
    """An output that no allocator could provide (its byte size overflows int64) is a bad
    argument, named as such, rather than an overflow deep inside ATen. An output that merely
    exceeds the machine's memory is left to the allocator, which raises a RuntimeError.
    name: the argument, or a function that returns it (formatting floats for every call cost
    more than the check)."""
    for v in shape:  # (a loop: all() over a generator cost a microsecond a call)
        if not isinstance(v, int):
            return  # symbolic sizes under torch.compile: checked when the real call runs
    nbytes = max(shape[0], 1) * math.prod(shape[1:]) * dtype.itemsize  # N = 0 still has strides
    if nbytes > MAX_BYTES:
        name = name() if callable(name) else name
        raise ValueError(
            f"msfast: {name} gives {what} of shape {list(shape)} ({nbytes} bytes), more than any tensor can hold"
        )


def _size_value(v, name: str):
    if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)):
        raise TypeError(f"msfast: {name} must be an int, got {type(v).__name__}")
    if isinstance(v, int) and v < 1:
        raise ValueError(f"msfast: {name} must be >= 1, got {v}")
    return v


def _pair(v, name: str):
    if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool):
        return (_size_value(v, name), _size_value(v, name))
    if isinstance(v, (tuple, list, torch.Size)) and len(v) == 2:
        return (_size_value(v[0], f"{name}[0]"), _size_value(v[1], f"{name}[1]"))
    raise TypeError(f"msfast: {name} must be an int or an (h, w) pair, got {v!r}")


def _per_channel(v, name: str, channels: int):
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        if v.device.type == "meta":
            raise TypeError(f"msfast: {name} must hold values: a sequence of numbers or a tensor with data, got a "
                            "meta tensor")
        v = v.detach().cpu().reshape(-1).tolist()
    if not isinstance(v, (list, tuple)) or not all(isinstance(e, Real) and not isinstance(e, bool) for e in v):
        raise TypeError(f"msfast: {name} must be a sequence of numbers, got {v!r}")
    if len(v) != channels:
        raise ValueError(f"msfast: {name} must have one value per channel ({channels}), got {len(v)}")
    v = [float(e) for e in v]
    if not all(-math.inf < e < math.inf for e in v):  # not math.isfinite: see the scales check
        raise ValueError(f"msfast: {name} must be finite, got {v}")
    return v


# Checked pyramid arguments by call signature (_pyramid_key): a training or serving loop calls
# with the same arguments again and again, and the checks cost 4.5 us a call on this
# project's Xeon, a third of a small call's host time; the key costs about 1. Cleared when full.
_PYRAMID_ARGS: dict = {}
_PYRAMID_ARGS_MAX = 256  # (and of _CONCAT_ARGS below)
_NUMBER = (float, int)  # exactly these types (not bool, not numpy scalars: no key for those)


def _numbers_key(v):
    """v as a hashable key: None, a number, or a list/tuple of plain floats and ints; False where v
    is anything else (such calls are checked every time), or holds -0.0: it equals 0.0, but a
    mean of -0.0 gives +0.0 where a mean of 0.0 gives -0.0 (for x = -0.0), as in the reference."""
    if v is None or type(v) in _NUMBER:
        return v
    if type(v) in (list, tuple):
        for e in v:
            if type(e) not in _NUMBER or (e == 0 and math.copysign(1.0, e) < 0):
                return False
        return tuple(v)
    return False


def _pair_key(v):
    """An int or an (h, w) pair of ints (exact types: True is not 1 here) as a key, else False."""
    if type(v) is int:
        return v
    if type(v) in (list, tuple) and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        return (v[0], v[1])
    return False


def _sizes_key(v):
    if v is None:
        return None
    if type(v) in (list, tuple):
        key = tuple(_pair_key(e) for e in v)
        return False if False in key else key
    return False


def _store(cache: dict, key, value):
    """Keeps value under key (not under None, the key of calls that have none) in a cache of at
    most _PYRAMID_ARGS_MAX entries, cleared when full; returns value. The hits are a plain
    cache.get(key), inline: a helper call with a closure cost half a microsecond a hit."""
    if key is not None:
        if len(cache) >= _PYRAMID_ARGS_MAX:
            cache.clear()
        cache[key] = value
    return value


def _pyramid_key(x, scales, sizes, mode, antialias, align_corners, mean, std, out_dtype):
    """Everything pyramid_args' result and exceptions depend on, or None where a value has no
    exact key (tensors for mean or std, numpy scalars, SymInts under torch.compile, subclasses).
    Types are part of the key where == would conflate them: True == 1 == 1.0, but antialias=1
    and scales=[True] are errors."""
    if type(x) is not torch.Tensor or type(mode) is not str or torch.compiler.is_compiling():
        return None
    if not ((antialias is None or type(antialias) is bool) and (align_corners is None or type(align_corners) is bool)
            and (out_dtype is None or type(out_dtype) is torch.dtype)):
        return None
    key = (x.shape, x.dtype, x.layout, _numbers_key(scales), _sizes_key(sizes), mode, antialias, align_corners,
           _numbers_key(mean), _numbers_key(std), out_dtype)
    return None if False in key[3:5] or False in key[8:10] else key


def pyramid_args(x, scales, sizes, mode, antialias, align_corners, mean, std, out_dtype) -> PyramidArgs:
    """The checked arguments of a pyramid call; raises TypeError or ValueError naming the bad one.
    The result is shared between calls with the same key: read it, do not modify it."""
    key = _pyramid_key(x, scales, sizes, mode, antialias, align_corners, mean, std, out_dtype)
    hit = _PYRAMID_ARGS.get(key)
    if hit is not None:
        return hit
    return _store(_PYRAMID_ARGS, key,
                  _check_pyramid_args(x, scales, sizes, mode, antialias, align_corners, mean, std, out_dtype))


def _check_pyramid_args(x, scales, sizes, mode, antialias, align_corners, mean, std, out_dtype) -> PyramidArgs:
    _check_tensor(x, "x", PYRAMID_DTYPES)
    mode = _check_mode(mode, MODES)
    if (scales is None) == (sizes is None):
        raise ValueError("msfast: give exactly one of scales or sizes")
    if antialias is None:
        antialias = mode in INTERPOLATING
    elif not isinstance(antialias, bool):
        raise TypeError(f"msfast: antialias must be a bool or None, got {type(antialias).__name__}")
    elif antialias and mode not in INTERPOLATING:
        raise ValueError(
            f"msfast: antialias=True is only supported with modes 'bilinear' and 'bicubic', not {mode!r} "
            "(as in F.interpolate)"
        )
    align_corners = _align_corners(mode, align_corners)
    H, W = x.shape[2], x.shape[3]
    if scales is not None:
        if isinstance(scales, Real) and not isinstance(scales, bool):
            scales = [scales]
        if not isinstance(scales, (list, tuple)) or len(scales) == 0:
            raise TypeError(f"msfast: scales must be a non-empty sequence of numbers, got {scales!r}")
        out_sizes = []
        plain = type(H) is int and type(W) is int  # not SymInts (torch.compile with dynamic shapes)
        for k, s in enumerate(scales):
            # type() first: isinstance against the Real ABC is slow, and this runs per call
            if type(s) is not float and (isinstance(s, bool) or not isinstance(s, Real)):
                raise TypeError(f"msfast: scales[{k}] must be a number, got {type(s).__name__}")
            s = float(s)
            # Comparisons rather than math.isfinite: under torch.compile(dynamic=True) a scale
            # held by a module can be a SymFloat, which math.isfinite cannot trace. NaN fails both.
            if not (0 < s < math.inf):
                raise ValueError(f"msfast: scales[{k}] must be positive and finite, got {s}")
            if plain and max(H, W) * s >= 2**63:
                # int(inf) would raise OverflowError, a huge int an unreadable schema error.
                raise ValueError(f"msfast: scales[{k}]={s} gives a level past 2^63 rows or columns for a "
                                 f"{H}x{W} input")
            # ATen's rule: int64(in * scale), i.e. floor for positive values.
            h, w = (int(H * s), int(W * s)) if plain else (torch.sym_int(H * s), torch.sym_int(W * s))
            if (isinstance(h, int) and h < 1) or (isinstance(w, int) and w < 1):
                raise ValueError(f"msfast: scales[{k}]={s} gives an empty level ({h}x{w}) for a {H}x{W} input")
            out_sizes.append((h, w))
        scales = [float(s) for s in scales]
    else:
        if isinstance(sizes, (int, torch.SymInt)) and not isinstance(sizes, bool):
            sizes = [sizes]
        if not isinstance(sizes, (list, tuple)) or len(sizes) == 0:
            raise TypeError(f"msfast: sizes must be a non-empty sequence of (h, w) pairs, got {sizes!r}")
        if len(sizes) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in sizes):
            raise TypeError(
                f"msfast: sizes={list(sizes)!r} is ambiguous: pass a list of (h, w) pairs, e.g. [{tuple(sizes)!r}]"
            )
        out_sizes = [_pair(s, f"sizes[{k}]") for k, s in enumerate(sizes)]
    C = x.shape[1]
    mean = _per_channel(mean, "mean", C)
    std = _per_channel(std, "std", C)
    if std is not None and any(s == 0 for s in std):
        raise ValueError(f"msfast: std must not contain zeros, got {std}")
    if out_dtype is None:
        out_dtype = torch.float32 if x.dtype == torch.uint8 else x.dtype
    elif out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"msfast: out_dtype must be a floating dtype, got {out_dtype}")
    N = x.shape[0]
    # The common case first (plain ints, far from the limit), without a call per level.
    fits = max(N, 1) * C * out_dtype.itemsize if type(N) is int and type(C) is int else None
    for k, (h, w) in enumerate(out_sizes):
        if fits is not None and type(h) is int and type(w) is int and fits * h * w <= MAX_BYTES:
            continue
        def name(k=k):
            return f"scales[{k}]={scales[k]}" if scales is not None else f"sizes[{k}]"
        _check_fits((N, C, h, w), out_dtype, name, f"level {k}")
    flat = [v for hw in out_sizes for v in hw]
    return PyramidArgs(out_sizes, flat, scales, mode, antialias, align_corners, mean, std, out_dtype)


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    lo = t.data_ptr()
    extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return lo, lo + extent * t.element_size()


def _may_share_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are views of one storage whose byte spans intersect (conservative for
    strided views that interleave without touching)."""
    if a.device != b.device or a.device.type == "meta" or a.numel() == 0 or b.numel() == 0:
        return False
    try:
        if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
            return False
    except (RuntimeError, NotImplementedError):  # tensors without data (fake tensors)
        return False
    (a0, a1), (b0, b1) = _byte_span(a), _byte_span(b)
    return a0 < b1 and b0 < a1


# Checked upsample_concat arguments by call signature (without out=, whose checks look at the
# tensor's memory): as for pyramid_args, repeated calls skip the checks (5.2 us for three
# features on this project's Xeon, two fifths of a small call's host time).
_CONCAT_ARGS: dict = {}


def _concat_key(features, size, mode, align_corners):
    """Everything concat_args' result and exceptions depend on besides the tensors' data: each
    feature's shape, dtype, device and layout, and the other arguments with exact types. None
    where some value has no exact key (subclasses, SymInts, torch.compile)."""
    if type(features) not in (list, tuple) or type(mode) is not str or torch.compiler.is_compiling():
        return None
    sk = _pair_key(size)
    if sk is False or not (align_corners is None or type(align_corners) is bool):
        return None
    fk = []
    for f in features:
        if type(f) is not torch.Tensor:
            return None
        fk.append((f.shape, f.dtype, f.device, f.layout))
    return (tuple(fk), sk, mode, align_corners)


def concat_args(features, size, mode, align_corners, out):
    """The checked arguments of an upsample_concat call: (features as a list, (h, w), mode,
    align_corners); raises TypeError or ValueError naming the bad one."""
    if out is not None:
        return _check_concat_args(features, size, mode, align_corners, out)
    key = _concat_key(features, size, mode, align_corners)
    hit = _CONCAT_ARGS.get(key)
    if hit is None:
        hit = _store(_CONCAT_ARGS, key, _check_concat_args(features, size, mode, align_corners, None)[1:])
    return (list(features), *hit)


def _check_concat_args(features, size, mode, align_corners, out):
    if isinstance(features, torch.Tensor) or not isinstance(features, (list, tuple)):
        raise TypeError(f"msfast: features must be a list of tensors, got {type(features).__name__}")
    if len(features) == 0:
        raise ValueError("msfast: features must be a non-empty list of tensors")
    f0 = features[0]
    channels = 0
    for i, f in enumerate(features):
        # The usual feature passes these tests; any other gets _check_tensor's exception.
        if not (isinstance(f, torch.Tensor) and f.layout == torch.strided and f.dim() == 4
                and f.dtype in FLOAT_DTYPES and f.shape[1] and f.shape[2] and f.shape[3]):
            _check_tensor(f, f"features[{i}]", FLOAT_DTYPES)
        channels += f.shape[1]
        if i == 0:
            continue
        if f.dtype != f0.dtype:
            raise TypeError(
                f"msfast: features must share one dtype: features[0] is {f0.dtype}, features[{i}] is {f.dtype}"
            )
        if f.device != f0.device:
            raise ValueError(
                f"msfast: features must share one device: features[0] is on {f0.device}, features[{i}] on {f.device}"
            )
        if f.shape[0] != f0.shape[0]:
            raise ValueError(
                f"msfast: features must share the batch size N: features[0] has {f0.shape[0]}, "
                f"features[{i}] has {f.shape[0]}"
            )
    mode = _check_mode(mode, CONCAT_MODES)
    size = _pair(size, "size")
    align_corners = _align_corners(mode, align_corners)
    n = f0.shape[0]
    if not (type(n) is int and type(channels) is int and type(size[0]) is int and type(size[1]) is int
            and max(n, 1) * channels * size[0] * size[1] * f0.dtype.itemsize <= MAX_BYTES):
        _check_fits((n, channels, *size), f0.dtype, lambda: f"size={size}", "an output")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"msfast: out must be a torch.Tensor, got {type(out).__name__}")
        want = (n, channels, size[0], size[1])
        if tuple(out.shape) != want:
            raise ValueError(f"msfast: out must have shape {list(want)}, got {list(out.shape)}")
        if out.dtype != f0.dtype:
            raise TypeError(f"msfast: out must have dtype {f0.dtype}, got {out.dtype}")
        if out.device != f0.device:
            raise ValueError(f"msfast: out must be on {f0.device}, got {out.device}")
        if not (out.is_contiguous() or out.is_contiguous(memory_format=torch.channels_last)):
            raise ValueError("msfast: out must be contiguous or channels_last contiguous")
        # The kernels write out while they read the features: a feature in out's memory would
        # be overwritten before it is read (the reference path would not notice: its inputs
        # to torch.cat are fresh tensors). Dynamo cannot trace data pointers; under
        # torch.compile the C++ operator's own overlap check still runs on the real tensors.
        if not torch.compiler.is_compiling():
            for i, f in enumerate(features):
                if _may_share_memory(out, f):
                    raise ValueError(f"msfast: out must not overlap the memory of features[{i}]")
    return list(features), size, mode, align_corners
