#!/usr/bin/env bash
# SEED-Bench (image) with MustDrop.   bash scripts/v1_5/eval/seed.sh [full|192|128|64|640|320|160|default]
# Thresholds: reused from TextVQA (llava/eval/thresholds.py); the authors published none for SEED-Bench,
# calibrate with `python -m llava.eval.calibrate`.
source "$(dirname "$0")/common.sh" "$@"
run_task seed questions=QUESTION_FILE image_root=IMAGE_FOLDER annotations=ANNOTATION_FILE
