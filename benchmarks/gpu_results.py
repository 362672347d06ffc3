"""Assembles what benchmarks/gpu_check.sh wrote to OUTDIR into one results file,
benchmarks/results/<device>-<commit>.json (device name, date, torch and CUDA versions, the
commit, the CUDA tests' counts, the benchmarks, the opt-in switches' A/B and the host-time
lines of the profile), and prints a summary. Runs anywhere (it only reads the files).

    python benchmarks/gpu_results.py OUTDIR [--note TEXT] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import xml.etree.ElementTree as ET


def _load(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def junit_counts(path: str) -> dict | None:
    """passed / failed / skipped / total and seconds of a pytest JUnit report."""
    if not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    secs = sum(float(s.get("time", 0)) for s in suites)
    failed = n["failures"] + n["errors"]
    return {"passed": n["tests"] - failed - n["skipped"], "failed": failed, "skipped": n["skipped"],
            "total": n["tests"], "seconds": round(secs, 3)}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def assemble(outdir: str, note: str = "") -> dict:
    bench = _load(os.path.join(outdir, "bench_cuda.json"))
    compiled = _load(os.path.join(outdir, "compile", "bench_cuda.json"))
    func = _load(os.path.join(outdir, "func", "bench_cuda.json"))
    env = (bench or compiled or {}).get("environment", {})
    info = _load(os.path.join(outdir, "info.json")) or {}
    host = []
    prof = os.path.join(outdir, "profile.txt")
    if os.path.exists(prof):
        with open(prof) as f:
            host = [line.rstrip() for line in f if line.startswith(("host ", "timing "))]
    return {
        "device": env.get("gpu"),
        "torch": env.get("torch"),
        "cuda": env.get("cuda"),
        "built_for": info.get("cuda_arch_list"),
        "date": env.get("date"),
        "commit": env.get("commit"),
        "note": note,
        "tests": junit_counts(os.path.join(outdir, "tests.xml")),
        "tests_opt_in": junit_counts(os.path.join(outdir, "tests_opt_in.xml")),
        "tiles_ab": _load(os.path.join(outdir, "tiles_ab.json")),
        "host": host,
        "bench_eager": bench,
        "bench_compile": compiled,
        "bench_func": func,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default="", help="default benchmarks/results/<device>-<commit>.json")
    args = ap.parse_args()
    r = assemble(args.outdir, args.note)
    path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"{slug(r['device'] or 'gpu')}-{r['commit'] or 'unknown'}.json")
    with open(path, "w") as f:
        json.dump(r, f, indent=1)
    print(f"wrote {path}")
    print(f"device {r['device']}, torch {r['torch']}, commit {r['commit']}")
    print(f"CUDA tests: {r['tests']}; with MSFAST_CUDA_TILES=1 MSFAST_CUDA_GRID=resident: {r['tests_opt_in']}")
    for row in (r["tiles_ab"] or {}).get("rows", []):
        print(f"switches {row['case']} {row['pass']}: default {row['default_ms']:.3f} ms "
              f"({row['roofline_default']:.0%}), tiles {row['tiles_ms']:.3f} ms ({row['tiles_vs_default']:.2f}x, "
              f"took tiles {row['took_tiles']}), resident grid {row['resident_ms']:.3f} ms "
              f"({row['resident_vs_default']:.2f}x); max |diff| {row['max_abs_diff_vs_default']}")
    for b in (r["bench_eager"], r["bench_compile"], r["bench_func"]):
        for row in (b or {}).get("rows", []):
            vs_c = row.get("speedup_vs_compile")
            print(f"{row['case']} {row['layout']} {row['pass']}: msfast {row['msfast_ms']:.3f} ms, "
                  f"{row['speedup_vs_eager']:.2f}x eager" + (f", {vs_c:.2f}x compile" if vs_c else "")
                  + (f", roofline {row['roofline_share']:.0%}" if row.get("roofline_share") else ""))
    for line in r["host"]:
        print(line)


if __name__ == "__main__":
    main()
