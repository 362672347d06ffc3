"""The CPU kernel builds this machine does not pick, against the one it picks.

msfast compiles its CPU kernels twice (baseline and AVX2 + FMA) and picks one at run time:
"base", "avx2", or "avx512bf16" (the AVX2 build whose bfloat16 blends round with AVX-512
BF16, and whose vertical pass and 1/2 and 1/4 downscale stencils run on 512-bit vectors).
The rest of the suite runs the picked one. Here a subprocess forced to another
(MSFAST_CPU_ISA=base or avx2) computes a set of cases, and the results must match: to
rounding for the baseline build, bit for bit between avx2 and avx512bf16.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import msfast

SCRIPT = r"""
import os, sys, torch, msfast
assert msfast._ops._C.build_info()["cpu_isa"] == os.environ["MSFAST_CPU_ISA"], msfast._ops._C.build_info()
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 3, 17, 23, generator=g)
xc = x.contiguous(memory_format=torch.channels_last)
u8 = torch.randint(0, 256, (2, 19, 21, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
feats = [torch.randn(2, c, s, s, generator=g) for c, s in [(4, 14), (3, 7), (2, 5), (5, 20)]]
out = {}
for mode in ["bilinear", "bicubic", "nearest", "nearest-exact", "area"]:
    out[f"pyr_{mode}"] = msfast.pyramid(x, [1, 0.5, 0.6, 1.7], mode=mode)
    out[f"pyr_cl_{mode}"] = msfast.pyramid(xc, [0.25, 2.0], mode=mode)
out["pyr_u8"] = msfast.pyramid(u8, [1, 0.75, 0.5], mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25])
out["pyr_bf16"] = msfast.pyramid(x.bfloat16(), [0.5, 1.3])
out["cat_bf16"] = msfast.upsample_concat([f.bfloat16() for f in feats], (14, 14))
out["cat_bf16_tiny"] = msfast.upsample_concat([(f * 2e-38).bfloat16() for f in feats], (14, 14))
big = [torch.randn(2, c, s, s, generator=g).bfloat16() for c, s in [(8, 7), (4, 14), (2, 3)]]
out["cat_bf16_8x"] = msfast.upsample_concat(big, (56, 56))
# float32 NCHW upscales (window_rows), and sums added (a pyramid's backward: several levels'
# adjoints into one gradient)
out["cat_8x"] = msfast.upsample_concat([b.float() for b in big], (56, 56))
xw = torch.randn(2, 3, 40, 48, generator=g, dtype=torch.float64).float().requires_grad_()
for lv in msfast.pyramid(xw, [2.0, 4.0, 0.5]):
    lv.backward(torch.randn(lv.shape, generator=g))
out["pyr_up_grad"] = [xw.grad]
out["pyr_bf16_tiny"] = msfast.pyramid((x * 2e-38).bfloat16(), [0.5, 0.3])
cl16 = [torch.randn(2, c, s, s, generator=g).contiguous(memory_format=torch.channels_last)
        for c, s in [(16, 7), (32, 14)]]
out["cat_bf16_cl"] = msfast.upsample_concat([f.bfloat16() for f in cl16], (28, 28))
out["cat_bf16_cl_tiny"] = msfast.upsample_concat([(f * 2e-38).bfloat16() for f in cl16], (28, 28))
# channels_last bfloat16 blends, streamed: 48-channel slices on cache lines (64-byte stores, 32
# for the last 16 values), a 16-channel slice off them, 29 rows (blocks of 8 cut short)
old_stream = msfast._ops._C._set_stream_bytes(0)
cl48 = [torch.randn(2, c, h, w, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
        for c, h, w in [(48, 4, 5), (16, 15, 20), (32, 29, 38)]]
out["cat_bf16_cl_stream"] = msfast.upsample_concat(cl48, (29, 38))
out["cat_bf16_cl_stream_tiny"] = msfast.upsample_concat([f * 2e-38 for f in cl48], (29, 38))
# bfloat16 NCHW blends, streamed: on AVX-512 straight to the output as flat runs of whole cache
# lines (rows of 40 and 24 values, 40 source rows, an out= 8 values off a line)
nchw = [torch.randn(2, c, h, w, generator=g).bfloat16() for c, h, w in [(3, 40, 15), (2, 7, 7), (4, 13, 9)]]
flat = torch.empty(2 * 9 * 90 * 40 + 8, dtype=torch.bfloat16)
out["cat_bf16_stream"] = msfast.upsample_concat(nchw, (90, 40), out=flat[8:].view(2, 9, 90, 40))
out["cat_bf16_stream_24"] = msfast.upsample_concat(nchw, (90, 24))
msfast._ops._C._set_stream_bytes(old_stream)
# the vertical pass on 512-bit vectors (taps_run_512): rows of 101 values (a 64-value group,
# a 32-value one, a masked 5), 150 (two groups, a 16-value step, a masked 6) and channels_last
# rows of 303 and 450; a bfloat16 source through its even / odd widening; sums added (the
# backward's terms)
for w in (101, 150):
    wide = torch.randn(2, 3, 40, w, generator=g)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for cl in (False, True):
            xw = wide.to(dt).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
            out[f"pyr_wide_{w}_{dt}_{cl}"] = msfast.pyramid(xw, [0.5, 0.25, 0.7])
    uw = torch.randint(0, 256, (2, 40, w, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
    out[f"pyr_wide_u8_{w}"] = msfast.pyramid(uw, [0.5, 0.3], mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25])
    wg = wide.bfloat16().requires_grad_()
    for lv in msfast.pyramid(wg, [0.5, 0.25, 0.7]):
        lv.backward(torch.randn(lv.shape, generator=g).bfloat16())
    out[f"pyr_wide_grad_{w}"] = [wg.grad]
for cl in (False, True):
    u = u8.contiguous(memory_format=torch.channels_last) if cl else u8.contiguous()
    out[f"pre_bf16_{cl}"] = msfast.pyramid(u, [1, 0.75, 0.5], mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25],
                                           out_dtype=torch.bfloat16)
    fb = [f.bfloat16().contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
          .requires_grad_() for f in feats]
    msfast.upsample_concat(fb, (14, 14)).backward(torch.randn(2, 14, 14, 14, generator=g).bfloat16())
    out[f"cat_bf16_grad_{cl}"] = [f.grad for f in fb]
for mode in ["bilinear", "bicubic", "nearest", "nearest-exact"]:
    out[f"cat_{mode}"] = msfast.upsample_concat(feats, (14, 14), mode=mode)
    out[f"cat_cl_{mode}"] = msfast.upsample_concat([f.contiguous(memory_format=torch.channels_last) for f in feats],
                                                   (9, 11), mode=mode)
xg = x.double().requires_grad_()
msfast.pyramid(xg, [1, 0.5, 1.7])[1].sum().backward()
out["pyr_grad"] = [xg.grad]
fg = [f.double().requires_grad_() for f in feats]
(msfast.upsample_concat(fg, (14, 14)) * torch.arange(14.0, dtype=torch.float64)).sum().backward()
out["cat_grad"] = [f.grad for f in fg]
torch.save(out, sys.argv[1])
"""


PICKED = msfast._ops._C.build_info()["cpu_isa"] if msfast._ops._C is not None else None
ORDER = ["base", "avx2", "avx512bf16"]


@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_other_build_matches_picked_build(tmp_path, isa):
    if PICKED is None or ORDER.index(isa) >= ORDER.index(PICKED):
        pytest.skip(f"this machine picks {PICKED}")
    path = tmp_path / "other.pt"
    env = dict(os.environ, MSFAST_CPU_ISA=isa)
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    other = torch.load(path)
    # The same script in this process (the picked build), compared case by case.
    env_here = {}
    exec(SCRIPT.replace("torch.save(out, sys.argv[1])", "").replace(
        'assert msfast._ops._C.build_info()["cpu_isa"] == os.environ["MSFAST_CPU_ISA"], msfast._ops._C.build_info()',
        ""), env_here)
    here = env_here["out"]
    assert set(here) == set(other)
    for key in other:
        for a, b in zip(here[key], other[key], strict=True):
            if isa == "avx2" or "nearest" in key:  # same arithmetic, or one tap of weight 1: the same bits
                assert torch.equal(a, b), key
            # one rounding apart at most (the baseline build does not fuse multiply-adds)
            tol = {torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2), torch.float16: dict(rtol=2e-3, atol=1e-3)}.get(
                a.dtype, dict(rtol=1e-5, atol=1e-5))
            torch.testing.assert_close(a, b, **tol, msg=lambda m, k=key: f"{k}: {m}")


def test_picked_isa_is_reported():
    info = msfast._ops._C.build_info()
    assert info["cpu_isa"] in ORDER
