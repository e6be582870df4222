#!/usr/bin/env bash
# POPE (COCO adversarial/popular/random) with MustDrop.   bash scripts/v1_5/eval/pope.sh [full|192|128|64|640|320|160|default]
# Thresholds: reused from TextVQA (llava/eval/thresholds.py); calibrate with `python -m llava.eval.calibrate`.
source "$(dirname "$0")/common.sh" "$@"
run_task pope questions=QUESTION_FILE images=IMAGE_FOLDER annotations=ANNOTATION_DIR
