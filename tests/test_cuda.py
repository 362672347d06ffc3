"""What only the CUDA backend has to prove: graph capture and replay, the current stream,
deterministic mode, agreement with the CPU kernels, ATen's CUDA nearest rule, the device
cache of tap tables (across streams, inside a capture), descriptors too large for the kernel's
parameters, 64-bit indexing, and the opt-in tiled path (MSFAST_CUDA_TILES=1).

Every test here needs a GPU (marked ``cuda``; skipped without one). The parity, gradient,
determinism and opcheck tests of the other files run on CUDA too through the ``device`` fixture.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import CUDA_OK, GRAD_TOL, randint_u8, randn, tol
from test_gather import TILE_CASES

import msfast
from msfast import reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA_OK, reason="no CUDA device or no msfast CUDA kernels")]

SCALES = [1.0, 0.5, 0.25]
FEATS = [(4, 32, 40), (8, 16, 20), (16, 8, 10)]
SIZE = (32, 40)


def _inputs(gen, cl=False):
    x = randn(gen, 2, 3, 48, 64, device="cuda", channels_last=cl, requires_grad=True)
    feats = [randn(gen, 2, c, h, w, device="cuda", channels_last=cl, requires_grad=True) for c, h, w in FEATS]
    return x, feats


def _step(x, feats, gp, gc):
    """Forward and backward of both operators: returns the outputs and the input gradients."""
    levels = msfast.pyramid(x, SCALES, mode="bilinear", antialias=True)
    cat = msfast.upsample_concat(feats, SIZE, mode="bilinear")
    grads = torch.autograd.grad([*levels, cat], [x, *feats], [*gp, gc])
    return [*levels, cat], list(grads)


def _reference_step(x, feats, gp, gc):
    x = x.detach().requires_grad_()
    feats = [f.detach().requires_grad_() for f in feats]
    levels = reference.pyramid(x, SCALES, mode="bilinear", antialias=True)
    cat = reference.upsample_concat(feats, SIZE, mode="bilinear")
    grads = torch.autograd.grad([*levels, cat], [x, *feats], [*gp, gc])
    return [*levels, cat], list(grads)


def _grads_for(x, feats, gen):
    with torch.no_grad():
        levels = msfast.pyramid(x, SCALES, mode="bilinear", antialias=True)
        cat = msfast.upsample_concat(feats, SIZE, mode="bilinear")
    gp = [randn(gen, *t.shape, device="cuda") for t in levels]
    return gp, randn(gen, *cat.shape, device="cuda")


def _assert_all_close(got, want, **kw):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **kw, msg=lambda m, i=i: f"tensor {i}: {m}")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_graph_capture_and_replay(layout, gen):
    """Forward + backward of both operators captured in one CUDA graph; replays on new input
    values give the reference results, also after other calls have reused host memory."""
    x, feats = _inputs(gen, layout == "channels_last")
    gp, gc = _grads_for(x, feats, gen)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
        for _ in range(2):
            _step(x, feats, gp, gc)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs, grads = _step(x, feats, gp, gc)
    for _ in range(3):
        with torch.no_grad():
            x.copy_(torch.randn(x.shape, generator=gen).to("cuda"))
            for f in feats:
                f.copy_(torch.randn(f.shape, generator=gen).to("cuda"))
            for g in [*gp, gc]:
                g.copy_(torch.randn(g.shape, generator=gen).to("cuda"))
            # Other calls in between (other shapes): a replay must not read their tables.
            msfast.pyramid(torch.rand(1, 3, 37, 29, device="cuda"), [0.7, 0.3])
            msfast.upsample_concat([torch.rand(1, 2, 5, 7, device="cuda")], (9, 11))
        graph.replay()
        torch.cuda.synchronize()
        want_outs, want_grads = _reference_step(x, feats, gp, gc)
        _assert_all_close(outs, want_outs, **tol(torch.float32, upscale=True))
        _assert_all_close(grads, want_grads, **GRAD_TOL)


def test_runs_on_the_current_stream(gen):
    """Work queued on a side stream: msfast reads its inputs and writes its outputs in that
    stream's order (a slow producer before it, a consumer after it)."""
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # tens of ms: an unsynchronised read would see garbage
        x = torch.randn(2, 3, 48, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(3)) * 2 + 1
        levels = msfast.pyramid(x, SCALES, mode="bicubic", antialias=True)
        cat = msfast.upsample_concat([x, levels[1], levels[2]], (48, 64))
    side.synchronize()
    want = reference.pyramid(x, SCALES, mode="bicubic", antialias=True)
    _assert_all_close(levels, want, **tol(torch.float32))
    torch.testing.assert_close(cat, reference.upsample_concat([x, want[1], want[2]], (48, 64)),
                               **tol(torch.float32, upscale=True))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_backward_under_deterministic_algorithms(layout, gen):
    """ATen's CUDA bilinear backward raises here (it uses atomicAdd); msfast's gathers run,
    and two runs are bitwise equal."""
    x, feats = _inputs(gen, layout == "channels_last")
    gp, gc = _grads_for(x, feats, gen)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        outs1, grads1 = _step(x, feats, gp, gc)
        outs2, grads2 = _step(x, feats, gp, gc)
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(outs1 + grads1, outs2 + grads2):
        assert torch.equal(a, b)
    want_outs, want_grads = _reference_step(x, feats, gp, gc)
    _assert_all_close(grads1, want_grads, **GRAD_TOL)


@pytest.mark.parametrize("mode,antialias", [("bilinear", True), ("bilinear", False), ("bicubic", True),
                                            ("bicubic", False), ("area", False)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cuda_matches_cpu_kernels(mode, antialias, layout, gen):
    """The two backends share their tables: float64 results agree to rounding. (Not the nearest
    modes: each backend follows its own device's ATen rule, see the test below.)"""
    cl = layout == "channels_last"
    x = randn(gen, 2, 5, 41, 30, dtype=torch.float64, channels_last=cl)
    scales = [1.0, 0.61, 0.3]
    kw = dict(mode=mode, antialias=antialias) if mode in ("bilinear", "bicubic") else dict(mode=mode)
    cpu = msfast.pyramid(x, scales, **kw)
    gpu = msfast.pyramid(x.cuda(), scales, **kw)
    _assert_all_close([g.cpu() for g in gpu], cpu, rtol=1e-12, atol=1e-12)
    if mode != "area":
        feats = [randn(gen, 2, c, h, w, dtype=torch.float64, channels_last=cl) for c, h, w in FEATS]
        cmode = dict(mode=mode)
        got = msfast.upsample_concat([f.cuda() for f in feats], (37, 45), **cmode)
        torch.testing.assert_close(got.cpu(), msfast.upsample_concat(feats, (37, 45), **cmode),
                                   rtol=1e-12, atol=1e-12)


def test_uint8_normalize_matches_cpu(gen):
    img = randint_u8(gen, 2, 67, 53, 3).permute(0, 3, 1, 2)  # an NHWC byte image viewed as NCHW
    kw = dict(mode="bilinear", antialias=True, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    cpu = msfast.pyramid(img, [1.0, 0.5, 0.3], **kw)
    gpu = msfast.pyramid(img.cuda(), [1.0, 0.5, 0.3], **kw)
    _assert_all_close([g.cpu() for g in gpu], cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
def test_nearest_follows_atens_cuda_rule(mode, gen):
    """ATen's CUDA nearest kernels have no 1x / 2x shortcut (its CPU channels-last kernel has):
    scale 2.05 maps 10 rows to 20, 1.2 maps 3 columns to 3 and 1.1 maps 6 to 6, where the rules
    differ."""
    x = randn(gen, 2, 4, 10, 6, device="cuda")
    for cl in (False, True):
        xl = x.contiguous(memory_format=torch.channels_last) if cl else x
        for s in (2.05, 1.2, 0.61, 1.1):
            got = msfast.pyramid(xl, [s], mode=mode)[0]
            want = F.interpolate(xl, scale_factor=s, mode=mode)
            assert torch.equal(got, want), f"scale {s}, channels_last={cl}"


def test_antialias_is_as_close_to_aten_cuda_as_aten_cpu_is(gen):
    """msfast follows ATen's CPU antialias formulas on both devices; ATen's CUDA kernel rounds
    its weights differently (up to ~5e-5 on a 512-wide float32 image). msfast's CUDA result must
    be no further from ATen's CUDA result than ATen's own CPU result is."""
    x = randn(gen, 1, 3, 256, 512)
    for mode in ("bilinear", "bicubic"):
        for s in (0.75, 0.3):
            got = msfast.pyramid(x.cuda(), [s], mode=mode, antialias=True)[0].cpu()
            aten_cuda = F.interpolate(x.cuda(), scale_factor=s, mode=mode, antialias=True).cpu()
            aten_cpu = F.interpolate(x, scale_factor=s, mode=mode, antialias=True)
            gap = (aten_cpu - aten_cuda).abs().max().item()
            assert (got - aten_cuda).abs().max().item() <= gap + 2e-6, (mode, s)
            torch.testing.assert_close(got, aten_cpu, **tol(torch.float32))


def _unique_shape(k: int):
    """An input shape no other test uses: its tables are not yet in the device cache."""
    return (2, 3, 101 + 2 * k, 67 + 3 * k)


def test_tables_first_used_inside_a_graph_capture(gen):
    """A shape first seen inside a capture: its tables are uploaded by the graph itself (not
    taken into the cache, whose copy a capture cannot wait for); replays and later eager calls
    of that shape are right."""
    x = randn(gen, *_unique_shape(0), device="cuda")
    scales = [0.83, 0.41]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        levels = msfast.pyramid(x, scales, mode="bilinear", antialias=True)
    for _ in range(2):
        with torch.no_grad():
            x.copy_(torch.randn(x.shape, generator=gen).to("cuda"))
        graph.replay()
        torch.cuda.synchronize()
        _assert_all_close(levels, reference.pyramid(x, scales, mode="bilinear", antialias=True),
                          **tol(torch.float32))
    eager = msfast.pyramid(x, scales, mode="bilinear", antialias=True)
    _assert_all_close(eager, levels, rtol=0, atol=0)


def test_tables_cached_on_one_stream_used_on_another(gen):
    """The first call of a shape queues its tables' upload behind slow work on one stream; a
    call of the same shape on an idle stream must wait for that upload, not read the tables
    before they arrive."""
    x = randn(gen, *_unique_shape(1), device="cuda")
    scales = [0.77, 0.29]
    busy, idle = torch.cuda.Stream(), torch.cuda.Stream()
    busy.wait_stream(torch.cuda.current_stream())
    idle.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(busy):
        torch.cuda._sleep(50_000_000)
        first = msfast.pyramid(x, scales, mode="bicubic", antialias=True)
    with torch.cuda.stream(idle):
        second = msfast.pyramid(x, scales, mode="bicubic", antialias=True)
    torch.cuda.synchronize()
    want = reference.pyramid(x, scales, mode="bicubic", antialias=True)
    _assert_all_close(second, want, **tol(torch.float32, upscale=True))
    _assert_all_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize("n", [20, 40])
def test_many_features_in_one_call(n, gen):
    """Descriptors of 20 features fit the kernel's parameters; those of 40 do not and are
    uploaded: both give the reference result, forward and backward."""
    feats = [randn(gen, 2, 1 + i % 3, 3 + i % 5, 4 + i % 7, device="cuda", requires_grad=True) for i in range(n)]
    out = msfast.upsample_concat(feats, (9, 10))
    torch.testing.assert_close(out, reference.upsample_concat(feats, (9, 10)), **tol(torch.float32, upscale=True))
    g = randn(gen, *out.shape, device="cuda")
    got = torch.autograd.grad(out, feats, g)
    want = torch.autograd.grad(reference.upsample_concat(feats, (9, 10)), feats, g)
    _assert_all_close(got, want, **GRAD_TOL)


def _far_corner_of_upscale(f, factor):
    """The last 4 x 64 values of bilinear-upscaling f by an integer factor, from a resize of its
    last 4 x 4 pixels alone (an integer factor keeps the crop's taps those of the full resize)."""
    crop = f[:, :, -4:, -4:].float()
    return F.interpolate(crop, size=(4 * factor, 4 * factor), mode="bilinear")[:, :, -4:, -64:].to(f.dtype)


@pytest.mark.bigmem
def test_64bit_indexing(gen):
    """Past 2^31: an upsample_concat output of 2^33 values (float16, 17 GB; the kernel's 64-bit
    index path) and a pyramid input of 2^31 values (uint8, 2.2 GB). The far ends are right."""
    free, _ = torch.cuda.mem_get_info()
    if free < 30 << 30:
        pytest.skip("needs 30 GiB of free GPU memory")
    factor = 1026
    f = randn(gen, 1, 2, 64, 64, dtype=torch.float16, device="cuda")
    size = (64 * factor, 64 * factor)
    assert 2 * size[0] * size[1] > 2**33
    out = msfast.upsample_concat([f], size, mode="bilinear")
    torch.testing.assert_close(out[:, :, -4:, -64:], _far_corner_of_upscale(f, factor), **tol(torch.float16))
    del out
    x = torch.randint(0, 256, (1, 3, 26800, 26800), dtype=torch.uint8, device="cuda")
    assert x.numel() > 2**31
    got = msfast.pyramid(x, [0.5], mode="bilinear", antialias=True)[0]
    crop = x[:, :, -64:, -64:]  # an even offset: the crop's level is the level's corner
    want = reference.pyramid(crop, [0.5], mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(got[:, :, -8:, -8:], want[:, :, -8:, -8:], rtol=1e-5, atol=1e-4)


@pytest.fixture
def cuda_tiles():
    """The CUDA tiled path on (it is opt-in: MSFAST_CUDA_TILES=1), restored afterwards."""
    prev = msfast._ops._C._set_cuda_tiles(True)
    try:
        yield
    finally:
        msfast._ops._C._set_cuda_tiles(prev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(TILE_CASES))
def test_tiled_path_matches_the_gather(case, dtype, cuda_tiles, gen):
    """The calls test_gather.py runs through the tiled path's code on the CPU, on the GPU: the
    tiled kernel runs (the hook counts it), agrees with the gather kernel (the same sums in the
    same order; the compiler's fused multiply-adds may still differ) and with the reference,
    into a fresh output and into out=."""
    spec, size, kw = TILE_CASES[case]
    feats = [randn(gen, 2, c, h, w, dtype=dtype, device="cuda") for c, h, w in spec]
    before = msfast._ops._C._tiled_calls()
    got = msfast.upsample_concat(feats, size, **kw)
    out = torch.full_like(got, float("nan"))
    msfast.upsample_concat(feats, size, out=out, **kw)
    torch.cuda.synchronize()
    assert msfast._ops._C._tiled_calls() == before + 2
    msfast._ops._C._set_cuda_tiles(False)
    want = msfast.upsample_concat(feats, size, **kw)
    msfast._ops._C._set_cuda_tiles(True)
    # float: a rounding apart at most; 16-bit: a rounding of float sums that differ by one.
    near = {torch.float32: dict(rtol=2e-7, atol=1e-6), torch.float64: dict(rtol=1e-15, atol=1e-14)}
    torch.testing.assert_close(got, want, **near.get(dtype, tol(dtype)))
    assert torch.equal(out, got)
    t = tol(dtype, upscale=True)
    if dtype == torch.float32:
        t["atol"] = max(t["atol"], 5e-5)  # as in test_gather.py::test_tiled_path
    torch.testing.assert_close(got, reference.upsample_concat(feats, size, **kw), **t)


def test_tiled_path_with_uint8_and_affine(cuda_tiles, gen):
    x = randint_u8(gen, 2, 3, 13, 10, device="cuda")
    kw = dict(mode="bilinear", mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    before = msfast._ops._C._tiled_calls()
    got = msfast.pyramid(x, [1.0, 1.5, 2.25], **kw)
    torch.cuda.synchronize()
    assert msfast._ops._C._tiled_calls() == before + 1
    _assert_all_close(got, reference.pyramid(x, [1.0, 1.5, 2.25], **kw), **tol(torch.float32, upscale=True))


def test_tiled_path_in_a_graph_capture(cuda_tiles, gen):
    """Captured and replayed with new inputs, like the gather kernel (its descriptors travel in
    the kernel's parameters, its window lives in shared memory)."""
    spec, size, _ = TILE_CASES["fpn"]
    feats = [randn(gen, 2, c, h, w, device="cuda") for c, h, w in spec]
    msfast.upsample_concat(feats, size)  # tables cached before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = msfast.upsample_concat(feats, size)
    for _ in range(2):
        with torch.no_grad():
            for f in feats:
                f.copy_(torch.randn(f.shape, generator=gen).to("cuda"))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, reference.upsample_concat(feats, size), **tol(torch.float32, upscale=True))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_resident_grid_gives_the_same_bits(layout, gen):
    """MSFAST_CUDA_GRID=resident (opt-in) only changes how many blocks share the gather's work
    items: each item is computed the same way, so both operators' forward and backward are
    bitwise those of the default grid."""
    x, feats = _inputs(gen, cl=layout == "channels_last")
    gp, gc = _grads_for(x, feats, gen)
    prev = msfast._ops._C._set_cuda_grid_resident(False)
    try:
        want_out, want_grads = _step(x, feats, gp, gc)
        msfast._ops._C._set_cuda_grid_resident(True)
        got_out, got_grads = _step(x, feats, gp, gc)
    finally:
        msfast._ops._C._set_cuda_grid_resident(prev)
    _assert_all_close(got_out, want_out, rtol=0, atol=0)
    _assert_all_close(got_grads, want_grads, rtol=0, atol=0)
