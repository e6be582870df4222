#!/usr/bin/env bash
# MM-Vet with MustDrop.   bash scripts/v1_5/eval/mmvet.sh [full|192|128|64|640|320|160|default]
# Thresholds: reused from TextVQA (llava/eval/thresholds.py); the authors published none for MM-Vet,
# calibrate with `python -m llava.eval.calibrate`. MM-Vet is graded by GPT-4 with the official
# evaluator (github.com/yuweihao/MM-Vet): give it the results file this script writes.
source "$(dirname "$0")/common.sh" "$@"
run_task mmvet questions=QUESTION_FILE images=IMAGE_FOLDER
