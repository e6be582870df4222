#!/usr/bin/env bash
# SEED-Bench (image) with MustDrop.   bash scripts/v1_5/eval/seed.sh [full|192|128|64]
# Thresholds: reused from TextVQA (llava/eval/thresholds.py); the authors published none for SEED-Bench,
# calibrate with `python -m llava.eval.calibrate`.
BENCHMARK=seed_bench; source "$(dirname "$0")/common.sh" "$@"
QUESTION_FILE="${QUESTION_FILE:-$DATA/llava-seed-bench.jsonl}"
IMAGE_FOLDER="${IMAGE_FOLDER:-$DATA}"
ANNOTATION_FILE="${ANNOTATION_FILE:-$DATA/SEED-Bench.json}"
UPLOAD_FILE="$DATA/answers_upload/$MODEL_NAME-$SETTING.jsonl"

require_file "SEED-Bench question file" "$QUESTION_FILE"
require_dir "SEED-Bench image folder" "$IMAGE_FOLDER/SEED-Bench-image"
require_file "SEED-Bench annotation file" "$ANNOTATION_FILE"

run_sharded llava.eval.model_vqa_loader --model-path "$MODEL_PATH" \
    --question-file "$QUESTION_FILE" --image-folder "$IMAGE_FOLDER"

"$PYTHON" -m llava.eval.convert_seed_for_submission --annotation-file "$ANNOTATION_FILE" \
    --result-file "$ANSWER_DIR/merge.jsonl" --result-upload-file "$UPLOAD_FILE" \
    --scores-file "$SCORES_FILE"
write_summary
