#!/usr/bin/env bash
# POPE (COCO adversarial/popular/random) with MustDrop.   bash scripts/v1_5/eval/pope.sh [full|192|128|64]
# Thresholds: reused from TextVQA (llava/eval/thresholds.py); calibrate with `python -m llava.eval.calibrate`.
BENCHMARK=pope; source "$(dirname "$0")/common.sh" "$@"
QUESTION_FILE="${QUESTION_FILE:-$DATA/llava_pope_test.jsonl}"
IMAGE_FOLDER="${IMAGE_FOLDER:-$DATA/val2014}"
ANNOTATION_DIR="${ANNOTATION_DIR:-$DATA/coco}"

require_file "POPE question file" "$QUESTION_FILE"
require_dir "POPE image folder (COCO val2014)" "$IMAGE_FOLDER"
require_match "POPE annotation folder" "$ANNOTATION_DIR" "coco_pope_*.json"

run_sharded llava.eval.model_vqa_loader --model-path "$MODEL_PATH" \
    --question-file "$QUESTION_FILE" --image-folder "$IMAGE_FOLDER"

"$PYTHON" -m llava.eval.eval_pope --annotation-dir "$ANNOTATION_DIR" --question-file "$QUESTION_FILE" \
    --result-file "$ANSWER_DIR/merge.jsonl" --scores-file "$SCORES_FILE"
write_summary
