#!/usr/bin/env bash
# MME with MustDrop.   bash scripts/v1_5/eval/mme.sh [full|192|128|64]
# Thresholds: reused from TextVQA (llava/eval/thresholds.py); calibrate with `python -m llava.eval.calibrate`.
# Data in LLaVA's layout: playground/data/eval/MME/{llava_mme.jsonl,MME_Benchmark_release_version/}.
BENCHMARK=MME; source "$(dirname "$0")/common.sh" "$@"
QUESTION_FILE="${QUESTION_FILE:-$DATA/llava_mme.jsonl}"
IMAGE_FOLDER="${IMAGE_FOLDER:-$DATA/MME_Benchmark_release_version}"
GT_DIR="${GT_DIR:-$DATA/MME_Benchmark_release_version}"

require_file "MME question file" "$QUESTION_FILE"
require_dir "MME image folder" "$IMAGE_FOLDER"
require_dir "MME ground-truth folder" "$GT_DIR"

run_sharded llava.eval.model_vqa_loader --model-path "$MODEL_PATH" \
    --question-file "$QUESTION_FILE" --image-folder "$IMAGE_FOLDER"

"$PYTHON" -m llava.eval.eval_mme --question-file "$QUESTION_FILE" --result-file "$ANSWER_DIR/merge.jsonl" \
    --gt-dir "$GT_DIR" --scores-file "$SCORES_FILE"
write_summary
