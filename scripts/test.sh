#!/usr/bin/env bash
# Set up from nothing (see setup.sh) and run the whole test suite.
# --lmms: set up .venv-lmms (setup_lmms.sh: lmms-eval, several minutes) and run the lmms-eval tests,
# which the main suite skips without it.
set -euo pipefail
cd "$(dirname "$0")/.."
# One torch thread per test process: pytest-xdist already runs one worker per core, and more threads
# oversubscribe the cores (the suite ran a third slower that way).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [ "${1:-}" = "--lmms" ]; then
    shift
    bash scripts/setup_lmms.sh
    exec .venv-lmms/bin/python -m pytest -q tests/test_lmms_eval.py tests/test_lmms_args.py "$@"
fi
bash scripts/setup.sh
# loadgroup: a module marked with one xdist_group (the web page's, which starts one server for its tests)
# runs on one worker; every other test is shared out as before.
.venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-auto}" --dist loadgroup "$@"
