#!/usr/bin/env bash
# Single-scale ResNet-18 (scales 1) against MultiScaleResNet-18 (scales 1,0.5,0.25) on digits:
# the same depth, width and training (msfast train's defaults), several seeds, each tested
# with the test images at the training size and at sizes it never saw (0.5x to 2x).
#   scripts/compare_scales.sh [OUT] [SEED...]     (default: runs/compare, seeds 0 1 2)
# Extra training options in TRAIN_ARGS, e.g. TRAIN_ARGS="--threads 1". Needs msfast importable
# by $PYTHON (default python); prints a markdown table and writes OUT/summary.json.
set -euo pipefail
OUT=${1:-runs/compare}
shift || true
SEEDS=${*:-0 1 2}
PY=${PYTHON:-python}
TEST_SCALES="0.5 0.75 1 1.5 2"
for seed in $SEEDS; do
  for scales in 1 1,0.5,0.25; do
    run="$OUT/scales-$scales/seed$seed"
    # shellcheck disable=SC2086
    "$PY" -m msfast train --scales "$scales" --seed "$seed" --out "$run" ${TRAIN_ARGS:-}
    for s in $TEST_SCALES; do
      "$PY" -m msfast eval --checkpoint "$run/checkpoint.pt" --scale "$s" --json > "$run/eval-$s.json"
    done
  done
done
"$PY" - "$OUT" $TEST_SCALES <<'PYEOF'
import glob, json, os, statistics, sys

out, test_scales = sys.argv[1], sys.argv[2:]
rows, summary = [], {}
for model in sorted(glob.glob(os.path.join(out, "scales-*"))):
    name = os.path.basename(model)[len("scales-"):]
    runs = sorted(glob.glob(os.path.join(model, "seed*")))
    accs = {s: [json.load(open(os.path.join(r, f"eval-{s}.json")))["test_accuracy"] for r in runs] for s in test_scales}
    secs = [json.load(open(os.path.join(r, "metrics.json")))["wall_seconds"] for r in runs]
    summary[name] = {"seeds": len(runs), "accuracy": accs, "train_wall_seconds": secs}
    cells = [f"{100 * statistics.mean(a):.1f} ({100 * min(a):.1f}-{100 * max(a):.1f})" for a in accs.values()]
    rows.append(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(secs):.0f} |")
print("| scales | " + " | ".join(f"test at {s}x" for s in test_scales) + " | train s |")
print("|---" * (len(test_scales) + 2) + "|")
print("\n".join(rows))
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
PYEOF
