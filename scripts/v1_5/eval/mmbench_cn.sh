#!/usr/bin/env bash
# MMBench-CN (Chinese dev split) with MustDrop.   bash scripts/v1_5/eval/mmbench_cn.sh [full|192|128|64|640|320|160|default]
# Thresholds: reused from TextVQA (llava/eval/thresholds.py); calibrate with `python -m llava.eval.calibrate`.
# LLaVA's --lang cn prompt: the options, then "请直接回答选项字母。" (answer with the option letter).
# Environment (besides common.sh's): SPLIT (default mmbench_dev_cn_20231003), QUESTION_FILE, UPLOAD_DIR.
source "$(dirname "$0")/common.sh" "$@"
ROUNDS=""
[ "${ALL_ROUNDS:-0}" = 1 ] && ROUNDS=--all-rounds
run_task mmbench_cn split=SPLIT questions=QUESTION_FILE upload_dir=UPLOAD_DIR rounds=ROUNDS
