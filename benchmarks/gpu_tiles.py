"""The CUDA path's two opt-in switches against the default, side by side in one process, float32
NCHW, eager as the common reference:
- "tiles": the tiled path (csrc/msfast/gather.h: TileJob; MSFAST_CUDA_TILES=1) for the calls
  that fit it (upscales and copies, one input per output: fpn_concat's forward, a pyramid of
  upscales);
- "resident": the gather kernel's grid sized to the blocks that fit at once
  (MSFAST_CUDA_GRID=resident) instead of 32 blocks an SM, on every gather call (the same
  forward calls, and the backward of fpn_concat and of the N=32 pyramid).
Each row: the medians, each variant's share of the copy roofline, whether the tiled path ran,
and the largest difference of each variant's output from the default's. Run by
benchmarks/gpu_check.sh; writes a JSON.

    python benchmarks/gpu_tiles.py OUT.json [--reps 15] [--device cpu]

Both switches stay off by default until this script and the CUDA tests have run with them on a
GPU (on the CPU the script only checks itself: neither switch does anything there).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from msfast import _ops, bench, reference

CASES = [("fpn_concat", "fwd"), ("fpn_concat_out", "fwd"), ("fpn_concat", "fwd+bwd"), ("pyramid", "fwd+bwd")]
VARIANTS = {"default": (False, False), "tiles": (True, False), "resident": (False, True)}


def _pyramid_up(dev):
    """A two-level pyramid of upscales (N=32, 224x224: x1.5, x2): the other pattern the tiled
    path takes."""
    x = torch.randn(32, 3, 224, 224, device=dev)
    scales = [1.5, 2.0]
    outs = sum(32 * 3 * int(224 * s) ** 2 * 4 for s in scales)
    return bench.Prepared([x], lambda x: reference.pyramid(x, scales),
                          lambda x: _ops.pyramid(x, scales), None, x.numel() * 4 + outs, 0)


def _switched(fn, tiles: bool, resident: bool):
    def run():
        prev = (_ops._C._set_cuda_tiles(tiles), _ops._C._set_cuda_grid_resident(resident))
        try:
            return fn()
        finally:
            _ops._C._set_cuda_tiles(prev[0])
            _ops._C._set_cuda_grid_resident(prev[1])
    return run


def _outputs(p, tiles, resident):
    """The forward's outputs under a variant, cloned at once (fpn_concat_out writes every
    variant into the same out=)."""
    with torch.no_grad():
        o = _switched(lambda: p.run_msfast(*p.inputs), tiles, resident)()
    return [t.clone() for t in (o if isinstance(o, (list, tuple)) else [o])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only checks the script (the switches are CUDA's)")
    args = ap.parse_args()
    dev = args.device
    copy = bench.copy_bandwidth(dev)
    rows = []
    prepared = [(c, ps, bench.prepare(bench.Variant(c, "float32", "nchw", ps, dev))) for c, ps in CASES]
    prepared.append(("pyramid_upscale", "fwd", _pyramid_up(dev)))
    for case, pass_, p in prepared:
        fns = {"eager": bench.step_fn(p, p.run_ref)}
        fns.update({k: _switched(bench.step_fn(p, p.run_msfast), *v) for k, v in VARIANTS.items()})
        before = _ops._C._tiled_calls()
        fns["tiles"]()
        bench._sync(dev)
        took_tiles = _ops._C._tiled_calls() > before
        ref = _outputs(p, *VARIANTS["default"])
        diffs = {k: max(float((a - b).abs().max()) for a, b in zip(_outputs(p, *v), ref))
                 for k, v in VARIANTS.items() if k != "default"}
        times = bench.time_interleaved(fns, dev, args.reps)
        med = {k: statistics.median(v) for k, v in times.items()}
        nbytes = p.bytes_fwd + (p.bytes_bwd if pass_ == "fwd+bwd" else 0)
        roof = {k: nbytes / copy * 1e3 / med[k] for k in VARIANTS}
        row = {
            "case": case, "pass": pass_, "took_tiles": took_tiles, "max_abs_diff_vs_default": diffs,
            **{f"{k}_ms": v for k, v in med.items()},
            **{f"{k}_vs_default": med["default"] / med[k] for k in VARIANTS if k != "default"},
            **{f"roofline_{k}": v for k, v in roof.items()},
            "times_ms": times,
        }
        rows.append(row)
        print(f"{case} {pass_}: eager {med['eager']:.3f} ms; default {med['default']:.3f} ms ({roof['default']:.0%} of "
              f"the roofline); tiles {med['tiles']:.3f} ms ({row['tiles_vs_default']:.2f}x, took tiles: {took_tiles}); "
              f"resident grid {med['resident']:.3f} ms ({row['resident_vs_default']:.2f}x); "
              f"max |diff| {diffs}")
    result = {"environment": bench.environment(dev), "copy_GBps": copy / 1e9, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
