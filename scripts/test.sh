#!/usr/bin/env bash
# Set up from nothing (see setup.sh) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-auto}" "$@"
