#!/usr/bin/env bash
# Creates (or reuses) a virtual environment with torch and builds msfast into it.
# Sourced by scripts/test.sh and scripts/bench.sh. Variables:
#   MSFAST_VENV   where the venv lives (default: .venv in the repository)
#   MSFAST_TORCH  the torch version to install (default 2.14.1, a CUDA 13.0 build)
#   PYTHON        the interpreter that creates the venv (default python3)
# and the build switches of setup.py (MSFAST_CUDA, TORCH_CUDA_ARCH_LIST, MAX_JOBS).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MSFAST_VENV:-$ROOT/.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q "torch==${MSFAST_TORCH:-2.14.1}" numpy setuptools wheel ninja \
  pytest pytest-benchmark hypothesis expecttest ruff matplotlib scikit-learn pillow
# nvcc lives in /usr/local/cuda on these machines; torch would guess /usr/local.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
python -m pip install -q --no-build-isolation --no-deps -e "$ROOT"
msfast info
