#!/usr/bin/env bash
# The test command (README, CI): creates the environment if missing, lints, then runs every test that can run
# on this machine (GPU-only tests skip with their reason). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
ruff check .
python -m pytest -q -p no:cacheprovider "$@"
