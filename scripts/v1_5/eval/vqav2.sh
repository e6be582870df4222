#!/usr/bin/env bash
# VQAv2 (test-dev) with MustDrop.   bash scripts/v1_5/eval/vqav2.sh [full|192|128|64]
# Thresholds: reused from TextVQA (llava/eval/thresholds.py); the authors published none for VQAv2,
# calibrate with `python -m llava.eval.calibrate`. The score comes from EvalAI: upload the file this
# script names.
BENCHMARK=vqav2; source "$(dirname "$0")/common.sh" "$@"
SPLIT="${SPLIT:-llava_vqav2_mscoco_test-dev2015}"
QUESTION_FILE="${QUESTION_FILE:-$DATA/$SPLIT.jsonl}"
IMAGE_FOLDER="${IMAGE_FOLDER:-$DATA/test2015}"

require_file "VQAv2 question file" "$QUESTION_FILE"
require_dir "VQAv2 image folder" "$IMAGE_FOLDER"
require_file "VQAv2 test split file" "$DATA/llava_vqav2_mscoco_test2015.jsonl"

run_sharded llava.eval.model_vqa_loader --model-path "$MODEL_PATH" \
    --question-file "$QUESTION_FILE" --image-folder "$IMAGE_FOLDER"

"$PYTHON" -m llava.eval.convert_vqav2_for_submission --dir "$DATA" --split "$SPLIT" \
    --ckpt "$MODEL_NAME-$SETTING" --result-file "$ANSWER_DIR/merge.jsonl" --scores-file "$SCORES_FILE"
write_summary
