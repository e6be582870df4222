#!/usr/bin/env bash
# MMBench with MustDrop.   bash scripts/v1_5/eval/mmbench.sh [full|192|128|64]
# Thresholds: reused from TextVQA (llava/eval/thresholds.py); calibrate with `python -m llava.eval.calibrate`.
# Environment (besides common.sh's): SPLIT (default mmbench_dev_20230712), QUESTION_FILE, UPLOAD_DIR,
# ALL_ROUNDS=1 to ask every circular rotation of the options (LLaVA's script asks round 0 only).
BENCHMARK=mmbench; source "$(dirname "$0")/common.sh" "$@"
SPLIT="${SPLIT:-mmbench_dev_20230712}"
QUESTION_FILE="${QUESTION_FILE:-$DATA/$SPLIT.tsv}"
UPLOAD_DIR="${UPLOAD_DIR:-$DATA/answers_upload/$SPLIT}"
ROUND_FLAGS=()
[ "${ALL_ROUNDS:-0}" = 1 ] && ROUND_FLAGS=(--all-rounds)

require_file "MMBench question file" "$QUESTION_FILE"

run_sharded llava.eval.model_vqa_mmbench --model-path "$MODEL_PATH" \
    --question-file "$QUESTION_FILE" --lang en --single-pred-prompt "${ROUND_FLAGS[@]}"

"$PYTHON" -m llava.eval.eval_mmbench --question-file "$QUESTION_FILE" --result-file "$ANSWER_DIR/merge.jsonl" \
    --upload-file "$UPLOAD_DIR/$MODEL_NAME-$SETTING.xlsx" --scores-file "$SCORES_FILE"
write_summary
