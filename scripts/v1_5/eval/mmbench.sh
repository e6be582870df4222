#!/usr/bin/env bash
# MMBench with MustDrop.   bash scripts/v1_5/eval/mmbench.sh [full|192|128|64|640|320|160|default]
# Thresholds: reused from TextVQA (llava/eval/thresholds.py); calibrate with `python -m llava.eval.calibrate`.
# Environment (besides common.sh's): SPLIT (default mmbench_dev_20230712), QUESTION_FILE, UPLOAD_DIR,
# ALL_ROUNDS=1 to ask every circular rotation of the options (LLaVA's script asks round 0 only).
source "$(dirname "$0")/common.sh" "$@"
ROUNDS=""
[ "${ALL_ROUNDS:-0}" = 1 ] && ROUNDS=--all-rounds
run_task mmbench split=SPLIT questions=QUESTION_FILE upload_dir=UPLOAD_DIR rounds=ROUNDS
