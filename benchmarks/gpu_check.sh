#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU, torch, nvcc and ninja but no network:
# builds msfast against that torch, runs the CUDA tests and the GPU benchmarks, and writes
# log.txt, info.json, tests.xml and bench_cuda.json (+ PNG) to OUTDIR. About 10 minutes.
#   bash benchmarks/gpu_check.sh OUTDIR
# Then commit OUTDIR/bench_cuda.json as benchmarks/results/<device>.json (it names the GPU,
# the date, the torch version and the commit).
set -uo pipefail
OUT=${1:-${OUT:-gpu_out}}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export MSFAST_CUDA=1
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
PY=${PYTHON:-python3}
date; nvidia-smi || true
start=$(date +%s)
$PY -m pip install --no-build-isolation --no-deps -e . || { echo "BUILD FAILED"; exit 1; }
echo "build took $(( $(date +%s) - start )) s"
$PY -m msfast info --json | tee "$OUT/info.json"
# The CUDA kernels are opt-in until this check has passed on a GPU (msfast/_ops.py).
export MSFAST_CUDA_KERNELS=1
timeout 300 $PY -m pytest -q -m cuda tests -p no:cacheprovider --junitxml "$OUT/tests.xml"
echo "cuda tests rc=$?"
timeout 240 $PY -m msfast bench --device cuda --dtypes float32 --reps 20 --out "$OUT"
echo "bench rc=$?"
echo "total $(( $(date +%s) - start )) s"
