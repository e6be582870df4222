#!/usr/bin/env bash
# Create .venv (if missing) and install MustDrop with its test, benchmark and web-page extras into it.
# torch: a .venv that already has it keeps it (on a GPU machine, install your CUDA build of torch into
# .venv first); a .venv without it gets requirements.txt's pinned CPU wheel, as CI on a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'; then
    .venv/bin/python -m pip install --quiet -r requirements.txt
fi
.venv/bin/python -m pip install --quiet -e ".[test,bench,web]"
