#!/usr/bin/env bash
# MME with MustDrop.   bash scripts/v1_5/eval/mme.sh [full|192|128|64|640|320|160|default]
# Thresholds: reused from TextVQA (llava/eval/thresholds.py); calibrate with `python -m llava.eval.calibrate`.
# Data in LLaVA's layout: playground/data/eval/MME/{llava_mme.jsonl,MME_Benchmark_release_version/}.
source "$(dirname "$0")/common.sh" "$@"
run_task mme questions=QUESTION_FILE images=IMAGE_FOLDER gt=GT_DIR
