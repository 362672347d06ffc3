"""Where the time of msfast's CUDA path goes: the host time of a call (small cases, without the
profiler's own overhead), then torch.profiler tables (host and kernel time) for the small case
(pyramid at N=1, forward + backward) and the large ones (fpn_concat and pyramid at N=32: kernel
time), msfast against the reference. Run by benchmarks/gpu_check.sh.

    python benchmarks/gpu_profile.py [--host-only]
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from msfast import bench


def _profile(case: str, layout: str, pass_: str, impl: str, reps: int = 20) -> None:
    v = bench.Variant(case, "float32", layout, pass_, "cuda", False)
    p = bench.prepare(v)
    step = bench.step_fn(p, p.run_msfast if impl == "msfast" else p.run_ref)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    print(f"\n=== {case} {layout} {pass_} {impl}: {reps} calls ===")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=6, max_name_column_width=60))


def _host_us(case: str, pass_: str, impl: str, calls: int = 200) -> None:
    """Host time per call: `calls` calls queued back to back without a synchronize (while the
    GPU keeps up, the loop is bound by the host), then the time until the GPU has finished."""
    v = bench.Variant(case, "float32", "nchw", pass_, "cuda", False)
    p = bench.prepare(v)
    step = bench.step_fn(p, p.run_msfast if impl == "msfast" else p.run_ref)
    best_q, best_t = float("inf"), float("inf")
    for _ in range(5):
        step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        best_q, best_t = min(best_q, (t1 - t0) / calls * 1e6), min(best_t, (t2 - t0) / calls * 1e6)
    print(f"host {case} {pass_} {impl}: {best_q:.1f} us a call queued, {best_t:.1f} us a call until done "
          f"(best of 5 loops of {calls})")


def _per_call_us(fn, calls: int = 300) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return best


def _host_parts() -> None:
    """The parts of msfast.pyramid's host time at N=1 (one 224x224 image, 3 levels, no grad)."""
    from msfast import _args, _ops

    x = torch.randn(1, 3, 224, 224, device="cuda")
    scales = [1.0, 0.5, 0.25]
    a = _args.pyramid_args(x, scales, None, "bilinear", True, None, None, None, None)
    flat = a.flat
    with torch.no_grad():
        parts = {
            "msfast.pyramid": lambda: _ops.pyramid(x, scales, mode="bilinear", antialias=True),
            "msfast.reference.pyramid (eager)": lambda: _ops.reference.pyramid(x, scales, mode="bilinear",
                                                                               antialias=True),
            "pyramid_args (Python checks, cached)": lambda: _args.pyramid_args(x, scales, None, "bilinear", True,
                                                                               None, None, None, None),
            "Python checks, uncached": lambda: _args._check_pyramid_args(x, scales, None, "bilinear", True, None,
                                                                         None, None, None),
            "msfast._C.pyramid (typed entry)": lambda: _ops._C.pyramid(x, flat, a.scales, a.mode, a.antialias,
                                                                       a.align_corners, a.mean, a.std,
                                                                       a.out_dtype),
            "torch.ops.msfast.pyramid": lambda: _ops._OPS.pyramid(x, flat, a.scales, a.mode, a.antialias,
                                                                  a.align_corners, a.mean, a.std, a.out_dtype),
            "three torch.empty on cuda": lambda: [torch.empty(1, 3, 112, 112, device="cuda") for _ in range(3)],
            "one small aten kernel (x.mul(2))": lambda: x.mul(2),
        }
        for name, fn in parts.items():
            print(f"host part: {name}: {_per_call_us(fn):.1f} us a call")


def _interleaving(case: str, pass_: str, reps: int = 15) -> None:
    """The bench's way of timing (bench.time_interleaved: samples of several calls and a
    synchronize, eager and msfast alternated), msfast alone, and back to back in one loop: at
    6a00c99 the bench gave 0.31 ms a call for the N=32 pyramid's forward + backward where a loop
    of 200 calls gave 0.17 ms, which this is to explain."""
    v = bench.Variant(case, "float32", "nchw", pass_, "cuda", False)
    p = bench.prepare(v)
    ms, ref = bench.step_fn(p, p.run_msfast), bench.step_fn(p, p.run_ref)
    calls_both, calls_alone = {}, {}
    both = bench.time_interleaved({"eager": ref, "msfast": ms}, "cuda", reps, calls=calls_both)
    alone = bench.time_interleaved({"msfast": ms}, "cuda", reps, calls=calls_alone)
    med = {k: sorted(t)[len(t) // 2] for k, t in both.items()}
    print(f"timing {case} {pass_}: interleaved eager {med['eager']:.3f} ms, msfast {med['msfast']:.3f} ms; "
          f"msfast alone {sorted(alone['msfast'])[reps // 2]:.3f} ms (medians of {reps} samples; calls a "
          f"sample: interleaved {calls_both}, alone {calls_alone})")


def main() -> None:
    for case, pass_ in (("pyramid_n1", "fwd"), ("pyramid_n1", "fwd+bwd"), ("pyramid", "fwd+bwd")):
        for impl in ("msfast", "reference"):
            _host_us(case, pass_, impl)
    _host_parts()
    for case, pass_ in (("pyramid", "fwd+bwd"), ("pyramid_n1", "fwd")):
        _interleaving(case, pass_)
    if "--host-only" in sys.argv:
        return
    for impl in ("msfast", "reference"):
        _profile("pyramid_n1", "nchw", "fwd+bwd", impl)
    for impl in ("msfast", "reference"):
        _profile("pyramid", "nchw", "fwd+bwd", impl, reps=5)
    _profile("fpn_concat", "nchw", "fwd+bwd", "msfast", reps=5)
    _profile("fpn_concat", "channels_last", "fwd", "msfast", reps=5)


if __name__ == "__main__":
    main()
