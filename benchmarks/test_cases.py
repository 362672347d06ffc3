"""The standard cases, timed per implementation; see conftest.py for the summary."""

import time

import pytest

from msfast import bench as B


def test_case(benchmark, variant, impl, copy_bandwidth):
    p = B.prepare(variant)
    fn = {"eager": p.run_ref, "msfast": p.run_msfast}.get(impl)
    if impl == "compile":
        if p.compile_skipped:
            pytest.skip(p.compile_skipped)
        import torch

        torch._dynamo.reset()
        fn = B.compile_reference(p)
        t0 = time.perf_counter()
        B.step_fn(p, fn)()
        B._sync(variant.device)
        benchmark.extra_info["compile_and_first_call_s"] = time.perf_counter() - t0
    step = B.step_fn(p, fn)
    nbytes = p.bytes_fwd + (p.bytes_bwd if variant.pass_ == "fwd+bwd" else 0)
    benchmark.group = f"{variant.case} {variant.dtype} {variant.layout} {variant.pass_}"
    benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["roofline_ms"] = nbytes / copy_bandwidth * 1e3

    def timed():
        step()
        B._sync(variant.device)

    benchmark.pedantic(timed, rounds=5, warmup_rounds=1, iterations=1)
