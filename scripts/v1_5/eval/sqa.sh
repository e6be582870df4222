#!/usr/bin/env bash
# ScienceQA-IMG with MustDrop.   bash scripts/v1_5/eval/sqa.sh [full|192|128|64]
# Thresholds: reused from TextVQA (llava/eval/thresholds.py); calibrate with `python -m llava.eval.calibrate`.
# Environment (besides common.sh's): QUESTION_FILE, IMAGE_FOLDER, BASE_DIR (problems.json + pid_splits.json).
BENCHMARK=scienceqa; source "$(dirname "$0")/common.sh" "$@"
QUESTION_FILE="${QUESTION_FILE:-$DATA/llava_test_CQM-A.json}"
IMAGE_FOLDER="${IMAGE_FOLDER:-$DATA/images/test}"
BASE_DIR="${BASE_DIR:-$DATA}"

require_file "ScienceQA question file" "$QUESTION_FILE"
require_dir "ScienceQA image folder" "$IMAGE_FOLDER"
require_file "ScienceQA problems file" "$BASE_DIR/problems.json"
require_file "ScienceQA splits file" "$BASE_DIR/pid_splits.json"

run_sharded llava.eval.model_vqa_science --model-path "$MODEL_PATH" \
    --question-file "$QUESTION_FILE" --image-folder "$IMAGE_FOLDER" --single-pred-prompt

"$PYTHON" -m llava.eval.eval_science_qa --base-dir "$BASE_DIR" --result-file "$ANSWER_DIR/merge.jsonl" \
    --output-file "$ANSWER_DIR/output.json" --output-result "$ANSWER_DIR/result.json" \
    --scores-file "$SCORES_FILE"
write_summary
