#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU, torch, nvcc and ninja but no network:
# builds msfast against that torch, runs the CUDA tests and the GPU benchmarks, and writes
#   log.txt          everything printed
#   info.json        `msfast info --json` (versions, arch list, kernels)
#   tests.xml        JUnit report of `pytest -m cuda`
#   bench_cuda.json  (+ PNG) every case, eager against msfast, float32
#   compile/bench_cuda.json  (+ PNG) the cases with a torch.compile baseline
#   func/bench_cuda.json  (+ PNG) per_sample_grad and ensemble_fusion (torch.func's vmap of grad,
#                    and vmap), eager against msfast, last and on their own: a failure there
#                    costs only their rows
#   profile.txt      host time of small calls, then torch.profiler tables (benchmarks/gpu_profile.py)
#   tiles_ab.json    the opt-in switches (the tiled path, the gather's resident grid) against
#                    the default (benchmarks/gpu_tiles.py)
#   tests_opt_in.xml `pytest -m cuda` again with MSFAST_CUDA_TILES=1 MSFAST_CUDA_GRID=resident
# to OUTDIR, in about 4 minutes on an H200 machine (16 cores; the build takes 1.7), plus about
# 1.5 for the opt-in switches' two steps. The benchmarks and the profile run before the tests, so
# that a run cut short still measures; TILES_S, BENCH_S, PROFILE_S, TESTS_S, TILES_TESTS_S,
# COMPILE_S and FUNC_S (seconds) bound each step.
#   bash benchmarks/gpu_check.sh OUTDIR
# Then `python benchmarks/gpu_results.py OUTDIR --note "..."` assembles them into
# benchmarks/results/<device>-<commit>.json (the GPU, the date, the torch version, the commit,
# the tests' counts, the benchmarks, the switches' A/B) and prints a summary; commit that.
# A copy of the tree without .git, or with a .git that is not the tree's (a device machine's
# copy of a working tree): pass the commit in, e.g.
#   MSFAST_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh OUTDIR
set -uo pipefail
OUT=${1:-${OUT:-gpu_out}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee "$OUT/log.txt") 2>&1
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export MSFAST_CUDA=1
export PYTHONUNBUFFERED=1
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
PY=${PYTHON:-python3}
date
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
start=$(date +%s)
$PY -m pip install --no-build-isolation --no-deps -e . || { echo "BUILD FAILED"; exit 1; }
echo "build took $(( $(date +%s) - start )) s"
$PY -m msfast info --json | tee "$OUT/info.json"
# The kernels, even where msfast/_ops.py has them off (CUDA_KERNELS_VALIDATED).
export MSFAST_CUDA_KERNELS=1
t=$(date +%s)
timeout ${TILES_S:-120} $PY benchmarks/gpu_tiles.py "$OUT/tiles_ab.json"
echo "opt-in switches A/B rc=$? in $(( $(date +%s) - t )) s (tiles_ab.json)"
t=$(date +%s)
timeout ${BENCH_S:-150} $PY -m msfast bench --device cuda --dtypes float32 --reps 15 --no-compile --out "$OUT" \
  --cases preprocess,pyramid,pyramid_n1,fpn_concat,fpn_concat_out,fusion_concat,resnet_train_step
echo "bench rc=$? in $(( $(date +%s) - t )) s"
t=$(date +%s)
timeout ${PROFILE_S:-90} $PY benchmarks/gpu_profile.py > "$OUT/profile.txt" 2>&1
echo "profile rc=$? in $(( $(date +%s) - t )) s (profile.txt)"
t=$(date +%s)
timeout ${TESTS_S:-240} $PY -m pytest -q -m cuda tests -p no:cacheprovider --maxfail=50 --tb=short -rfE \
  --junitxml "$OUT/tests.xml"
echo "cuda tests rc=$? in $(( $(date +%s) - t )) s"
t=$(date +%s)
MSFAST_CUDA_TILES=1 MSFAST_CUDA_GRID=resident timeout ${TILES_TESTS_S:-240} $PY -m pytest -q -m cuda tests \
  -p no:cacheprovider --maxfail=50 --tb=short -rfE --junitxml "$OUT/tests_opt_in.xml"
echo "cuda tests with MSFAST_CUDA_TILES=1 MSFAST_CUDA_GRID=resident rc=$? in $(( $(date +%s) - t )) s"
t=$(date +%s)
timeout ${COMPILE_S:-150} $PY -m msfast bench --device cuda --dtypes float32 --cases fpn_concat,pyramid_n1 --layouts nchw \
  --reps 15 --out "$OUT/compile"
echo "bench with torch.compile rc=$? in $(( $(date +%s) - t )) s"
t=$(date +%s)
timeout ${FUNC_S:-60} $PY -m msfast bench --device cuda --dtypes float32 --cases per_sample_grad,ensemble_fusion --reps 15 \
  --no-compile \
  --out "$OUT/func"
echo "torch.func bench rc=$? in $(( $(date +%s) - t )) s"
echo "total $(( $(date +%s) - start )) s"
