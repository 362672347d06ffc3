"""The public operators, their fake kernels, and the fallback.

The schemas live in csrc/ops.cpp; importing msfast._C registers them with the CPU (and
CUDA) kernels and their autograd formulas (csrc/autograd.cpp: both operators are linear in
their tensor inputs, so each backward is another msfast operator and the backward of a
backward is the forward again). Here they get a fake kernel (shapes for torch.compile and
meta tensors). torch.vmap batches them with the kernels of msfast/_func.py.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.autograd.forward_ad as _fwad

from . import _func, reference
from ._args import concat_args, is_channels_last, pyramid_args, pyramid_normalizes

__all__ = ["pyramid", "upsample_concat", "fallback_reason", "kernels_available", "empty_cache"]


def _load():
    if os.environ.get("MSFAST_FORCE_FALLBACK", "0") == "1":
        return None, "MSFAST_FORCE_FALLBACK=1 is set"
    try:
        from . import _C

        return _C, None
    except Exception as e:  # ImportError, or OSError for a module built against another torch
        return None, f"{type(e).__name__}: {e}"


_C, _LOAD_ERROR = _load()
if _C is None:
    warnings.warn(
        f"msfast: the compiled kernels could not be loaded ({_LOAD_ERROR}); every call uses the pure-PyTorch "
        "reference path (msfast.reference), which is correct but slower. Rebuild with "
        "`pip install --no-build-isolation -e .` against the installed torch.",
        RuntimeWarning,
        stacklevel=2,
    )


def fallback_reason() -> str | None:
    """None when the compiled kernels are in use, otherwise why they are not."""
    return _LOAD_ERROR


# The CUDA kernels passed the whole CUDA test suite on an H200 at 6a00c99
# (benchmarks/results/nvidia-h200-6a00c99.json), so msfast.* uses them by default;
# MSFAST_CUDA_KERNELS=0 sends CUDA tensors to the reference path instead (torch.ops.msfast.*
# always reaches the kernels). Set this back to False if a change to the CUDA path cannot be
# run on a GPU before it lands.
CUDA_KERNELS_VALIDATED = True


def cuda_kernels_enabled() -> bool:
    """Whether msfast.* uses the compiled CUDA kernels (see CUDA_KERNELS_VALIDATED)."""
    flag = os.environ.get("MSFAST_CUDA_KERNELS", "")
    if flag in ("0", "1"):
        return flag == "1"
    return CUDA_KERNELS_VALIDATED


# Read once: torch.compile cannot trace a call into the extension module (only os.environ).
_CUDA_BUILT = _C is not None and bool(_C.cuda_built())


def kernels_available(device_type: str) -> bool:
    """Whether msfast.* runs compiled kernels for this device type ("cpu", "cuda", "meta")."""
    if _C is None:
        return False
    if device_type == "cuda":
        return _CUDA_BUILT and cuda_kernels_enabled()
    return device_type in ("cpu", "meta")


def empty_cache() -> None:
    """Frees the idle blocks msfast keeps for reuse as CPU outputs (see csrc/cpu/out_cache.cpp).

    Large CPU outputs are allocated from a cache of already-mapped blocks, because a fresh
    allocation costs a page fault per page on its first write. ``MSFAST_CPU_CACHE_MB`` bounds
    the idle bytes kept (default 1024, 0 disables the cache).
    """
    if _C is not None:
        _C.empty_cpu_cache()


_warned_devices = set()
_CUDA_ARCHS = dict(_C.build_info())["cuda_archs"] if _CUDA_BUILT else ""
_arch_ok: dict = {}  # CUDA device index -> whether the built kernels run on it


def arch_runs_on(arch_list: str, capability: tuple) -> bool:
    """Whether kernels built for ``arch_list`` (TORCH_CUDA_ARCH_LIST syntax, e.g. "8.0;9.0+PTX")
    run on a GPU of compute ``capability`` (major, minor): machine code for X.Y runs on X.Z for
    Z >= Y, arch-specific code (9.0a) only on that arch, PTX on any later arch. An entry not of
    that form (an arch name) is taken to run, as nothing can be concluded from it. (Family
    code, 10.0f, runs like machine code.)"""
    for entry in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        ptx = entry.endswith("+PTX")
        num = entry[: -len("+PTX")] if ptx else entry
        specific = num.endswith("a")
        try:
            major, minor = (int(v) for v in num.rstrip("af").split("."))
        except ValueError:
            if entry:
                return True
            continue
        if ptx and (major, minor) <= tuple(capability):
            return True
        if major == capability[0] and (minor == capability[1] if specific else minor <= capability[1]):
            return True
    return False


def _cuda_arch_ok(device: torch.device) -> bool:
    """Whether this build's CUDA kernels run on `device`, asked once per GPU. Not asked while
    torch.compile traces (the answer cannot be traced; an eager call asks first in practice)."""
    if torch.compiler.is_compiling():
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok = _arch_ok.get(index)
    if ok is None:
        cap = torch.cuda.get_device_capability(index)
        ok = _arch_ok[index] = arch_runs_on(_CUDA_ARCHS, cap)
        if not ok:
            warnings.warn(
                f"msfast: the CUDA kernels were built for TORCH_CUDA_ARCH_LIST={_CUDA_ARCHS!r}, which does not "
                f"run on cuda:{index} (compute capability {cap[0]}.{cap[1]}); using the pure-PyTorch reference "
                f"path there. Rebuild with TORCH_CUDA_ARCH_LIST={cap[0]}.{cap[1]} to use the kernels.",
                RuntimeWarning,
                stacklevel=4,
            )
    return ok


def _use_kernels(device: torch.device) -> bool:
    if device.type == "cpu" and _C is not None:  # the common case first, without two more calls
        return True
    if kernels_available(device.type):
        return device.type != "cuda" or _cuda_arch_ok(device)
    if _C is not None and device.type not in _warned_devices:
        _warned_devices.add(device.type)
        why = "in this build"
        if device.type == "cuda" and _CUDA_BUILT:
            why = "enabled (MSFAST_CUDA_KERNELS=0 is set)" if CUDA_KERNELS_VALIDATED else (
                "enabled (set MSFAST_CUDA_KERNELS=1 to use the compiled, not yet GPU-validated kernels)")
        warnings.warn(
            f"msfast: no compiled kernels for device type '{device.type}' {why}; "
            "using the pure-PyTorch reference path there",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


_tf_mode = torch._C._is_torch_function_mode_enabled
_peek = torch._C._functorch.peek_interpreter_stack


def _direct(t: torch.Tensor) -> bool:
    """Whether a call on `t` can go to msfast._C's typed entry points (csrc/module.cpp) rather
    than through torch.ops, whose argument conversion costs about 5 us a call: for a plain
    tensor (a subclass may override __torch_function__, which only torch.ops honours), with no
    torch_function mode active (it must see the operator), outside torch.compile (Dynamo traces
    torch.ops, not an extension's functions). Both routes reach the same dispatcher: autograd,
    torch.func's transforms, the device kernels and torch_dispatch modes behave the same."""
    return type(t) is torch.Tensor and not _tf_mode() and not torch.compiler.is_compiling()


def _layout(channels_last: bool):
    return torch.channels_last if channels_last else torch.contiguous_format


# --------------------------------------------------------------------------- operators


def pyramid(
    x: torch.Tensor,
    scales=None,
    sizes=None,
    *,
    mode: str = "bilinear",
    antialias: bool | None = None,
    align_corners: bool | None = None,
    mean=None,
    std=None,
    out_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Resize one batch to K levels in one fused kernel.

    Level k equals ``F.interpolate(x_norm, scale_factor=scales[k] | size=sizes[k], mode=mode,
    align_corners=align_corners, antialias=antialias)``, where ``x_norm`` is ``x`` converted to
    ``out_dtype``, divided by 255 when ``x`` is uint8, then ``(x - mean[c]) / std[c]``.

    Args:
        x: ``[N, C, H, W]`` uint8, float16, bfloat16, float32 or float64; NCHW or channels_last
            (a ``[N, H, W, C]`` image batch permuted to NCHW is read without a copy).
        scales: positive scale factors, one per level (output size ``floor(H * s)``).
        sizes: ``(h, w)`` pairs (or ints for square levels), one per level. Give exactly one
            of ``scales`` and ``sizes``.
        mode: ``"bilinear"``, ``"bicubic"``, ``"nearest"``, ``"nearest-exact"`` or ``"area"``.
        antialias: default on for bilinear and bicubic, off otherwise.
        align_corners: as in F.interpolate (only for bilinear and bicubic).
        mean, std: per-channel normalization applied before resizing.
        out_dtype: output dtype; default the input dtype, float32 for uint8 input.

    Returns:
        A list of K tensors in the memory format of ``x``. Differentiable in float ``x``.
    """
    a = pyramid_args(x, scales, sizes, mode, antialias, align_corners, mean, std, out_dtype)
    if not _use_kernels(x.device):
        return reference.pyramid(x, scales, sizes, mode=mode, antialias=antialias, align_corners=align_corners,
                                 mean=mean, std=std, out_dtype=out_dtype)
    if _direct(x):
        return _C.pyramid(x, a.flat, a.scales, a.mode, a.antialias, a.align_corners, a.mean, a.std, a.out_dtype)
    return _OPS.pyramid(x, a.flat, a.scales, a.mode, a.antialias, a.align_corners, a.mean, a.std, a.out_dtype)


def upsample_concat(features, size, *, mode: str = "bilinear", align_corners: bool | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Resize every feature map to ``size`` and concatenate them along channels.

    Equals ``torch.cat([F.interpolate(f, size=size, mode=mode, align_corners=align_corners)
    for f in features], 1)``, but each map is written straight into its channel slice of one
    output, with no intermediate tensors.

    Args:
        features: non-empty list of ``[N, C_i, H_i, W_i]`` float tensors with the same N,
            dtype and device; each may be smaller or larger than ``size``.
        size: ``(h, w)`` of the output (or an int for a square output).
        mode: ``"bilinear"``, ``"bicubic"``, ``"nearest"`` or ``"nearest-exact"``.
        align_corners: as in F.interpolate (only for bilinear and bicubic).
        out: optional ``[N, sum C_i, h, w]`` tensor to write into (not differentiable).

    Returns:
        ``[N, sum C_i, h, w]``, channels_last when ``features[0]`` is. Differentiable in
        every feature.
    """
    features, size, mode, align_corners = concat_args(features, size, mode, align_corners, out)
    if not _use_kernels(features[0].device):
        return reference.upsample_concat(features, size, mode=mode, align_corners=align_corners, out=out)
    direct = all(type(f) is torch.Tensor for f in features) and _direct(features[0])
    if out is None:
        op = _C.upsample_concat if direct else _OPS.upsample_concat
        return op(features, list(size), mode, align_corners)
    if torch.is_grad_enabled() and any(f.requires_grad for f in features):
        raise RuntimeError(
            "msfast.upsample_concat(out=...) does not support automatic differentiation: "
            "call it without out= when the features require grad"
        )
    if _fwad._current_level >= 0 or _peek() is not None:
        # No batching kernel or forward-mode formula for the out= operator (out may not be
        # batched as the features are): the call without out=, copied.
        out.copy_(upsample_concat(features, size, mode=mode, align_corners=align_corners))
    elif direct and type(out) is torch.Tensor:
        _C.upsample_concat_out(features, list(size), mode, align_corners, out)
    else:
        _OPS.upsample_concat_out(features, list(size), mode, align_corners, out=out)
    return out


# --------------------------------------------------------------- fake kernels, autograd

class _Overloads:
    """The operators' overloads, looked up once: resolving ``torch.ops.msfast.pyramid`` per call
    costs about 10 us, as much as a small CPU call itself."""

    def __init__(self):
        ops = torch.ops.msfast
        self.pyramid = ops.pyramid.default
        self.pyramid_backward = ops.pyramid_backward.default
        self.upsample_concat = ops.upsample_concat.default
        self.upsample_concat_out = ops.upsample_concat.out
        self.upsample_concat_backward = ops.upsample_concat_backward.default


_OPS = _Overloads() if _C is not None else None
if _OPS is not None:
    _func.install(_OPS, _C)

if _C is not None:

    def _runs_channels_last(x, normalized: bool) -> bool:
        """Whether a call resizing x runs, and returns, channels_last: the layout of the tensor
        F.interpolate resizes (plan.h: resize_layouts), x or, normalized, x_norm (empty_like(x)'s
        strides). Asked of C++ itself where x's sizes and strides are numbers: in Python, neither
        the meta empty_like nor _prims_common's dense check treats a size-1 dimension's stride
        as ATen does, and the layout rule reads it (1x2x1x2 with strides (2, 1, 4, 2),
        normalized, came back channels_last from a Python rule and NCHW from the kernel). With
        symbolic sizes (torch.compile, dynamic shapes), the Python rule."""
        if all(type(v) is int for v in (*x.shape, *x.stride())):
            return _C.resize_layouts(list(x.shape), list(x.stride()), normalized)[0]
        return is_channels_last(torch.empty_like(x) if normalized else x)

    @torch.library.register_fake("msfast::pyramid")
    def _pyramid_fake(x, sizes, scales, interpolation, antialias, align_corners, mean, std, out_dtype):
        dt = out_dtype if out_dtype is not None else (torch.float32 if x.dtype == torch.uint8 else x.dtype)
        fmt = _layout(_runs_channels_last(x, pyramid_normalizes(x.dtype, dt, mean, std)))
        N, C = x.shape[0], x.shape[1]
        return [
            torch.empty((N, C, sizes[2 * k], sizes[2 * k + 1]), dtype=dt, device=x.device, memory_format=fmt)
            for k in range(len(sizes) // 2)
        ]

    @torch.library.register_fake("msfast::pyramid_backward")
    def _pyramid_backward_fake(grads, input_shape, scales, interpolation, antialias, align_corners, std, dtype,
                               channels_last, nearest_channels_last):
        g = next(g for g in grads if g is not None)
        return torch.empty(list(input_shape), dtype=dtype, device=g.device, memory_format=_layout(channels_last))

    def _same_device(tensors):
        # A meta tensor among CPU ones dispatches here rather than to the CPU kernel, which
        # would have rejected the mix: reject it here too.
        devs = {t.device for t in tensors}
        if len(devs) > 1:
            raise ValueError(f"msfast: all tensors must be on one device, got {sorted(map(str, devs))}")

    @torch.library.register_fake("msfast::upsample_concat")
    def _concat_fake(features, size, interpolation, align_corners):
        _same_device(features)
        f0 = features[0]
        C = sum(f.shape[1] for f in features)
        return torch.empty((f0.shape[0], C, size[0], size[1]), dtype=f0.dtype, device=f0.device,
                           memory_format=_layout(_runs_channels_last(f0, False)))

    @torch.library.register_fake("msfast::upsample_concat.out")
    def _concat_out_fake(features, size, interpolation, align_corners, *, out):
        _same_device(features + [out])

    @torch.library.register_fake("msfast::upsample_concat_backward")
    def _concat_backward_fake(grad, feature_shapes, interpolation, align_corners, channels_last,
                              nearest_channels_last):
        fmt = _layout(channels_last)
        return [
            torch.empty((grad.shape[0], *feature_shapes[i : i + 3]), dtype=grad.dtype, device=grad.device,
                        memory_format=fmt)
            for i in range(0, len(feature_shapes), 3)
        ]

    # The autograd formulas are C++ (csrc/autograd.cpp), registered for the Autograd key.

