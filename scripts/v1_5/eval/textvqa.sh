#!/usr/bin/env bash
# TextVQA with MustDrop.   bash scripts/v1_5/eval/textvqa.sh [full|192|128|64]
# Thresholds: the reference code's published LLaVA-1.5-7B TextVQA settings (llava/eval/thresholds.py).
BENCHMARK=textvqa; source "$(dirname "$0")/common.sh" "$@"
QUESTION_FILE="${QUESTION_FILE:-$DATA/llava_textvqa_val_v051_ocr.jsonl}"
IMAGE_FOLDER="${IMAGE_FOLDER:-$DATA/train_images}"
ANNOTATION_FILE="${ANNOTATION_FILE:-$DATA/TextVQA_0.5.1_val.json}"

require_file "TextVQA question file" "$QUESTION_FILE"
require_dir "TextVQA image folder" "$IMAGE_FOLDER"
require_file "TextVQA annotation file" "$ANNOTATION_FILE"

run_sharded llava.eval.model_vqa_loader --model-path "$MODEL_PATH" \
    --question-file "$QUESTION_FILE" --image-folder "$IMAGE_FOLDER"

"$PYTHON" -m llava.eval.eval_textvqa --annotation-file "$ANNOTATION_FILE" \
    --result-file "$ANSWER_DIR/merge.jsonl" --scores-file "$SCORES_FILE"
write_summary
