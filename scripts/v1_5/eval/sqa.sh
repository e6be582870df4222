#!/usr/bin/env bash
# ScienceQA-IMG with MustDrop.   bash scripts/v1_5/eval/sqa.sh [full|192|128|64|640|320|160|default]
# Thresholds: reused from TextVQA (llava/eval/thresholds.py); calibrate with `python -m llava.eval.calibrate`.
# Environment (besides common.sh's): QUESTION_FILE, IMAGE_FOLDER, BASE_DIR (problems.json + pid_splits.json).
source "$(dirname "$0")/common.sh" "$@"
run_task sqa questions=QUESTION_FILE images=IMAGE_FOLDER base=BASE_DIR
