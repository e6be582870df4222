#!/usr/bin/env bash
# Set up from nothing (see setup.sh) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One torch thread per test process: pytest-xdist already runs one worker per core, and more threads
# oversubscribe the cores (the suite ran a third slower that way).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-auto}" "$@"
