"""64-bit indexing on the CPU: a pyramid input and an upsample_concat output past 2^31 elements give
the right values at their far ends, where a 32-bit offset would have wrapped.

Marked ``bigmem`` (about 2.2 and 4.3 GB, a few seconds each; ``-m "not bigmem"`` leaves them out).
Each checks its far end against the reference path run on a small crop, which sees exactly the
same taps (integer-factor upsampling, factor-2 antialias downsampling from an even offset).
The CUDA counterpart is test_cuda.py::test_64bit_indexing.
"""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import tol

import msfast
from msfast import reference

pytestmark = pytest.mark.bigmem


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _need(gib: float):
    try:
        available = _available_bytes()
    except OSError:  # not Linux: try anyway
        return
    if available < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free memory, {available / 2**30:.1f} available")


@pytest.fixture(autouse=True)
def _release():
    yield
    gc.collect()
    msfast.empty_cache()


def test_pyramid_input_past_2_31_elements():
    _need(5)
    side = 26800
    # torch.empty: pages never written read as zeros and cost no memory; only the last 512 rows of
    # every channel (where the offsets of channel 2 cross 2^31, at row 26500) hold random bytes.
    x = torch.empty(1, 3, side, side, dtype=torch.uint8)
    assert x.numel() > 2**31 and 2 * side * side + 26500 * side < 2**31 < 2 * side * side + 26600 * side
    g = torch.Generator().manual_seed(0)
    x[:, :, -512:, :] = torch.randint(0, 256, (1, 3, 512, side), generator=g, dtype=torch.uint8)
    kw = dict(mode="bilinear", antialias=True, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    (got,) = msfast.pyramid(x, [0.5], **kw)
    assert got.shape == (1, 3, side // 2, side // 2)
    # The crop starts at an even row and column: its level is the level's corner, except the first
    # few rows and columns, whose taps the crop cuts off.
    (want,) = reference.pyramid(x[:, :, -512:, -128:], [0.5], **kw)
    torch.testing.assert_close(got[:, :, -248:, -56:], want[:, :, -248:, -56:], rtol=1e-5, atol=1e-5)


def test_upsample_concat_output_past_2_31_elements():
    _need(7)
    factor = 513
    g = torch.Generator().manual_seed(1)
    f = torch.randn(1, 2, 64, 64, generator=g).half()
    size = (64 * factor, 64 * factor)
    out = msfast.upsample_concat([f], size, mode="bilinear")
    assert out.numel() > 2**31
    # Channel 1 crosses 2^31 at row 32575 (of 32832): the compared band covers it. With an integer
    # factor, a crop of the last 4 x 4 pixels upscales to the last rows and columns of the whole,
    # except for its first factor / 2 rows and columns (clamped at the crop's edge).
    assert size[0] * size[1] + (size[0] - 1024) * size[1] < 2**31 < 2 * size[0] * size[1]
    crop = reference.upsample_concat([f[:, :, -4:, -4:].float()], (4 * factor, 4 * factor), mode="bilinear")
    torch.testing.assert_close(out[:, :, -1024:, -64:], crop[:, :, -1024:, -64:].half(), **tol(torch.float16))
    # and the near end, against the crop of the first 4 x 4 pixels
    crop = reference.upsample_concat([f[:, :, :4, :4].float()], (4 * factor, 4 * factor), mode="bilinear")
    torch.testing.assert_close(out[:, :, :64, :64], crop[:, :, :64, :64].half(), **tol(torch.float16))
