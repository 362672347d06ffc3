"""msfast: fused C++/CUDA PyTorch operators for multi-scale vision.

- ``msfast.pyramid``: one batch to K resized (and normalized) levels in one kernel.
- ``msfast.upsample_concat``: resize feature maps to one size and concatenate them, with no
  intermediate tensors.
- ``msfast.reference``: the same two functions in pure PyTorch (oracle, baseline, fallback).
- ``msfast.nn``: ``ImagePyramid`` and ``UpsampleConcat`` modules.
"""

from . import nn, reference
from ._ops import empty_cache, fallback_reason, kernels_available, pyramid, upsample_concat

__version__ = "0.1.0"

__all__ = [
    "pyramid", "upsample_concat", "reference", "nn", "fallback_reason", "kernels_available", "empty_cache",
    "__version__",
]
