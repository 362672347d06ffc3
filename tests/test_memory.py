"""Outputs of 64 KiB or more (served by msfast's CPU output cache): they stay valid while alive, are
never handed out twice, and a reused block is fully rewritten."""

from __future__ import annotations

import gc

import torch
from conftest import GRAD_TOL, randn, ref_pyramid, ref_upsample_concat, tol

import msfast

BIG = (1, 3, 256, 512)  # 1.5 MiB in float32


def test_live_outputs_are_never_reused(device, gen):
    x = randn(gen, *BIG, device=device)
    first = msfast.pyramid(x, scales=[1.0, 0.75])
    snapshot = [lv.clone() for lv in first]
    ptrs = {lv.data_ptr() for lv in first}
    for _ in range(3):
        again = msfast.pyramid(randn(gen, *BIG, device=device), scales=[1.0, 0.75])
        assert not ptrs & {lv.data_ptr() for lv in again}
        del again
    msfast.empty_cache()
    gc.collect()
    for lv, snap in zip(first, snapshot):
        assert torch.equal(lv, snap)
    # Against ATen's CPU kernels, whose formulas msfast follows on both devices (ATen's CUDA
    # antialias kernel rounds differently, by up to ~5e-5 here: see test_cuda.py).
    for lv, r in zip(first, ref_pyramid(x.cpu(), scales=[1.0, 0.75])):
        torch.testing.assert_close(lv.cpu(), r, **tol(torch.float32))


def test_reused_blocks_are_fully_rewritten(device, gen):
    for i in range(3):
        x = randn(gen, *BIG, device=device) * (i + 1)
        levels = msfast.pyramid(x, scales=[1.0, 0.5], mode="bicubic")
        for lv, r in zip(levels, ref_pyramid(x, scales=[1.0, 0.5], mode="bicubic")):
            torch.testing.assert_close(lv, r, **tol(torch.float32))
        feats = [randn(gen, 1, 4, 64, 128, device=device) + i, randn(gen, 1, 4, 32, 64, device=device)]
        out = msfast.upsample_concat(feats, (256, 256))
        torch.testing.assert_close(out, ref_upsample_concat(feats, (256, 256)), **tol(torch.float32, upscale=True))
        del levels, out
    msfast.empty_cache()
    msfast.empty_cache()  # idempotent


def test_large_gradients(device, gen):
    x = randn(gen, *BIG, device=device, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    for _ in range(2):
        x.grad = xr.grad = None
        sum(lv.sum() for lv in msfast.pyramid(x, scales=[1.0, 0.5])).backward()
        sum(lv.sum() for lv in ref_pyramid(xr, scales=[1.0, 0.5])).backward()
        torch.testing.assert_close(x.grad, xr.grad, **GRAD_TOL)


def test_outputs_from_64KiB_come_from_the_cache(gen):
    """A 96 KiB output's block is kept when it is freed and handed to the next output of that
    size, not to other code (here a torch.empty of the same size, which glibc would give the
    freed chunk): freed through glibc, an output from 64 KiB may make glibc trim its heap, which
    cost 2-4 ms inside a bfloat16 preprocess call (see csrc/cpu/out_cache.cpp). Blocks are
    64-byte aligned."""
    x = randn(gen, 1, 3, 128, 64)  # 96 KiB in float32
    msfast.empty_cache()
    first = msfast.pyramid(x, scales=[1.0])[0]
    ptr = first.data_ptr()
    assert ptr % 64 == 0
    del first
    other = torch.empty(1, 3, 128, 64)
    again = msfast.pyramid(x, scales=[1.0])[0]
    assert again.data_ptr() == ptr != other.data_ptr()
    assert torch.equal(again, x)
