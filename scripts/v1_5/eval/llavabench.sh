#!/usr/bin/env bash
# LLaVA-Bench (in-the-Wild) with MustDrop.   bash scripts/v1_5/eval/llavabench.sh [full|192|128|64|640|320|160|default]
# Thresholds: reused from TextVQA (llava/eval/thresholds.py); calibrate with `python -m llava.eval.calibrate`.
# The answers are reviewed by a judge (GPT-4 in LLaVA) that this script does not call itself: set
# JUDGE_CMD to a command that takes LLaVA's eval_gpt_review_bench.py flags, which are appended:
#     --question Q --context C --answer-list answers_gpt4.jsonl ANSWERS --output REVIEW_FILE
# e.g. JUDGE_CMD="python LLaVA/llava/eval/eval_gpt_review_bench.py --rule LLaVA/llava/eval/table/rule.json".
# An existing REVIEW_FILE is scored as it is; without one and without JUDGE_CMD the script stops after
# answering and says so. Scores: `python -m llava.eval.summarize_review`, as LLaVA's summary computes them.
# Environment (besides common.sh's): QUESTION_FILE, IMAGE_FOLDER, CONTEXT_FILE, GPT4_ANSWERS, REVIEW_FILE.
source "$(dirname "$0")/common.sh" "$@"
run_task llavabench questions=QUESTION_FILE images=IMAGE_FOLDER context=CONTEXT_FILE \
    reference_answers=GPT4_ANSWERS review=REVIEW_FILE
