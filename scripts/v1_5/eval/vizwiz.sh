#!/usr/bin/env bash
# VizWiz (test-dev) inference with MustDrop.
#   bash scripts/v1_5/eval/vizwiz.sh [full|64]      (default 64)
# Threshold: the reference code's published LLaVA-1.5-7B VizWiz setting (64 tokens: 0.005 / 0.001).
# Writes LLaVA's answers JSONL; the submission converter for the EvalAI server is a separate step.
# Environment overrides: MODEL_PATH, PYTHON, VIZWIZ_DIR, QUESTION_FILE, IMAGE_FOLDER.
set -euo pipefail
SETTING="${1:-64}"
MODEL_PATH="${MODEL_PATH:-liuhaotian/llava-v1.5-7b}"
PYTHON="${PYTHON:-python}"
DATA="${VIZWIZ_DIR:-./playground/data/eval/vizwiz}"
QUESTION_FILE="${QUESTION_FILE:-$DATA/llava_test.jsonl}"
IMAGE_FOLDER="${IMAGE_FOLDER:-$DATA/test}"

case "$SETTING" in
    full) DROP_FLAGS=() ;;
    64)   DROP_FLAGS=(--sparse --global_thr 0.005 --individual_thr 0.001) ;;
    *) echo "unknown setting '$SETTING': choose full or 64 (the authors published only 64 for VizWiz)" >&2; exit 2 ;;
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
echo "answers: $ANSWERS"
