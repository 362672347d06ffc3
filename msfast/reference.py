"""The pure-PyTorch path: the same two operators written with F.interpolate and torch.cat.

It is the test oracle, the benchmark baseline and the fallback when msfast._C cannot load.
It accepts and rejects the same arguments as the compiled operators.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._args import concat_args, is_channels_last, pyramid_args

__all__ = ["pyramid", "upsample_concat", "normalize"]


def normalize(x: torch.Tensor, out_dtype: torch.dtype, mean=None, std=None) -> torch.Tensor:
    """x converted to out_dtype, divided by 255 when uint8, then (x - mean[c]) / std[c]."""
    was_uint8 = x.dtype == torch.uint8
    x = x.to(out_dtype)
    if was_uint8:
        x = x / 255
    if mean is not None:
        x = x - torch.tensor(mean, dtype=out_dtype, device=x.device).view(1, -1, 1, 1)
    if std is not None:
        x = x / torch.tensor(std, dtype=out_dtype, device=x.device).view(1, -1, 1, 1)
    return x


def _interp_kwargs(mode, align_corners, antialias):
    kw = {"mode": mode}
    if mode in ("bilinear", "bicubic"):
        kw["align_corners"] = align_corners
        kw["antialias"] = antialias
    return kw


def pyramid(x, scales=None, sizes=None, *, mode="bilinear", antialias=None, align_corners=None, mean=None,
            std=None, out_dtype=None):
    """See msfast.pyramid."""
    a = pyramid_args(x, scales, sizes, mode, antialias, align_corners, mean, std, out_dtype)
    # ATen has no CPU antialias kernel for float16/bfloat16: there the levels are computed in
    # float32 and rounded once at the end (which is also what msfast's kernels do).
    work = a.out_dtype
    if a.antialias and x.device.type == "cpu" and work in (torch.float16, torch.bfloat16):
        work = torch.float32
    xn = normalize(x, work, a.mean, a.std)
    kw = _interp_kwargs(a.mode, a.align_corners, a.antialias)
    levels = []
    for k, (h, w) in enumerate(a.sizes):
        where = {"scale_factor": a.scales[k]} if a.scales is not None else {"size": (h, w)}
        if a.antialias and w == 1 and h != x.shape[2]:
            levels.append(_one_column_antialias(xn, where, kw))
        else:
            levels.append(F.interpolate(xn, **where, **kw))
    return levels if work == a.out_dtype else [lv.to(a.out_dtype) for lv in levels]


def _one_column_antialias(x, where, kw):
    """An antialiased level one column wide. ATen's CPU antialias kernel (torch 2.14) gives
    every row of such an output the value of row 0 when the height changes (3x1 -> 2x1 returns
    two copies of the first row; 1xN outputs are right). The resize of the transposed image,
    one row wide, computes the same taps and is right, so the reference takes that path."""
    if "size" in where:
        where = {"size": where["size"][::-1]}
    out = F.interpolate(x.transpose(2, 3), **where, **kw).transpose(2, 3)
    return out.contiguous(memory_format=torch.channels_last if is_channels_last(x) else torch.contiguous_format)


def upsample_concat(features, size, *, mode="bilinear", align_corners=None, out=None):
    """See msfast.upsample_concat."""
    features, size, mode, align_corners = concat_args(features, size, mode, align_corners, out)
    kw = _interp_kwargs(mode, align_corners, False)
    kw.pop("antialias", None)
    resized = [F.interpolate(f, size=size, **kw) for f in features]
    if out is not None:
        return torch.cat(resized, 1, out=out)
    return torch.cat(resized, 1)
