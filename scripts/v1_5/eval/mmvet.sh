#!/usr/bin/env bash
# MM-Vet with MustDrop.   bash scripts/v1_5/eval/mmvet.sh [full|192|128|64]
# Thresholds: reused from TextVQA (llava/eval/thresholds.py); the authors published none for MM-Vet,
# calibrate with `python -m llava.eval.calibrate`. MM-Vet is graded by GPT-4 with the official
# evaluator (github.com/yuweihao/MM-Vet): give it the results file this script writes.
BENCHMARK=mm-vet; source "$(dirname "$0")/common.sh" "$@"
QUESTION_FILE="${QUESTION_FILE:-$DATA/llava-mm-vet.jsonl}"
IMAGE_FOLDER="${IMAGE_FOLDER:-$DATA/images}"
RESULTS_FILE="$DATA/results/$MODEL_NAME-$SETTING.json"

require_file "MM-Vet question file" "$QUESTION_FILE"
require_dir "MM-Vet image folder" "$IMAGE_FOLDER"

run_sharded llava.eval.model_vqa --model-path "$MODEL_PATH" \
    --question-file "$QUESTION_FILE" --image-folder "$IMAGE_FOLDER"

"$PYTHON" -m llava.eval.convert_mmvet_for_eval --src "$ANSWER_DIR/merge.jsonl" --dst "$RESULTS_FILE" \
    --question-file "$QUESTION_FILE"
write_summary
