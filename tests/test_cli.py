"""The command line: ``python -m msfast info [--json]``."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO_ROOT

import msfast


def _run(*args, env=None):
    full_env = dict(os.environ)
    full_env.pop("MSFAST_FORCE_FALLBACK", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "msfast", *args], cwd=REPO_ROOT, env=full_env, capture_output=True,
                          text=True, timeout=240)


def test_info_text():
    proc = _run("info")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split()[0]: line.split(None, 1)[1] if len(line.split()) > 1 else ""
             for line in proc.stdout.splitlines() if line.strip()}
    assert lines["fallback_active"].strip() == "False"
    assert "cpu=yes" in lines["kernels"]
    assert lines["msfast"].strip() == msfast.__version__
    assert lines["torch"].strip() == torch.__version__


def test_info_json():
    proc = _run("info", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout)
    assert info["fallback_active"] is False
    assert info["fallback_reason"] is None
    assert info["kernels"]["cpu"] is True
    assert info["kernels"]["cuda"] is bool(msfast._ops._C.cuda_built())  # built
    assert info["cuda_kernels_in_use"] is msfast.kernels_available("cuda")  # built and enabled
    assert info["msfast"] == msfast.__version__
    assert info["torch"] == torch.__version__
    assert info["threads"] >= 1


def test_info_json_reports_forced_fallback():
    proc = _run("info", "--json", env={"MSFAST_FORCE_FALLBACK": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout)
    assert info["fallback_active"] is True
    assert "MSFAST_FORCE_FALLBACK" in info["fallback_reason"]
    assert info["kernels"] == {"cpu": False, "cuda": False}


def test_no_command_is_a_usage_error():
    proc = _run()
    assert proc.returncode == 2
    assert "usage" in proc.stderr.lower()


def test_bench_records_the_commit_it_is_told(monkeypatch):
    """A GPU machine runs a copy of the tree without .git: MSFAST_COMMIT names the commit."""
    from msfast import bench

    monkeypatch.setenv("MSFAST_COMMIT", "abc1234")
    assert bench._git_commit() == "abc1234"
    monkeypatch.delenv("MSFAST_COMMIT")
    head = bench._git_commit()
    assert head is None or (head != "abc1234" and len(head) >= 7)


def test_bench_records_the_cpu_kernel_build():
    """The JSON names the CPU kernel build that ran: the same numbers mean different code on a
    processor with AVX-512 BF16 and one without."""
    from msfast import _ops, bench

    env = bench.environment("cpu")
    want = _ops._C.build_info()["cpu_isa"] if _ops._C is not None else None
    assert env["cpu_isa"] == want
    assert want is None or want in ("base", "avx2", "avx512bf16")


def test_bench_times_the_dtypes_of_a_case_together(capsys):
    """A short run (no torch.compile): one row per variant, in the variants' order, each dtype
    timed with the other's repetitions interleaved (one progress line per case, both dtypes)."""
    import argparse

    from msfast import bench

    args = argparse.Namespace(device="cpu", threads=None, reps=2, quick=True, cases="pyramid_n1",
                              dtypes=None, layouts=None, no_compile=True)
    result = bench.run(args)
    want = [(v.case, v.dtype, v.layout, v.pass_) for v in bench.variants("cpu", ["pyramid_n1"], quick=True)]
    assert [(r["case"], r["dtype"], r["layout"], r["pass"]) for r in result["rows"]] == want
    assert all(r["msfast_ms"] > 0 and r["eager_ms"] > 0 and r["compile_ms"] is None for r in result["rows"])
    assert all(r["calls_per_sample"] == {"eager": 1, "msfast": 1} for r in result["rows"])  # CPU: one
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert len(progress) == 2 and all("float32" in line and "bfloat16" in line for line in progress)


def test_bench_roofline_copy_is_the_fastest_copy(capsys):
    """The roofline's bandwidth is the faster of Tensor.copy_ and a streaming copy (msfast's, into
    out=), both recorded in the environment and named in the report."""
    import argparse

    from msfast import bench

    bws = bench.copy_bandwidths("cpu", nbytes=8 << 20, reps=2)
    assert set(bws) == {"torch", "streaming"} and all(b > 0 for b in bws.values())
    args = argparse.Namespace(device="cpu", threads=None, reps=2, quick=True, cases="pyramid_n1",
                              dtypes="float32", layouts=None, no_compile=True)
    result = bench.run(args)
    env = result["environment"]
    assert set(env["copy_GBps_by_kind"]) == {"torch", "streaming"}
    assert env["copy_GBps"] == max(env["copy_GBps_by_kind"].values())
    assert "best of torch" in capsys.readouterr().err


def test_bench_calls_per_sample_ignore_a_slow_first_call(monkeypatch):
    """On a GPU a sample times several calls, as many as fit 5 ms by the fastest of three single
    calls: a first call with a one-time cost must not cut a sample to one call."""
    from msfast import bench

    monkeypatch.setattr(bench, "_sync", lambda device: None)
    sleeps = iter([0.05] + [0.001] * 10)
    n = bench._calls_per_sample(lambda: time.sleep(next(sleeps)), "cuda")
    assert 2 <= n <= 5
    assert bench._calls_per_sample(lambda: None, "cpu") == 1


def test_bench_ratio_interval():
    """The speed-up's interval: a bootstrap interval of the median of paired ratios, seeded,
    around the paired median, and none below three pairs."""
    from msfast import bench

    eager = [10.0, 11.0, 9.0, 30.0, 10.5, 9.5, 10.2]
    ms = [5.0, 5.0, 5.0, 5.0, 6.0, 4.0, 5.1]
    lo, hi = bench.ratio_interval(eager, ms)
    med = statistics.median(e / m for e, m in zip(eager, ms))
    assert lo <= med <= hi and lo < hi
    assert bench.ratio_interval(eager, ms) == [lo, hi]  # seeded
    assert lo >= min(e / m for e, m in zip(eager, ms)) and hi <= max(e / m for e, m in zip(eager, ms))
    assert bench.ratio_interval([1.0, 2.0], [1.0, 1.0]) is None
    same = bench.ratio_interval([4.0] * 5, [2.0] * 5)
    assert same == [2.0, 2.0]


def test_bench_resample_ms_counts_only_the_resampling():
    """resample_ms: the profiler's time in a model's pyramid and concat modules, forward and
    backward, per step; the modules get their own forward back afterwards."""
    from msfast import bench
    from msfast.models import MultiScaleResNet

    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    for backend in ("torch", "msfast"):
        model = MultiScaleResNet(3, depth=18, width=8, stem="small", scales=(1.0, 0.5), mean=[0.5] * 3,
                                 std=[0.25] * 3, backend=backend)

        def step(model=model):
            model(x).sum().backward()

        step()
        t0 = time.perf_counter()
        for _ in range(2):
            step()
        step_ms = (time.perf_counter() - t0) * 1e3 / 2
        ms = bench.resample_ms(step, model, calls=2)
        assert 0 < ms < step_ms, (backend, ms, step_ms)  # a part of the step, not none of it
        assert "forward" not in model.pyramid.__dict__ and "forward" not in model.concat.__dict__
        # the labels are gone: a fresh profile of the step has no msfast.bench range
        with torch.profiler.profile() as prof:
            step()
        assert not any(e.name.startswith("msfast.bench.") for e in prof.events())


def test_bench_rejects_unknown_names_and_takes_float16_on_request(capsys):
    """--cases, --dtypes and --layouts name what they reject; float16 is not a default dtype
    but runs when asked for (one row per pass, timed against eager)."""
    import argparse

    from msfast import bench

    base = dict(device="cpu", threads=None, reps=2, quick=True, cases="pyramid_n1", dtypes=None, layouts=None,
                no_compile=True)
    for option, bad in [("cases", "pyramid_n2"), ("dtypes", "float8"), ("layouts", "nhwc")]:
        with pytest.raises(SystemExit, match=f"--{option} entry '{bad}'"):
            bench.run(argparse.Namespace(**dict(base, **{option: bad})))
    assert "float16" not in {v.dtype for v in bench.variants("cpu", ["pyramid_n1"], quick=True)}
    result = bench.run(argparse.Namespace(**dict(base, dtypes="float16")))
    assert [(r["dtype"], r["pass"]) for r in result["rows"]] == [("float16", "fwd"), ("float16", "fwd+bwd")]
    assert all(r["msfast_ms"] > 0 and r["eager_ms"] > 0 for r in result["rows"])


def test_bench_cases_compare_like_with_like():
    """Each benchmark case's msfast and reference implementations compute the same thing (the
    forward outputs, or for per_sample_grad the per-sample gradients), in the quick sizes."""
    from msfast import bench

    for v in bench.variants("cpu", [c for c in bench.CASES if c not in bench.TRAIN_CASES], dtypes=("float32",),
                            quick=True):
        p = bench.prepare(v)
        got, want = p.run_msfast(*p.inputs), p.run_ref(*p.inputs)
        got = got if isinstance(got, (list, tuple)) else [got]
        want = want if isinstance(want, (list, tuple)) else [want]
        assert len(got) == len(want), v
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=lambda m, v=v: f"{v}: {m}")
