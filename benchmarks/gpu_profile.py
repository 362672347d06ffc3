"""Where the time of msfast's CUDA path goes: torch.profiler tables (host and kernel time) for the
small case (pyramid at N=1, forward + backward: host overhead) and the large ones (fpn_concat and
pyramid at N=32: kernel time), msfast against the reference. Run by benchmarks/gpu_check.sh.

    python benchmarks/gpu_profile.py
"""

from __future__ import annotations

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


def main() -> None:
    for impl in ("msfast", "reference"):
        _profile("pyramid_n1", "nchw", "fwd+bwd", impl)
    for impl in ("msfast", "reference"):
        _profile("pyramid", "nchw", "fwd+bwd", impl, reps=5)
    _profile("fpn_concat", "nchw", "fwd+bwd", "msfast", reps=5)
    _profile("fpn_concat", "channels_last", "fwd", "msfast", reps=5)


if __name__ == "__main__":
    main()
