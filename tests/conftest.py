"""Shared helpers for the msfast test suite.

- ``tol(dtype)``: (rtol, atol) that fit a dtype.
- ``ref_pyramid`` / ``ref_upsample_concat``: the pure-PyTorch oracle (msfast.reference), computed in
  float32 and cast back when PyTorch has no CPU kernel for a half type.
- ``device`` fixture: "cpu", plus "cuda" (marked ``cuda``) that skips cleanly without a GPU or
  without compiled msfast CUDA kernels.
- ``gen`` fixture: a fixed-seed torch.Generator per test; ``randn`` / ``randint_u8`` draw from it.
- ``native_and(runner, fn, counter)``: fn() with the CPU kernels and again under a testing runner.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import msfast
from msfast import reference

# torch.compile's on-disk caches (Inductor's FX graph cache, the AOTAutograd cache) key a graph
# by the operators it calls, not by their code: a graph cached by an earlier build of msfast
# can call an operator with the arguments of its old schema. The tests compile into a cache
# of their own (read when a compile first needs it; subprocesses inherit it), removed at exit.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="msfast-tests-inductor-")
atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

REPO_ROOT = Path(__file__).resolve().parents[1]

HALF_TYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MODES = ("bilinear", "bicubic", "nearest", "nearest-exact", "area")
CONCAT_MODES = ("bilinear", "bicubic", "nearest", "nearest-exact")
INTERPOLATING = ("bilinear", "bicubic")

CUDA_OK = torch.cuda.is_available() and msfast.kernels_available("cuda")

# Every hit of the gather path's tap-table cache (CUDA, and the CPU runners of its code) is
# compared with tables built afresh for the call, throughout the suite: a key that missed
# something the tables depend on fails whichever test made two such calls.
if msfast.fallback_reason() is None:
    msfast._ops._C._set_table_cache_check(True)

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA_OK, reason="no CUDA device or no msfast CUDA kernels")],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def one_thread():
    """torch runs one thread for the test: tiny models gain nothing from a second, and on a
    machine whose cores are busy elsewhere two OpenMP threads wait on each other at every
    operator (20x slower here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh generator with a fixed seed: every test draws its own reproducible inputs."""
    return torch.Generator().manual_seed(1234)


class DispatchLog(TorchDispatchMode):
    """A torch_dispatch mode that records (operator, args) of every call it sees."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def tol(dtype: torch.dtype, upscale: bool = False) -> dict:
    """rtol / atol for comparing msfast with the reference in ``dtype`` (the output dtype).

    ``upscale``: float32 results of upscaled randn data get a slightly larger atol (bicubic
    overshoot amplifies the rounding differences of the two summation orders).
    """
    if dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-10}
    if dtype == torch.float32:
        return {"rtol": 1.3e-6, "atol": 2e-5 if upscale else 1e-5}
    if dtype == torch.bfloat16:
        return {"rtol": 1.6e-2, "atol": 2e-2}
    if dtype == torch.float16:
        return {"rtol": 1e-3, "atol": 2e-3}
    raise AssertionError(f"no tolerance for {dtype}")


# float32 gradients against the reference: adjoints sum many taps, so allow a little more.
GRAD_TOL = {"rtol": 1e-5, "atol": 1e-4}


# The property-based tests (test_fuzz.py, test_gather.py): derandomized and repeatable by
# default. MSFAST_FUZZ=N runs N times their examples from random seeds, a longer search for a
# developer's machine; a failure prints its shrunk example and a @reproduce_failure blob. A
# run with N=600 (about 10 minutes a test) found the bug that test_upsample_concat.py::
# test_one_channel_features_with_a_pixel_stride pins. (function_scoped_fixture: the `device`
# fixture is a plain string, safe to share between examples.)
FUZZ_RUNS = int(os.environ.get("MSFAST_FUZZ", "0") or 0)


def fuzz_settings(max_examples: int):
    from hypothesis import HealthCheck, settings

    return settings(deadline=None, derandomize=FUZZ_RUNS <= 0, database=None, print_blob=True,
                    max_examples=max_examples * max(FUZZ_RUNS, 1),
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def randn(gen: torch.Generator, *shape, dtype=torch.float32, device="cpu", channels_last=False,
          requires_grad=False) -> torch.Tensor:
    t = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)


def randint_u8(gen: torch.Generator, *shape, device="cpu", channels_last=False) -> torch.Tensor:
    t = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).to(device)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def make_input(gen, shape, dtype, device="cpu", layout="nchw") -> torch.Tensor:
    """An input image batch: randn for float dtypes, random bytes for uint8.

    layout: "nchw", "channels_last", or "nhwc_permuted" (a [N, H, W, C] tensor viewed as NCHW).
    """
    N, C, H, W = shape
    if layout == "nhwc_permuted":
        if dtype == torch.uint8:
            nhwc = torch.randint(0, 256, (N, H, W, C), generator=gen, dtype=torch.uint8)
        else:
            nhwc = torch.randn(N, H, W, C, generator=gen, dtype=torch.float64).to(dtype)
        return nhwc.to(device).permute(0, 3, 1, 2)
    cl = layout == "channels_last"
    if dtype == torch.uint8:
        return randint_u8(gen, *shape, device=device, channels_last=cl)
    return randn(gen, *shape, dtype=dtype, device=device, channels_last=cl)


def is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _not_implemented_for_half(e: RuntimeError) -> bool:
    msg = str(e)
    return "not implemented for 'Half'" in msg or "not implemented for 'BFloat16'" in msg


def level_dtype(in_dtype: torch.dtype, out_dtype: torch.dtype | None) -> torch.dtype:
    """A pyramid level's dtype: out_dtype, else the input's, float32 for uint8 input."""
    return out_dtype or (torch.float32 if in_dtype == torch.uint8 else in_dtype)


def ref_pyramid(x, scales=None, sizes=None, **kw):
    """msfast.reference.pyramid; in float32 (then cast) where PyTorch lacks a half kernel."""
    try:
        return reference.pyramid(x, scales, sizes, **kw)
    except RuntimeError as e:
        if not _not_implemented_for_half(e):
            raise
    out_dtype = level_dtype(x.dtype, kw.get("out_dtype"))
    kw = dict(kw, out_dtype=torch.float32)
    xf = x if x.dtype == torch.uint8 else x.float()
    return [r.to(out_dtype) for r in reference.pyramid(xf, scales, sizes, **kw)]


def ref_upsample_concat(features, size, **kw):
    """msfast.reference.upsample_concat; in float32 (then cast) where PyTorch lacks a half kernel."""
    try:
        return reference.upsample_concat(features, size, **kw)
    except RuntimeError as e:
        if not _not_implemented_for_half(e):
            raise
    dtype = features[0].dtype
    return reference.upsample_concat([f.float() for f in features], size, **kw).to(dtype)


def native_and(runner: str, fn, counter):
    """(fn() with the native CPU kernels, fn() under ``msfast._C._set_cpu_runner(runner)``, and
    how much ``counter()`` rose during each), the native runner restored in any case."""
    from msfast import _ops

    before = counter()
    fast = fn()
    mid = counter()
    _ops._C._set_cpu_runner(runner)
    try:
        slow = fn()
    finally:
        _ops._C._set_cpu_runner("native")
    return fast, slow, mid - before, counter() - mid


def run_python(code: str, env_extra: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Runs ``python -c code`` from the repository root, returning the completed process."""
    env = dict(os.environ)
    env.pop("MSFAST_FORCE_FALLBACK", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def resize_adjoint(g: torch.Tensor, h: int, w: int, mode: str, channels_last: bool = False) -> torch.Tensor:
    """The adjoint of F.interpolate(., size=g's (H, W), mode=mode) applied to g [N, C, H, W], in
    float64, from the resize's matrix: F.interpolate of the h * w basis images with g's C
    channels in the given layout (C and the layout pick ATen's CPU nearest formulas)."""
    N, C, H, W = g.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    basis = torch.eye(h * w, dtype=torch.float64).view(h * w, 1, h, w).expand(h * w, C, h, w)
    M = F.interpolate(basis.contiguous(memory_format=fmt), size=(H, W), mode=mode)[:, 0].reshape(h * w, -1)
    return (g.reshape(N * C, -1) @ M.T).view(N, C, h, w)


def aa_weights(n_in: int, n_out: int, mode: str, align_corners: bool = False, scale_factor: float | None = None):
    """The exact antialias resampling matrix [n_out, n_in] (float64) of one axis, written from the
    definition (ATen's float formula: triangle / Keys a=-0.5 filter stretched by the scale, taps
    normalized to sum to one). An oracle independent of F.interpolate."""
    if align_corners:
        scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    else:
        scale = 1.0 / scale_factor if scale_factor else n_in / n_out
    interp = 2 if mode == "bilinear" else 4
    support = interp * 0.5 * scale if scale >= 1 else interp * 0.5
    inv = 1.0 / scale if scale >= 1 else 1.0

    def filt(x):
        x = abs(x)
        if mode == "bilinear":
            return max(0.0, 1.0 - x)
        a = -0.5
        if x < 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2:
            return (((x - 5) * x + 8) * x - 4) * a
        return 0.0

    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        w = [filt((j - center + 0.5) * inv) for j in range(lo, hi)]
        total = sum(w)
        for j, wj in zip(range(lo, hi), w):
            m[i, j] = wj / total
    return m
