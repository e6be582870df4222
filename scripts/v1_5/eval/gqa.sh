#!/usr/bin/env bash
# GQA (testdev-balanced) with MustDrop.   bash scripts/v1_5/eval/gqa.sh [full|192|128|64]
# Thresholds: reused from TextVQA (llava/eval/thresholds.py); calibrate with `python -m llava.eval.calibrate`.
# The predictions file goes next to the answers (not into $DATA/data) so settings do not overwrite it.
BENCHMARK=gqa; source "$(dirname "$0")/common.sh" "$@"
QUESTION_FILE="${QUESTION_FILE:-$DATA/llava_gqa_testdev_balanced.jsonl}"
IMAGE_FOLDER="${IMAGE_FOLDER:-$DATA/data/images}"
GQA_QUESTIONS="${GQA_QUESTIONS:-$DATA/data/testdev_balanced_questions.json}"
PREDICTIONS_FILE="${PREDICTIONS_FILE:-$ANSWER_DIR/testdev_balanced_predictions.json}"

require_file "GQA question file" "$QUESTION_FILE"
require_dir "GQA image folder" "$IMAGE_FOLDER"
require_file "GQA testdev-balanced questions" "$GQA_QUESTIONS"

run_sharded llava.eval.model_vqa_loader --model-path "$MODEL_PATH" \
    --question-file "$QUESTION_FILE" --image-folder "$IMAGE_FOLDER"

"$PYTHON" -m llava.eval.eval_gqa --questions "$GQA_QUESTIONS" --result-file "$ANSWER_DIR/merge.jsonl" \
    --predictions "$PREDICTIONS_FILE" --scores-file "$SCORES_FILE"
write_summary
