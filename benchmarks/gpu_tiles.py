"""The CUDA tiled path (csrc/msfast/gather.h: TileJob) against the gather kernel, side by side
in one process: the calls that fit the tiled path (NCHW upscales and copies, one term per
output), float32, both paths' msfast times interleaved, with eager as the common reference and
the share of the copy roofline. Run by benchmarks/gpu_check.sh; writes a JSON.

    python benchmarks/gpu_tiles.py OUT.json [--reps 15] [--device cpu]

The tiled path is opt-in (MSFAST_CUDA_TILES=1 or msfast._C._set_cuda_tiles) until this script
and the CUDA tests have run with it on a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from msfast import _ops, bench, reference

# The bench's fpn_concat (N=64), into a fresh output and into out=; a two-level pyramid of
# upscales (N=32, 224x224: x1.5, x2), the other pattern that fits.
CASES = [("fpn_concat", "fwd"), ("fpn_concat_out", "fwd")]


def _pyramid_up(dev):
    x = torch.randn(32, 3, 224, 224, device=dev)
    scales = [1.5, 2.0]
    outs = sum(32 * 3 * int(224 * s) ** 2 * 4 for s in scales)
    return bench.Prepared([x], lambda x: reference.pyramid(x, scales),
                          lambda x: _ops.pyramid(x, scales), None, x.numel() * 4 + outs, 0)


def _with_tiles(fn, on: bool):
    def run():
        prev = _ops._C._set_cuda_tiles(on)
        try:
            fn()
        finally:
            _ops._C._set_cuda_tiles(prev)
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only checks the script (no tiled path there)")
    args = ap.parse_args()
    dev = args.device
    copy = bench.copy_bandwidth(dev)
    rows = []
    prepared = [(c, p, bench.prepare(bench.Variant(c, "float32", "nchw", p, dev))) for c, p in CASES]
    prepared.append(("pyramid_upscale", "fwd", _pyramid_up(dev)))
    for case, pass_, p in prepared:
        eager = bench.step_fn(p, p.run_ref)
        gather = _with_tiles(bench.step_fn(p, p.run_msfast), False)
        tiles = _with_tiles(bench.step_fn(p, p.run_msfast), True)
        before = _ops._C._tiled_calls()
        tiles()
        bench._sync(dev)
        took_tiles = _ops._C._tiled_calls() > before
        # The two paths' outputs, compared once (the CUDA tests compare them on many shapes);
        # cloned at once, as fpn_concat_out writes both into the same out=.
        outs = {}
        with torch.no_grad():
            for on in (False, True):
                prev = _ops._C._set_cuda_tiles(on)
                o = p.run_msfast(*p.inputs)
                _ops._C._set_cuda_tiles(prev)
                outs[on] = [t.clone() for t in (o if isinstance(o, (list, tuple)) else [o])]
        max_diff = max(float((g - t).abs().max()) for g, t in zip(outs[False], outs[True]))
        times = bench.time_interleaved({"eager": eager, "gather": gather, "tiles": tiles}, dev, args.reps)
        med = {k: statistics.median(v) for k, v in times.items()}
        roof_ms = p.bytes_fwd / copy * 1e3
        row = {
            "case": case, "pass": pass_, "took_tiles": took_tiles, "max_abs_diff_tiles_vs_gather": max_diff,
            **{f"{k}_ms": v for k, v in med.items()},
            "tiles_vs_gather": med["gather"] / med["tiles"],
            "roofline_gather": roof_ms / med["gather"], "roofline_tiles": roof_ms / med["tiles"],
            "times_ms": times,
        }
        rows.append(row)
        print(f"{case} {pass_}: eager {med['eager']:.3f} ms, gather {med['gather']:.3f} ms "
              f"({row['roofline_gather']:.0%} of the roofline), tiles {med['tiles']:.3f} ms "
              f"({row['roofline_tiles']:.0%}), tiles {row['tiles_vs_gather']:.2f}x the gather; "
              f"took tiles: {took_tiles}; max |tiles - gather| {max_diff:.3g}")
    result = {"environment": bench.environment(dev), "copy_GBps": copy / 1e9, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
