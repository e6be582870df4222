#!/usr/bin/env bash
# TextVQA with MustDrop at one of the paper's token budgets.
#   bash scripts/v1_5/eval/textvqa.sh [full|192|128|64]      (default 64)
# Thresholds: the reference code's published LLaVA-1.5-7B settings (SPEC.md, "Published settings").
# Environment overrides: MODEL_PATH, PYTHON, and the data paths below (defaults: LLaVA's layout).
set -euo pipefail
SETTING="${1:-64}"
MODEL_PATH="${MODEL_PATH:-liuhaotian/llava-v1.5-7b}"
PYTHON="${PYTHON:-python}"
DATA="${TEXTVQA_DIR:-./playground/data/eval/textvqa}"
QUESTION_FILE="${QUESTION_FILE:-$DATA/llava_textvqa_val_v051_ocr.jsonl}"
IMAGE_FOLDER="${IMAGE_FOLDER:-$DATA/train_images}"
ANNOTATION_FILE="${ANNOTATION_FILE:-$DATA/TextVQA_0.5.1_val.json}"

case "$SETTING" in
    full) DROP_FLAGS=() ;;
    192)  DROP_FLAGS=(--sparse --global_thr 0.001 --individual_thr 0.001) ;;
    128)  DROP_FLAGS=(--sparse --global_thr 0.0012 --individual_thr 0.001) ;;
    64)   DROP_FLAGS=(--sparse --global_thr 0.011 --individual_thr 0.01) ;;
    *) echo "unknown setting '$SETTING': choose full, 192, 128 or 64" >&2; exit 2 ;;
esac
ANSWERS="$DATA/answers/$(basename "$MODEL_PATH")-$SETTING.jsonl"

"$PYTHON" -m llava.eval.model_vqa_loader \
    --model-path "$MODEL_PATH" \
    --question-file "$QUESTION_FILE" \
    --image-folder "$IMAGE_FOLDER" \
    --answers-file "$ANSWERS" \
    --temperature 0 \
    --conv-mode vicuna_v1 \
    "${DROP_FLAGS[@]}" ${EXTRA_ARGS:-}

"$PYTHON" -m llava.eval.eval_textvqa \
    --annotation-file "$ANNOTATION_FILE" \
    --result-file "$ANSWERS"
