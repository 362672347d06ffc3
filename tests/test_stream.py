"""Non-temporal stores and the pixel order of channels_last concats (csrc/cpu/resample_kernels.h,
JobPlan::stream and run_typed).

A CPU call that moves more than ``msfast._C._set_stream_bytes`` bytes (16 MiB by default, inputs
and output) writes an output with non-temporal stores when every byte of it can take one: jobs
of two-tap upscales or copies, every run aligned to one store, 16-bit NCHW rows only when copied
(as whole runs of rows) or, where ``_set_staged_rows`` allows it (by default on Intel processors),
blended through a staging buffer (bfloat16 with AVX-512 BF16: straight to the output, as flat runs
of whole cache lines), and no job that cannot stream writing into the same tensor. Here
the threshold is lowered to 0 so small inputs take that path; ``_streamed_calls`` says whether they
did. The stores hold the same values as plain ones, so streamed results must equal the plain
results bit for bit, and the reference. Both settings of the staging are tested on every machine.

A channels_last concat whose features can be computed pixel by pixel writes each output pixel's
slices in turn (all features of a row at once); those results are checked against the reference
for every kind of term that path runs. Its backward, with enough images for the threads, reads
the gradient's rows in order (source order): every feature's gradient must equal, bit for bit,
the one computed image by image (the row order), and the reference's.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import GRAD_TOL, randn, ref_pyramid, ref_upsample_concat, tol

import msfast
from msfast import _ops

pytestmark = pytest.mark.skipif(_ops._C is None, reason="msfast._C is not built")

AVX2 = _ops._C is not None and _ops._C.build_info()["cpu_isa"] in ("avx2", "avx512bf16")


@contextlib.contextmanager
def _staged_rows(on: bool):
    """Whether 16-bit NCHW blended rows may stream (through the staging buffer), within the block."""
    old = _ops._C._set_staged_rows(on)
    try:
        yield on
    finally:
        _ops._C._set_staged_rows(old)


@pytest.fixture(params=[False, True], ids=["unstaged", "staged"])
def staged(request):
    """Both settings of the staging, for the test."""
    with _staged_rows(request.param):
        yield request.param


def _streamed(fn, threads=None):
    """(fn() with the threshold at 0, fn() with the default threshold, whether the first streamed);
    the first with `threads` threads if given."""
    before = _ops._C._streamed_calls()
    old = _ops._C._set_stream_bytes(0)
    old_threads = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        fast = fn()
    finally:
        _ops._C._set_stream_bytes(old)
        torch.set_num_threads(old_threads)
    streamed = _ops._C._streamed_calls() > before
    plain = fn()
    return fast, plain, streamed


# fpn_concat's pattern, scaled down: an identity feature (copied) and 2x, 4x, 8x upscales (two
# taps), channel counts of whole stores in both dtypes.
SPEC = [(16, 32), (32, 16), (16, 8), (8, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("use_out", [False, True])
def test_streamed_concat_matches_plain_and_reference(gen, dtype, channels_last, use_out, staged):
    feats = [randn(gen, 2, c, s, s, dtype=dtype, channels_last=channels_last) for c, s in SPEC]
    shape = (2, sum(c for c, _ in SPEC), 32, 32)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def run():
        if not use_out:
            return msfast.upsample_concat(feats, (32, 32))
        out = torch.full(shape, float("nan"), dtype=dtype).contiguous(memory_format=fmt)
        res = msfast.upsample_concat(feats, (32, 32), out=out)
        assert res.data_ptr() == out.data_ptr()
        return res

    fast, plain, streamed = _streamed(run)
    # bfloat16 NCHW blended rows stream only staged (see JobPlan::stream)
    assert streamed == (AVX2 and (dtype == torch.float32 or channels_last or staged))
    assert torch.equal(fast, plain)
    torch.testing.assert_close(fast, ref_upsample_concat(feats, (32, 32)), **tol(dtype, upscale=True))


@pytest.mark.parametrize(
    "case",
    [
        # 7-value float32 rows (28 bytes): NCHW row starts are not all 32-byte aligned
        dict(spec=[(3, 7), (2, 4)], size=(7, 7), mode="bilinear", cl=False),
        # three channels a pixel: channels_last slices are not whole stores
        dict(spec=[(3, 8), (5, 4)], size=(8, 8), mode="bilinear", cl=True),
        # four taps: not a blend of two rows
        dict(spec=[(16, 8), (8, 4)], size=(16, 16), mode="bicubic", cl=True),
    ],
    ids=["unaligned-rows", "unaligned-slices", "bicubic"],
)
def test_unstreamable_calls_use_plain_stores(gen, case):
    feats = [randn(gen, 2, c, s, s, channels_last=case["cl"]) for c, s in case["spec"]]
    fast, plain, streamed = _streamed(lambda: msfast.upsample_concat(feats, case["size"], mode=case["mode"]))
    assert not streamed
    assert torch.equal(fast, plain)
    torch.testing.assert_close(fast, ref_upsample_concat(feats, case["size"], mode=case["mode"]),
                               **tol(torch.float32, upscale=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pyramid_streams_its_copied_level_only(gen, channels_last, dtype):
    """Each level is its own tensor: the scale-1 level (a copy; in 16-bit NCHW one run of rows
    per task) streams, the downscaled ones, whose rows (80 or 40 bytes in NCHW float32, 240 or
    120 in channels_last) are not whole stores, keep plain stores, and all match the plain
    results and the reference."""
    x = randn(gen, 2, 3, 32, 40, dtype=dtype, channels_last=channels_last)
    kw = dict(mode="bilinear", antialias=True)
    fast, plain, streamed = _streamed(lambda: msfast.pyramid(x, [1.0, 0.5, 0.25], **kw))
    assert streamed == AVX2
    for a, b, r in zip(fast, plain, ref_pyramid(x, [1.0, 0.5, 0.25], **kw), strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, r, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_other_rows_stream_through_the_stage(gen, dtype, channels_last, threads, staged):
    """Rows that are neither blends of two rows nor copies (here antialiased downscales only,
    so nothing else streams) are computed into a staging buffer in runs of rows and streamed
    from there: 512-byte float32 NCHW rows in runs of 5, 1536-byte channels_last rows one at a
    time, and runs cut where a thread's share of the rows ends (a pyramid's threads split its
    rows by cost, mid-plane here). 16-bit rows only where blends are staged too. Bit for bit the
    plain results, whatever the thread count, and the reference's values."""
    x = randn(gen, 2, 3, 256, 256, dtype=dtype, channels_last=channels_last)
    kw = dict(mode="bilinear", antialias=True)
    fast, plain, streamed = _streamed(lambda: msfast.pyramid(x, [0.5, 0.25], **kw), threads=threads)
    assert streamed == (AVX2 and (dtype == torch.float32 or staged))
    for a, b, r in zip(fast, plain, ref_pyramid(x, [0.5, 0.25], **kw), strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, r, **tol(dtype))


def test_normalized_uint8_pyramid_streams(gen):
    """preprocess's call: uint8 images read as a channels_last view, normalized into float32
    levels (each row an affine job's), streamed through the stage where the rows are whole
    stores (56 and 32 pixels of 3 channels: 672 and 384 bytes; the 42-pixel level's 504-byte
    rows are not), bit for bit the plain results."""
    img = torch.randint(0, 256, (4, 64, 112, 3), dtype=torch.uint8, generator=gen)
    x = img.permute(0, 3, 1, 2)
    kw = dict(mode="bilinear", antialias=True, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    scales = [0.5, 0.375, 0.25]
    fast, plain, streamed = _streamed(lambda: msfast.pyramid(x, scales, **kw))
    assert streamed == AVX2
    for a, b, r in zip(fast, plain, ref_pyramid(x, scales, **kw), strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, r, **tol(torch.float32))


@pytest.mark.parametrize("channels_last", [False, True])
def test_streamed_pyramid_backward(gen, channels_last):
    """A pyramid's backward writes the input's gradient as rows of transposed tables, streamed
    through the stage: the same gradient as with plain stores, bit for bit, and the reference's."""
    x = randn(gen, 2, 3, 64, 64, channels_last=channels_last)
    scales = [0.5, 0.25]
    grads = [randn(gen, 2, 3, int(64 * s), int(64 * s), channels_last=channels_last) for s in scales]

    def grad(fn):
        xx = x.detach().clone().requires_grad_(True)
        torch.autograd.backward(fn(xx, scales, antialias=True), grads)
        return xx.grad

    fast, plain, streamed = _streamed(lambda: grad(msfast.pyramid))
    assert streamed == AVX2
    assert torch.equal(fast, plain)
    torch.testing.assert_close(fast, grad(ref_pyramid), **GRAD_TOL)


def test_bfloat16_nchw_copy_streams_alone(gen, staged):
    """A 16-bit NCHW feature already at the concat's size is copied with non-temporal stores,
    and so is a concat with an upscaled feature when its blended rows stream too (staged);
    unstaged, they take plain stores, and then the copy does as well."""
    same = [randn(gen, 2, 8, 16, 16, dtype=torch.bfloat16), randn(gen, 2, 4, 16, 16, dtype=torch.bfloat16)]
    fast, plain, streamed = _streamed(lambda: msfast.upsample_concat(same, (16, 16)))
    assert streamed == AVX2
    assert torch.equal(fast, plain)
    assert torch.equal(fast, torch.cat(same, dim=1))
    mixed = [same[0], randn(gen, 2, 4, 8, 8, dtype=torch.bfloat16)]
    fast, plain, streamed = _streamed(lambda: msfast.upsample_concat(mixed, (16, 16)))
    assert streamed == (AVX2 and staged)
    assert torch.equal(fast, plain)
    torch.testing.assert_close(fast, ref_upsample_concat(mixed, (16, 16)), **tol(torch.bfloat16, upscale=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threads", [1, 2])
def test_staged_rows_any_split(gen, dtype, threads):
    """16-bit NCHW upscales staged and streamed: runs of rows end where a task's rows end,
    mid-plane and mid-line (a [2, 24, 40, 40] output is split into tasks of about 32K values,
    and 80-byte rows), with 2x, 4x and 8x blocks of rows and a copied feature beside them;
    the results must equal the plain ones bit for bit, whatever the thread count. (bfloat16:
    through the stage, or as flat runs where the processor has AVX-512 BF16.)"""
    feats = [randn(gen, 2, c, s, s, dtype=dtype) for c, s in [(4, 40), (8, 20), (8, 10), (4, 5)]]
    with _staged_rows(True):
        fast, plain, streamed = _streamed(lambda: msfast.upsample_concat(feats, (40, 40)), threads=threads)
    assert streamed == AVX2
    assert torch.equal(fast, plain)
    torch.testing.assert_close(fast, ref_upsample_concat(feats, (40, 40)), **tol(dtype, upscale=True))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("scale", [1.0, 2e-38], ids=["normal", "tiny"])
def test_streamed_bfloat16_blends_as_flat_runs(gen, threads, scale):
    """Where the processor has AVX-512 BF16, the streamed rows of a bfloat16 NCHW upscale go
    straight to the output, each block's rows as one flat run cut at cache lines
    (blend2_flat_bf16_512): a 16-value half that crosses a row's end takes the next row's
    values and weights, and a run's first and last partial lines take masked stores. Rows of
    16, 24, 40 and 56 values (planes of 24 and 40 end mid-line); 40 source rows, more than one
    block of them; an out= 8 values (16 bytes, the streaming stores' alignment) off a cache
    line; two threads splitting planes mid-line. Tiny values (blends that could be subnormal)
    take the staged rows instead. Bit for bit the plain results, and the reference's values;
    the values around out= untouched."""
    spec = [(3, 40, 15), (2, 7, 7), (4, 13, 9)]
    feats = [(randn(gen, 2, c, h, w) * scale).bfloat16() for c, h, w in spec]
    for size in [(90, 16), (90, 24), (90, 40), (56, 56)]:
        n = 2 * 9 * size[0] * size[1]
        for off in (0, 8):
            buf = torch.full((n + 16,), 7.0, dtype=torch.bfloat16)
            out = buf[off:off + n].view(2, 9, *size)

            def run(out=out, size=size):
                return msfast.upsample_concat(feats, size, out=out).clone()

            with _staged_rows(True):
                fast, plain, streamed = _streamed(run, threads=threads)
            assert streamed == AVX2
            assert torch.equal(fast, plain), (size, off)
            torch.testing.assert_close(fast, ref_upsample_concat(feats, size), **tol(torch.bfloat16, upscale=True))
            assert (buf[:off] == 7).all() and (buf[off + n:] == 7).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 2e-38], ids=["normal", "tiny"])
@pytest.mark.parametrize("size", [(600, 600), (9, 8200), (72, 56)], ids=["tall", "wide", "line_runs"])
def test_staged_rows_in_bounded_runs(gen, size, scale, dtype):
    """A large upscale's block of rows is far more than the staging buffer's 2.5 KB: it is
    staged and streamed in runs of whole rows (2 rows of 1200 bytes; a 16400-byte row alone;
    112-byte rows in runs of 20, which end on cache lines, and a last run of 12), with the
    same results as plain stores. Where the processor has AVX-512 BF16, bfloat16 rows whose
    blends pass blend_inputs_safe go as flat runs instead
    (test_streamed_bfloat16_blends_as_flat_runs): there tiny values (blends that could be
    subnormal) and float16 are what take the stage."""
    feats = [(randn(gen, 1, 2, 4, 4) * scale).to(dtype)]
    with _staged_rows(True):
        fast, plain, streamed = _streamed(lambda: msfast.upsample_concat(feats, size))
    assert streamed == AVX2
    assert torch.equal(fast, plain)
    torch.testing.assert_close(fast, ref_upsample_concat(feats, size), **tol(dtype, upscale=True))


def test_staged_rows_hook_default_and_returns_previous():
    """On by default on Intel processors only (JobPlan::stream); the hook returns the previous value."""
    intel = False
    try:
        with open("/proc/cpuinfo") as f:
            intel = any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    default = _ops._C._set_staged_rows(not intel)
    try:
        assert default == intel
        assert _ops._C._set_staged_rows(intel) == (not intel)
    finally:
        _ops._C._set_staged_rows(default)


def test_concat_with_one_unaligned_slice_does_not_stream(gen):
    """Slices of one tensor share cache lines at their edges: when one cannot stream (three
    channels a pixel), none does."""
    feats = [randn(gen, 2, 16, 16, 16, channels_last=True), randn(gen, 2, 3, 8, 8, channels_last=True)]
    fast, plain, streamed = _streamed(lambda: msfast.upsample_concat(feats, (16, 16)))
    assert not streamed
    assert torch.equal(fast, plain)
    torch.testing.assert_close(fast, ref_upsample_concat(feats, (16, 16)), **tol(torch.float32, upscale=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest", "nearest-exact"])
def test_channels_last_concat_pixel_order(gen, dtype, mode):
    """Every kind of term the pixel order computes: identity (copied), upscales (two-tap blends,
    bicubic's four taps), wide downscales (resampled horizontally first), a feature needing only
    a vertical pass, and odd channel counts (slices that share cache lines)."""
    feats = [
        randn(gen, 2, 17, 12, 10, dtype=dtype, channels_last=True),  # identity
        randn(gen, 2, 16, 5, 4, dtype=dtype, channels_last=True),    # upscale
        randn(gen, 2, 20, 30, 25, dtype=dtype, channels_last=True),  # downscale, 20 channels
        randn(gen, 2, 3, 6, 10, dtype=dtype, channels_last=True),    # vertical only
    ]
    out = msfast.upsample_concat(feats, (12, 10), mode=mode)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref_upsample_concat(feats, (12, 10), mode=mode), **tol(dtype, upscale=True))


@pytest.mark.parametrize("threads", [1, 2])
def test_channels_last_bfloat16_blends_stream_by_blocks_of_rows(gen, threads):
    """The pixel order takes output rows 8 at a time, and writes the rows of an upscale that blend
    the same two source rows together: with 64-byte stores where a slice starts on a cache line
    (32-byte ones for the last 16 of 48 channels), row by row where it does not (16 channels after
    48). 29 rows end the last block early, and a task's rows need not start a block."""
    spec = [(48, 4, 5), (16, 15, 20), (32, 29, 38)]
    feats = [randn(gen, 3, c, h, w, dtype=torch.bfloat16, channels_last=True) for c, h, w in spec]
    fast, plain, streamed = _streamed(lambda: msfast.upsample_concat(feats, (29, 38)), threads)
    assert streamed == AVX2
    assert torch.equal(fast, plain)
    torch.testing.assert_close(fast, ref_upsample_concat(feats, (29, 38)), **tol(torch.bfloat16, upscale=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_concat_pixel_order_large_rings(gen, dtype):
    """A downscale of 128 channels (16x down, 2x across) next to an upscale: the rings that would
    hold 8 output rows' source rows (128 rows of 16 pixels, 1 MiB, and the upscale's) pass the
    1 MiB the pixel order allows, so it takes 4 rows at a time, with rings of 64 rows. (With
    rings of 32 rows, as for 2 rows at a time, the results are wrong.)"""
    feats = [randn(gen, 2, 128, 256, 32, dtype=dtype, channels_last=True),
             randn(gen, 2, 16, 4, 4, dtype=dtype, channels_last=True)]
    out = msfast.upsample_concat(feats, (16, 16))
    torch.testing.assert_close(out, ref_upsample_concat(feats, (16, 16)), **tol(dtype, upscale=True))


def test_channels_last_concat_pixel_order_backward(gen):
    feats = [randn(gen, 1, c, s, s + 1, dtype=torch.float64, channels_last=True, requires_grad=True)
             for c, s in [(16, 3), (16, 2), (16, 5)]]
    assert torch.autograd.gradcheck(lambda *f: msfast.upsample_concat(list(f), (3, 4)), feats)


def test_stream_threshold_hook_returns_previous():
    old = _ops._C._set_stream_bytes(123)
    try:
        assert _ops._C._set_stream_bytes(456) == 123
    finally:
        _ops._C._set_stream_bytes(old)
    assert old == 16 << 20


def test_default_threshold_is_16MiB(gen):
    """At the default threshold a call moving 19.7 MB (a float32 [4, 3, 512, 640] image to half
    size, antialiased) streams, and one moving 1 MB does not."""
    for shape, expect in [((4, 3, 512, 640), AVX2), ((4, 3, 128, 128), False)]:
        x = randn(gen, *shape)
        before = _ops._C._streamed_calls()
        out = msfast.pyramid(x, [0.5], antialias=True)[0]
        assert (_ops._C._streamed_calls() > before) == expect, shape
        torch.testing.assert_close(out, ref_pyramid(x, [0.5], antialias=True)[0], **tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
def test_channels_last_concat_backward_source_order(gen, one_thread, dtype, mode):
    spec = [(16, 12), (24, 6), (32, 3), (16, 5)]  # identity (a copy), 2x, 4x and 12/5 upscales
    feats = [randn(gen, 4, c, s, s, dtype=dtype, channels_last=True, requires_grad=True) for c, s in spec]
    grad = randn(gen, 4, sum(c for c, _ in spec), 12, 12, dtype=dtype, channels_last=True)
    batch = torch.autograd.grad(msfast.upsample_concat(feats, (12, 12), mode=mode), feats, grad)
    for i in range(4):  # one image: too few planes for the source order
        one = [f[i:i + 1].detach().requires_grad_() for f in feats]
        per = torch.autograd.grad(msfast.upsample_concat(one, (12, 12), mode=mode), one, grad[i:i + 1])
        for b, p in zip(batch, per, strict=True):
            assert torch.equal(b[i:i + 1], p)
    ref = [f.detach().requires_grad_() for f in feats]
    expect = torch.autograd.grad(ref_upsample_concat(ref, (12, 12), mode=mode), ref, grad)
    for b, e in zip(batch, expect, strict=True):
        torch.testing.assert_close(b, e, **(tol(dtype) if dtype != torch.float32 else GRAD_TOL))


def test_channels_last_concat_backward_source_order_gradcheck(gen, one_thread):
    feats = [randn(gen, 2, c, s, s + 1, dtype=torch.float64, channels_last=True, requires_grad=True)
             for c, s in [(16, 4), (16, 2), (16, 3)]]
    assert torch.autograd.gradcheck(lambda *f: msfast.upsample_concat(list(f), (4, 5)), feats)
