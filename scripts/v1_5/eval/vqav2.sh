#!/usr/bin/env bash
# VQAv2 (test-dev) with MustDrop.   bash scripts/v1_5/eval/vqav2.sh [full|192|128|64|640|320|160|default]
# Thresholds: reused from TextVQA (llava/eval/thresholds.py); the authors published none for VQAv2,
# calibrate with `python -m llava.eval.calibrate`. The score comes from EvalAI: upload the file this
# script names.
source "$(dirname "$0")/common.sh" "$@"
run_task vqav2 split=SPLIT questions=QUESTION_FILE images=IMAGE_FOLDER
