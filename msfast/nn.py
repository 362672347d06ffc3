"""Modules over the two operators, each with ``backend="msfast" | "torch"``.

The torch backend is the reference path (F.interpolate + torch.cat) with identical
numerics, which is what the end-to-end benchmarks compare against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import _ops, reference

__all__ = ["ImagePyramid", "UpsampleConcat"]

_BACKENDS = {"msfast": _ops, "torch": reference}


def _backend(name: str):
    if name not in _BACKENDS:
        raise ValueError(f"msfast: backend must be 'msfast' or 'torch', got {name!r}")
    return _BACKENDS[name]


class ImagePyramid(nn.Module):
    """``x -> [level_0, ..., level_K-1]``, see :func:`msfast.pyramid` for the arguments."""

    def __init__(self, scales: Sequence[float] | None = None, sizes=None, *, mode: str = "bilinear",
                 antialias: bool | None = None, align_corners: bool | None = None, mean=None, std=None,
                 out_dtype: torch.dtype | None = None, backend: str = "msfast"):
        super().__init__()
        if (scales is None) == (sizes is None):
            raise ValueError("msfast: give exactly one of scales or sizes")
        _backend(backend)
        self.scales = list(scales) if scales is not None else None
        self.sizes = list(sizes) if sizes is not None else None
        self.mode, self.antialias, self.align_corners = mode, antialias, align_corners
        self.mean = list(mean) if mean is not None else None
        self.std = list(std) if std is not None else None
        self.out_dtype = out_dtype
        self.backend = backend

    def forward(self, x: torch.Tensor):
        return _backend(self.backend).pyramid(
            x, self.scales, self.sizes, mode=self.mode, antialias=self.antialias, align_corners=self.align_corners,
            mean=self.mean, std=self.std, out_dtype=self.out_dtype,
        )

    def extra_repr(self) -> str:
        levels = f"scales={self.scales}" if self.scales is not None else f"sizes={self.sizes}"
        return f"{levels}, mode={self.mode!r}, backend={self.backend!r}"


class UpsampleConcat(nn.Module):
    """``[f_0, ..., f_K-1] -> cat(resize(f_i, size), dim=1)``, see :func:`msfast.upsample_concat`.

    ``size=None`` resizes to the spatial size of ``features[0]`` (the finest map, by convention).
    """

    def __init__(self, size=None, *, mode: str = "bilinear", align_corners: bool | None = None,
                 backend: str = "msfast"):
        super().__init__()
        _backend(backend)
        self.size = size
        self.mode, self.align_corners = mode, align_corners
        self.backend = backend

    def forward(self, features, size=None):
        size = size if size is not None else self.size
        if size is None:
            if not isinstance(features, (list, tuple)) or not features or not isinstance(features[0], torch.Tensor):
                raise TypeError("msfast: features must be a non-empty list of tensors")
            size = tuple(features[0].shape[-2:])
        return _backend(self.backend).upsample_concat(features, size, mode=self.mode,
                                                      align_corners=self.align_corners)

    def extra_repr(self) -> str:
        return f"size={self.size}, mode={self.mode!r}, backend={self.backend!r}"
