#!/usr/bin/env bash
# MMBench-CN (Chinese dev split) with MustDrop.   bash scripts/v1_5/eval/mmbench_cn.sh [full|192|128|64]
# Thresholds: reused from TextVQA (llava/eval/thresholds.py); calibrate with `python -m llava.eval.calibrate`.
# LLaVA's --lang cn prompt: the options, then "请直接回答选项字母。" (answer with the option letter).
# Environment (besides common.sh's): SPLIT (default mmbench_dev_cn_20231003), QUESTION_FILE, UPLOAD_DIR.
BENCHMARK=mmbench_cn; source "$(dirname "$0")/common.sh" "$@"
SPLIT="${SPLIT:-mmbench_dev_cn_20231003}"
QUESTION_FILE="${QUESTION_FILE:-$DATA/$SPLIT.tsv}"
UPLOAD_DIR="${UPLOAD_DIR:-$DATA/answers_upload/$SPLIT}"

require_file "MMBench-CN question file" "$QUESTION_FILE"

run_sharded llava.eval.model_vqa_mmbench --model-path "$MODEL_PATH" \
    --question-file "$QUESTION_FILE" --lang cn --single-pred-prompt

"$PYTHON" -m llava.eval.eval_mmbench --question-file "$QUESTION_FILE" --result-file "$ANSWER_DIR/merge.jsonl" \
    --upload-file "$UPLOAD_DIR/$(basename "$ANSWER_DIR").xlsx" --scores-file "$SCORES_FILE"
write_summary
