#!/usr/bin/env bash
# VizWiz (test-dev) with MustDrop.   bash scripts/v1_5/eval/vizwiz.sh [full|192|128|64]
# Thresholds: 64 is the reference code's published VizWiz setting; 192 and 128 are reused from TextVQA
# (both in llava/eval/thresholds.py); calibrate with `python -m llava.eval.calibrate`.
# VizWiz test answers are scored by the evaluation server: upload $UPLOAD_FILE there.
BENCHMARK=vizwiz; source "$(dirname "$0")/common.sh" "$@"
QUESTION_FILE="${QUESTION_FILE:-$DATA/llava_test.jsonl}"
IMAGE_FOLDER="${IMAGE_FOLDER:-$DATA/test}"
UPLOAD_FILE="${UPLOAD_FILE:-$DATA/answers_upload/$MODEL_NAME-$SETTING.json}"

require_file "VizWiz question file" "$QUESTION_FILE"
require_dir "VizWiz image folder" "$IMAGE_FOLDER"

run_sharded llava.eval.model_vqa_loader --model-path "$MODEL_PATH" \
    --question-file "$QUESTION_FILE" --image-folder "$IMAGE_FOLDER"

"$PYTHON" -m llava.eval.convert_vizwiz_for_submission --annotation-file "$QUESTION_FILE" \
    --result-file "$ANSWER_DIR/merge.jsonl" --result-upload-file "$UPLOAD_FILE" \
    --scores-file "$SCORES_FILE"
write_summary
