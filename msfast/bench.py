"""``msfast bench``: msfast against eager PyTorch and torch.compile, side by side.

Every case is timed in one process, one run, with the repetitions of its implementations
interleaved: the eager reference path (F.interpolate + torch.cat),
``torch.compile(reference, fullgraph=True)`` (its compile time reported apart) and msfast,
for every dtype of the case's layout and pass at once.
Each timing is the median of several repetitions; the report gives the ratios and the
share of the memory-bandwidth roofline: the bytes that must move (every input read once,
every output written once) over the bandwidth of a large tensor copy measured in the same
run (the faster of ``Tensor.copy_`` and, on the CPU, a copy with non-temporal stores). The
case definitions here are also what benchmarks/ (pytest-benchmark) runs.

The end-to-end case ``resnet_train_step`` times one training step (forward, backward, SGD
update) of MultiScaleResNet-18 with ``backend="msfast"`` against the same model with
``backend="torch"``; it has no roofline and no torch.compile column (see COMPILE_SKIPPED).
Its time is mostly the ResNet's convolutions, the same in both, so the report also gives the
part of the step msfast replaces, measured with torch.profiler (see resample_ms).

Every row keeps its repetitions' times, and an interval for its speed-up over eager: the
repetitions are paired (eager, then msfast, a moment apart), and the interval is a bootstrap
95% interval of the median of the paired ratios (see ratio_interval).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

from . import _ops, reference

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CASES = ("preprocess", "pyramid", "pyramid_n1", "fpn_concat", "fpn_concat_out", "fusion_concat", "ensemble_fusion",
         "per_sample_grad", "resnet_train_step")
TRAIN_CASES = ("resnet_train_step",)
COMPILE_SKIPPED = ("torch.compile of the whole ResNet-18 training step took 200 s to compile (one variant, 2-core "
                   "machine); this case compares the two eager backends")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# float16 on request (--dtypes): ATen's CPU float16 convolutions are slow where the processor
# has no float16 arithmetic (resnet_train_step: 46 s a step at N=8 on this project's Xeon).
DEFAULT_DTYPES = ("float32", "bfloat16")
LAYOUTS = ("nchw", "channels_last")
PASSES = ("fwd", "fwd+bwd")


@dataclasses.dataclass
class Variant:
    """One row of the report: a case at one dtype, layout and pass."""

    case: str
    dtype: str
    layout: str
    pass_: str
    device: str
    quick: bool = False


@dataclasses.dataclass
class Prepared:
    inputs: list  # tensors (leaves) the functions take
    run_ref: Callable  # reference path on inputs -> output(s)
    run_msfast: Callable
    grads: list | None  # grad_outputs for fwd+bwd, None for fwd
    bytes_fwd: int  # minimal bytes moved by the forward
    bytes_bwd: int  # minimal bytes moved by the backward
    train: bool = False  # run_* are whole training steps (they do their own backward)
    compile_skipped: str | None = None  # why there is no torch.compile baseline
    models: dict | None = None  # train: {"eager": model, "msfast": model}, for resample_ms


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def variants(device: str, cases=CASES, dtypes=DEFAULT_DTYPES, layouts=LAYOUTS, passes=PASSES, quick=False):
    """The variants of the standard cases that make sense (uint8 preprocess has no backward,
    its input layout is fixed; the out= case is forward only; a training step is one pass)."""
    out = []
    for case in cases:
        for dt in dtypes:
            for lay in layouts:
                for ps in passes:
                    if case in TRAIN_CASES:
                        if ps == "fwd+bwd":
                            out.append(Variant(case, dt, lay, "train", device, quick))
                        continue
                    if case == "preprocess" and (ps != "fwd" or lay != "channels_last"):
                        continue
                    if case == "fpn_concat_out" and ps != "fwd":
                        continue
                    if case == "pyramid" and lay != "nchw" and quick:
                        continue
                    if case == "pyramid_n1" and lay != "nchw":
                        continue
                    if case == "per_sample_grad" and ps != "fwd+bwd":  # one call computes the gradients
                        continue
                    out.append(Variant(case, dt, lay, ps, device, quick))
    return out


def prepare(v: Variant, seed: int = 0) -> Prepared:
    """Builds the inputs and the two implementations of a variant."""
    g = torch.Generator().manual_seed(seed)
    dev = torch.device(v.device)
    dtype = DTYPES[v.dtype]
    cl = v.layout == "channels_last"
    fmt = torch.channels_last if cl else torch.contiguous_format
    q = v.quick
    if v.case == "resnet_train_step":
        return _prepare_train_step(v, g, dev, dtype, fmt)
    if v.case == "preprocess":
        n = 8 if q else 32
        img = torch.randint(0, 256, (n, 224, 224, 3), dtype=torch.uint8, generator=g).to(dev)
        x = img.permute(0, 3, 1, 2)  # channels_last view of the image batch, no copy
        scales = [1.0, 0.75, 0.5, 0.25]
        kw = dict(mode="bilinear", antialias=True, mean=IMAGENET_MEAN, std=IMAGENET_STD, out_dtype=dtype)
        outs = sum(_nbytes((n, 3, int(224 * s), int(224 * s)), dtype) for s in scales)
        return Prepared([x], lambda x: reference.pyramid(x, scales, **kw), lambda x: _ops.pyramid(x, scales, **kw),
                        None, x.numel() + outs, 0)
    if v.case in ("pyramid", "pyramid_n1"):
        # pyramid_n1: one image, where per-call overhead (launches, allocations) dominates
        n = 1 if v.case == "pyramid_n1" else (8 if q else 32)
        x = torch.randn(n, 3, 224, 224, generator=g).to(dev, dtype).contiguous(memory_format=fmt)
        scales = [1.0, 0.5, 0.25]
        kw = dict(mode="bilinear", antialias=True)
        shapes = [(n, 3, int(224 * s), int(224 * s)) for s in scales]
        outs = sum(_nbytes(s, dtype) for s in shapes)
        grads = None
        if v.pass_ == "fwd+bwd":
            x.requires_grad_(True)
            grads = [torch.randn(s, generator=g).to(dev, dtype).contiguous(memory_format=fmt) for s in shapes]
        inb = _nbytes(x.shape, dtype)
        return Prepared([x], lambda x: reference.pyramid(x, scales, **kw), lambda x: _ops.pyramid(x, scales, **kw),
                        grads, inb + outs, outs + inb)
    if v.case == "per_sample_grad":
        return _prepare_per_sample_grad(v, g, dev, dtype)
    if v.case == "ensemble_fusion":
        return _prepare_ensemble_fusion(v, g, dev, dtype, fmt)
    if v.case == "fusion_concat":
        # MultiScaleResNet-18's fusion on 128-pixel images: 49152 planes of 4x4 or less
        n = 8 if q else 32
        spec, size = [(512, 4), (512, 2), (512, 1)], (4, 4)
    else:  # fpn_concat (N=64 on a GPU, where N=16 is too small to fill it)
        n = 4 if q else (64 if dev.type == "cuda" else 16)
        spec, size = [(64, 56), (128, 28), (256, 14), (512, 7)], (56, 56)
    feats = [torch.randn(n, c, s, s, generator=g).to(dev, dtype).contiguous(memory_format=fmt) for c, s in spec]
    out_shape = (n, sum(c for c, _ in spec), *size)
    inb = sum(_nbytes(f.shape, dtype) for f in feats)
    outb = _nbytes(out_shape, dtype)
    if v.case == "fpn_concat_out":
        out_ref = torch.empty(out_shape, dtype=dtype, device=dev).contiguous(memory_format=fmt)
        out_ms = torch.empty_like(out_ref)
        return Prepared(
            feats,
            lambda *f: reference.upsample_concat(list(f), size, out=out_ref),
            lambda *f: _ops.upsample_concat(list(f), size, out=out_ms),
            None, inb + outb, 0,
        )
    grads = None
    if v.pass_ == "fwd+bwd":
        for f in feats:
            f.requires_grad_(True)
        grads = [torch.randn(out_shape, generator=g).to(dev, dtype).contiguous(memory_format=fmt)]
    return Prepared(feats, lambda *f: reference.upsample_concat(list(f), size),
                    lambda *f: _ops.upsample_concat(list(f), size), grads, inb + outb, outb + inb)


def _prepare_per_sample_grad(v: Variant, g, dev, dtype) -> Prepared:
    """Per-sample gradients through an input pyramid, torch.func's way: vmap(grad(loss)) over
    16 samples of [1, 3, 128, 128] (the channels_last ones permuted from [1, 128, 128, 3]), a
    loss linear in three normalized bilinear antialiased levels (scales 1, 0.5, 0.25), so that
    the call is the resampling's forward and backward per sample. One call computes the
    gradients (no outer backward: grads is None)."""
    n = 4 if v.quick else 16
    if v.layout == "channels_last":
        x = torch.randn(n, 1, 128, 128, 3, generator=g).to(dev, dtype).permute(0, 1, 4, 2, 3)
    else:
        x = torch.randn(n, 1, 3, 128, 128, generator=g).to(dev, dtype)
    scales = [1.0, 0.5, 0.25]
    kw = dict(mode="bilinear", antialias=True, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    shapes = [(1, 3, int(128 * s), int(128 * s)) for s in scales]
    weights = [torch.randn(s, generator=g).to(dev, dtype) for s in shapes]

    def per_sample_grad(impl):
        def loss(y):
            return sum((level * w).sum() for level, w in zip(impl(y, scales, **kw), weights))
        return lambda x: torch.func.vmap(torch.func.grad(loss))(x)

    inb = _nbytes(x.shape, dtype)
    outs = n * sum(_nbytes(s, dtype) for s in shapes)
    return Prepared([x], per_sample_grad(reference.pyramid), per_sample_grad(_ops.pyramid), None, inb + outs,
                    outs + inb)


def _prepare_ensemble_fusion(v: Variant, g, dev, dtype, fmt) -> Prepared:
    """The fusion of fusion_concat in an ensemble run with torch.vmap (as
    torch.func.stack_module_state and vmap(functional_call) run one): 8 members, each with
    features of N=8, 512 ch @ 4x4, 2x2 and 1x1, to 4x4, bilinear, batched along a first
    dimension. fwd+bwd is regular autograd through the vmap."""
    e, n = (2, 4) if v.quick else (8, 8)
    spec, size = [(512, 4), (512, 2), (512, 1)], (4, 4)
    feats = [torch.randn(e * n, c, s, s, generator=g).to(dev, dtype).contiguous(memory_format=fmt).unflatten(0, (e, n))
             for c, s in spec]
    out_shape = (e, n, sum(c for c, _ in spec), *size)
    grads = None
    if v.pass_ == "fwd+bwd":
        for f in feats:
            f.requires_grad_(True)
        grads = [torch.randn(e * n, *out_shape[2:], generator=g).to(dev, dtype).contiguous(memory_format=fmt)
                 .unflatten(0, (e, n))]

    def ensemble(impl):
        return torch.func.vmap(lambda *f: impl(list(f), size))

    inb = sum(_nbytes(f.shape, dtype) for f in feats)
    outb = _nbytes(out_shape, dtype)
    return Prepared(feats, ensemble(reference.upsample_concat), ensemble(_ops.upsample_concat), grads, inb + outb,
                    outb + inb)


def _prepare_train_step(v: Variant, g, dev, dtype, fmt) -> Prepared:
    """One SGD step of MultiScaleResNet-18 (width 64, torchvision's stem, scales 1, 0.5, 0.25,
    10 classes) as ``msfast train`` runs it: N=32 uint8 3x128x128 images (the permuted view of an
    [N, H, W, C] batch, made NCHW-contiguous for the nchw layout), normalized with ImageNet's
    mean and std inside the pyramid; bfloat16 as autocast. The two backends run copies of the
    same initial weights, each with its own optimizer."""
    from .models import MultiScaleResNet

    n = 8 if v.quick else 32
    torch.manual_seed(0)
    base = MultiScaleResNet(10, depth=18, width=64, stem="large", scales=(1.0, 0.5, 0.25), mean=IMAGENET_MEAN,
                            std=IMAGENET_STD).to(dev, memory_format=fmt)
    img = torch.randint(0, 256, (n, 128, 128, 3), dtype=torch.uint8, generator=g)
    x = img.to(dev).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (n,), generator=g).to(dev)
    amp = dtype != torch.float32
    models = {}

    def make(backend):
        model = copy.deepcopy(base)
        model.backend = backend
        models["eager" if backend == "torch" else backend] = model
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(x):
            with torch.autocast(dev.type, dtype, enabled=amp):
                logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss
        return step

    return Prepared([x], make("torch"), make("msfast"), None, 0, 0, train=True, compile_skipped=COMPILE_SKIPPED,
                    models=models)


# The autograd nodes of the resampling's backward: ATen's (UpsampleBilinear2DBackward0,
# UpsampleBilinear2DAaBackward0, ..., CatBackward0) and msfast's (CppNode<msfast::...Fn>).
_RESAMPLE_NODES = ("Upsample", "CatBackward", "msfast::")


def resample_ms(step: Callable[[], None], model, calls: int = 2) -> float:
    """Milliseconds per training step spent in the resampling msfast replaces: the forward of
    the model's ``pyramid`` and ``concat`` modules (labelled with record_function for the
    measurement) and the autograd nodes of their backward, from torch.profiler over `calls`
    steps. Unlike the step's wall time, this does not move with the convolutions' noise. The
    backward's casts that autocast adds around the eager path (ToCopyBackward0) are not
    counted: in eager's favour. CPU only: on a GPU these are host times, not the kernels'."""
    from torch.profiler import ProfilerActivity, profile, record_function

    mods = {name: getattr(model, name) for name in ("pyramid", "concat")}
    for name, m in mods.items():
        def labelled(*a, _f=m.forward, _n=name, **k):
            with record_function(f"msfast.bench.{_n}"):
                return _f(*a, **k)
        m.forward = labelled
    try:
        step()
        with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                step()
    finally:
        for m in mods.values():
            del m.forward  # back to the class's forward
    total_us = 0.0
    for e in prof.events():
        if e.name.startswith("msfast.bench.") or (e.name.startswith("autograd::engine::evaluate_function: ")
                                                  and any(s in e.name for s in _RESAMPLE_NODES)):
            total_us += e.cpu_time_total
    return total_us / 1e3 / calls


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null: the profiler's C++ side prints lines of its own at each
    start and stop (and, without a GPU, an error about counting GPUs), which would cut into
    the progress display."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def ratio_interval(eager: list, ms: list, level: float = 0.95, resamples: int = 1000) -> list | None:
    """A bootstrap interval of the median of eager[i] / ms[i] (repetitions timed a moment apart,
    see time_interleaved): what the speed-up could be, given this run's noise. None below 3
    pairs. Seeded: the same times give the same interval."""
    r = [e / m for e, m in zip(eager, ms) if m > 0]
    if len(r) < 3:
        return None
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(r, k=len(r))) for _ in range(resamples))
    cut = int((1 - level) / 2 * resamples)
    return [meds[cut], meds[resamples - 1 - cut]]


def step_fn(p: Prepared, impl: Callable) -> Callable[[], None]:
    """A closure that runs one forward (and backward, when the variant has grads)."""
    if p.train:
        return lambda: impl(*p.inputs)
    if p.grads is None:
        def fwd():
            with torch.no_grad():
                impl(*p.inputs)
        return fwd

    def fwd_bwd():
        out = impl(*p.inputs)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        torch.autograd.backward(outs, p.grads)
        for t in p.inputs:
            t.grad = None
    return fwd_bwd


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], None], device: str, reps: int, warmup: int = 1, max_seconds: float = 20.0) -> list[float]:
    """Wall times (ms) of `reps` calls after `warmup`, fewer when they would exceed max_seconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > max_seconds and len(times) >= 3:
            break
    return times


def _calls_per_sample(fn: Callable[[], None], device: str, target_ms: float = 5.0) -> int:
    """On a GPU one call can take less time than a synchronize: a sample then times several
    back-to-back calls (as a training loop queues them) and reports the mean per call. The
    count comes from the fastest of three single calls: one call can carry a one-time cost,
    and too few calls a sample leave the host's time and the GPU's added instead of
    overlapped (as one call at a time would run them)."""
    if not device.startswith("cuda"):
        return 1
    once_ms = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        once_ms = min(once_ms, (time.perf_counter() - t0) * 1e3)
    return max(1, min(100, int(target_ms / max(once_ms, 1e-3))))


def time_interleaved(fns: dict, device: str, reps: int, max_seconds: float = 60.0,
                     calls: dict | None = None) -> dict:
    """Wall times (ms per call) of each function, repetitions interleaved (a, b, c, a, b, c, ...)
    so that a noisy neighbour slows every implementation alike and the ratios stay meaningful.
    `calls`, if given, receives each function's calls per sample."""
    for fn in fns.values():
        fn()
    _sync(device)
    inner = {k: _calls_per_sample(fn, device) for k, fn in fns.items()}
    if calls is not None:
        calls.update(inner)
    times = {k: [] for k in fns}
    start = time.perf_counter()
    for r in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner[k]):
                fn()
            _sync(device)
            times[k].append((time.perf_counter() - t0) * 1e3 / inner[k])
        if time.perf_counter() - start > max_seconds and r >= 2:
            break
    return times


def copy_bandwidths(device: str, nbytes: int = 256 << 20, reps: int = 7) -> dict:
    """Bytes per second of large copies (read + write): ``torch`` (``Tensor.copy_``) and, on the
    CPU, ``streaming`` (msfast's copy of a tensor into ``out=``, non-temporal stores on AVX2)."""
    # On a GPU a 256 MB copy takes ~0.1 ms: copy 1 GiB ten times per sample, so that the
    # synchronize after each sample does not count against the bandwidth.
    calls = 1
    if device.startswith("cuda"):
        calls, nbytes = 10, max(nbytes, 1 << 30)
    src = torch.ones(1, 64, nbytes // (4 << 16), 1 << 10, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copies = {"torch": lambda: dst.copy_(src)}
    if not device.startswith("cuda"):
        # Tensor.copy_ stores through the cache: each destination line is read before it is
        # written. On this project's Intel Xeon that copy ran at 24-26 GB/s and one with
        # non-temporal stores at 31-33 GB/s, which msfast's float32 fpn_concat forward reached
        # too (122% of the first): a roofline must be the faster of the two.
        copies["streaming"] = lambda: _ops.upsample_concat([src], size=tuple(src.shape[-2:]), out=dst)
    out = {}
    for name, copy_once in copies.items():
        def run(copy_once=copy_once):
            for _ in range(calls):
                copy_once()
        times = time_fn(run, device, reps, warmup=2)
        out[name] = 2 * src.numel() * 4 * calls / (statistics.median(times) / 1e3)
    return out


def copy_bandwidth(device: str, nbytes: int = 256 << 20, reps: int = 7) -> float:
    """Bytes per second of the fastest large copy (read + write), the roofline's denominator."""
    return max(copy_bandwidths(device, nbytes, reps).values())


def compile_reference(p: Prepared):
    return torch.compile(p.run_ref, fullgraph=True)


def environment(device: str) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "msfast": __import__("msfast").__version__,
        "fallback": _ops.fallback_reason(),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"),
        "device": device,
        "commit": _git_commit(),
        # which CPU kernel build ran (base, avx2, avx512bf16: see MSFAST_CPU_ISA)
        "cpu_isa": _ops._C.build_info()["cpu_isa"] if _ops._C is not None else None,
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    """The commit measured: MSFAST_COMMIT when set (a GPU machine gets a copy of the working tree
    without .git, see benchmarks/gpu_check.sh), else git's HEAD."""
    if os.environ.get("MSFAST_COMMIT"):
        return os.environ["MSFAST_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None
    except Exception:
        return None


def run(args) -> dict:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("msfast bench: --device cuda but no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 7)
    def pick(option, value, allowed, default):
        names = value.split(",") if value else list(default)
        for n in names:
            if n not in allowed:
                raise SystemExit(f"msfast bench: unknown {option} entry {n!r}; choose from {', '.join(allowed)}")
        return names
    cases = pick("--cases", args.cases, CASES, CASES)
    dtypes = pick("--dtypes", args.dtypes, tuple(DTYPES), DEFAULT_DTYPES)
    layouts = pick("--layouts", args.layouts, LAYOUTS, LAYOUTS)
    vs = variants(device, cases, dtypes, layouts, PASSES, args.quick)
    bws = copy_bandwidths(device)
    bw = max(bws.values())
    env = environment(device)
    env["copy_GBps"] = bw / 1e9
    env["copy_GBps_by_kind"] = {k: b / 1e9 for k, b in bws.items()}
    log = sys.stderr
    print(f"msfast bench on {device} ({env['cpu'] if device == 'cpu' else env.get('gpu')}), "
          f"{env['threads']} threads, copy bandwidth {_copy_text(env)}, THP_MEM_ALLOC_ENABLE="
          f"{env['THP_MEM_ALLOC_ENABLE']}", file=log)
    # The dtypes of one (case, layout, pass) are timed together, their repetitions interleaved
    # with each other's as well as the implementations': "bfloat16 at least as fast as float32"
    # then compares two timings of the same minutes. Timed one after the other, a busy stretch
    # of a shared machine could fall on one dtype and not the other (preprocess alone took 3.4
    # to 8.7 ms within a minute on this project's machine).
    groups: dict = {}
    for v in vs:
        groups.setdefault((v.case, v.layout, v.pass_), []).append(v)
    by_variant = {}
    for gi, group in enumerate(groups.values(), 1):
        v0 = group[0]
        tag = f"[{gi}/{len(groups)}] {v0.case} {v0.layout} {v0.pass_} ({', '.join(v.dtype for v in group)})"
        prepared = [prepare(v) for v in group]
        impls = {}
        for v, p in zip(group, prepared):
            impls[(v.dtype, "eager")] = step_fn(p, p.run_ref)
            impls[(v.dtype, "msfast")] = step_fn(p, p.run_msfast)
        comp_s = {}
        skipped = prepared[0].compile_skipped
        if skipped and not args.no_compile:
            print(f"{tag}: no torch.compile baseline ({skipped})", file=log)
        elif not args.no_compile:
            print(f"{tag}: compiling...", end="", file=log, flush=True)
            torch._dynamo.reset()
            for v, p in zip(group, prepared):
                try:
                    cstep = step_fn(p, compile_reference(p))
                    t0 = time.perf_counter()
                    cstep()
                    _sync(device)
                    comp_s[v.dtype] = time.perf_counter() - t0  # compile + first call
                    impls[(v.dtype, "compile")] = cstep
                except Exception as e:  # report, don't abort the whole run
                    print(f" ({v.dtype}: compile failed: {type(e).__name__}: {e})", end="", file=log)
        print(f"{tag}: timing...", end="", file=log, flush=True)
        calls = {}
        times = time_interleaved(impls, device, reps, calls=calls)
        for v, p in zip(group, prepared):
            eager, ms = statistics.median(times[(v.dtype, "eager")]), statistics.median(times[(v.dtype, "msfast")])
            comp = statistics.median(times[(v.dtype, "compile")]) if (v.dtype, "compile") in times else None
            cs = comp_s.get(v.dtype)
            if cs is not None and comp is not None:
                cs = max(cs - comp / 1e3, 0.0)
            nbytes = p.bytes_fwd + (p.bytes_bwd if v.pass_ == "fwd+bwd" else 0)
            roof_ms = nbytes / bw * 1e3 if nbytes else None  # none for a training step
            row = {
                "case": v.case, "device": device, "dtype": v.dtype, "layout": v.layout, "pass": v.pass_,
                "eager_ms": eager, "compile_ms": comp, "compile_time_s": cs, "msfast_ms": ms,
                "speedup_vs_eager": eager / ms, "speedup_vs_compile": (comp / ms) if comp else None,
                "bytes": nbytes, "roofline_ms": roof_ms, "roofline_share": roof_ms / ms if roof_ms else None,
            }
            row["speedup_vs_eager_interval"] = ratio_interval(times[(v.dtype, "eager")], times[(v.dtype, "msfast")])
            row["times_ms"] = {k: times[(v.dtype, k)] for k in ("eager", "compile", "msfast") if (v.dtype, k) in times}
            row["calls_per_sample"] = {k: calls[(v.dtype, k)] for k in ("eager", "compile", "msfast")
                                       if (v.dtype, k) in calls}
            if p.compile_skipped:
                row["compile_skipped"] = p.compile_skipped
            if p.models and device == "cpu":  # see resample_ms
                row["resample_ms"] = {k: resample_ms(impls[(v.dtype, k)], p.models[k]) for k in p.models}
            by_variant[id(v)] = row
            print(f" {v.dtype} {ms:.2f} ms ({row['speedup_vs_eager']:.1f}x eager)", end="", file=log)
        print(file=log, flush=True)
        del prepared, impls, times
    rows = [by_variant[id(v)] for v in vs]  # the variants' order: case, dtype, layout, pass
    return {"environment": env, "reps": reps, "quick": bool(args.quick), "rows": rows}


def format_table(result: dict) -> str:
    head = ["case", "device", "dtype", "layout", "pass", "eager ms", "compile ms", "msfast ms", "vs eager",
            "vs compile", "roofline"]
    lines = []
    for r in result["rows"]:
        comp = f"{r['compile_ms']:.2f}" if r["compile_ms"] is not None else "-"
        vc = f"{r['speedup_vs_compile']:.1f}x" if r["speedup_vs_compile"] is not None else "-"
        lines.append([r["case"], r["device"], r["dtype"], r["layout"], r["pass"], f"{r['eager_ms']:.2f}", comp,
                      f"{r['msfast_ms']:.2f}", f"{r['speedup_vs_eager']:.2f}x" if r["case"] in TRAIN_CASES
                      else f"{r['speedup_vs_eager']:.1f}x", vc,
                      f"{100 * r['roofline_share']:.0f}%" if r["roofline_share"] is not None else "-"])
    widths = [max(len(h), *(len(row[i]) for row in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
    out = [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt(row) for row in lines]
    notes = [_train_note(r) for r in result["rows"] if r.get("resample_ms")]
    if notes:
        out.append("")
        out += notes
    env = result["environment"]
    out.append(f"\n{env['device']}: {env['cpu'] if env['device'] == 'cpu' else env.get('gpu')}, {env['threads']} "
               f"threads, torch {env['torch']}, copy {_copy_text(env)}, THP_MEM_ALLOC_ENABLE="
               f"{env['THP_MEM_ALLOC_ENABLE']}, medians of {result['reps']}, commit {env['commit']}")
    return "\n".join(out)


def _copy_text(env: dict) -> str:
    """The roofline's copy bandwidth, and each copy's where there were several."""
    kinds = env.get("copy_GBps_by_kind", {})
    each = f" (best of {', '.join(f'{k} {b:.1f}' for k, b in kinds.items())})" if len(kinds) > 1 else ""
    return f"{env['copy_GBps']:.1f} GB/s{each}"


def _train_note(r: dict) -> str:
    """A training step's line under the table: its speed-up's interval, and the part of the
    step msfast replaces (the rest is the same ResNet on both sides)."""
    iv = r.get("speedup_vs_eager_interval")
    iv = f" (95% interval {iv[0]:.2f}-{iv[1]:.2f}x)" if iv else ""
    e, m = r["resample_ms"]["eager"], r["resample_ms"]["msfast"]
    return (f"{r['case']} {r['dtype']} {r['layout']}: step {r['speedup_vs_eager']:.2f}x eager{iv}; "
            f"its resampling {e:.2f} -> {m:.2f} ms per step ({e / m:.1f}x, profiler), of "
            f"{r['eager_ms']:.0f} ms")


def plot(result: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["rows"]
    labels = [f"{r['case']}\n{r['dtype']} {r['layout'][:4]} {r['pass']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.75 * len(rows)), 5))
    xs = range(len(rows))
    w = 0.4
    ax.bar([x - w / 2 for x in xs], [r["speedup_vs_eager"] for r in rows], w, label="vs eager")
    ax.bar([x + w / 2 for x in xs], [r["speedup_vs_compile"] or 0 for r in rows], w, label="vs torch.compile")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("msfast speed-up (x, log scale)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    env = result["environment"]
    ax.set_title(f"msfast on {env['device']} ({env['threads']} threads, torch {env['torch']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _main(args) -> int:
    result = run(args)
    print(format_table(result))
    os.makedirs(args.out, exist_ok=True)
    jpath = os.path.join(args.out, f"bench_{args.device}.json")
    with open(jpath, "w") as f:
        json.dump(result, f, indent=2)
    ppath = os.path.join(args.out, f"bench_{args.device}.png")
    made = plot(result, ppath)
    print(f"\nwrote {jpath}" + (f" and {ppath}" if made else " (no PNG: matplotlib is not installed)"))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time msfast against eager PyTorch and torch.compile")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--cases", default="", help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--dtypes", default="", help="comma-separated subset of float32,bfloat16,float16 "
                   "(default float32,bfloat16)")
    p.add_argument("--layouts", default="", help="comma-separated subset of nchw,channels_last")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--reps", type=int, default=0, help="timed repetitions per measurement (default 7, quick 3)")
    p.add_argument("--quick", action="store_true", help="smaller batches, fewer repetitions")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--out", default="bench_out", help="folder for the JSON and PNG")
    p.set_defaults(func=_main)
