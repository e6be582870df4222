#!/usr/bin/env bash
# VizWiz (test-dev) with MustDrop.   bash scripts/v1_5/eval/vizwiz.sh [full|192|128|64|640|320|160|default]
# Thresholds: 64 is the reference code's published VizWiz setting; 192 and 128 are reused from TextVQA
# (both in llava/eval/thresholds.py); calibrate with `python -m llava.eval.calibrate`.
# VizWiz test answers are scored by the evaluation server: upload $UPLOAD_FILE there.
source "$(dirname "$0")/common.sh" "$@"
run_task vizwiz questions=QUESTION_FILE images=IMAGE_FOLDER upload_file=UPLOAD_FILE
