#!/usr/bin/env bash
# Sets up everything on a fresh machine (venv, torch, build) and runs the benchmark report.
# Extra arguments go to `msfast bench`, e.g. scripts/bench.sh --quick --cases fpn_concat
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=setup_env.sh
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
msfast bench "$@"
