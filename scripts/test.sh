#!/usr/bin/env bash
# Sets up everything on a fresh machine (venv, torch, build) and runs the checks and tests.
# Extra arguments go to pytest, e.g. scripts/test.sh -k pyramid
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=setup_env.sh
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
ruff check .
python -m pytest -q -ra "$@" tests
