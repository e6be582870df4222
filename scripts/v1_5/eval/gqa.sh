#!/usr/bin/env bash
# GQA (testdev-balanced) with MustDrop.   bash scripts/v1_5/eval/gqa.sh [full|192|128|64|640|320|160|default]
# Thresholds: reused from TextVQA (llava/eval/thresholds.py); calibrate with `python -m llava.eval.calibrate`.
# The predictions file goes next to the answers (not into $DATA/data) so settings do not overwrite it.
source "$(dirname "$0")/common.sh" "$@"
run_task gqa questions=QUESTION_FILE images=IMAGE_FOLDER gqa_questions=GQA_QUESTIONS predictions=PREDICTIONS_FILE
