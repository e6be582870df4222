#!/usr/bin/env bash
# LLaVA-Bench (in-the-Wild) with MustDrop.   bash scripts/v1_5/eval/llavabench.sh [full|192|128|64]
# Thresholds: reused from TextVQA (llava/eval/thresholds.py); calibrate with `python -m llava.eval.calibrate`.
# The answers are reviewed by a judge (GPT-4 in LLaVA) that this script does not call itself: set
# JUDGE_CMD to a command that takes LLaVA's eval_gpt_review_bench.py flags, which are appended:
#     --question Q --context C --answer-list answers_gpt4.jsonl ANSWERS --output REVIEW_FILE
# e.g. JUDGE_CMD="python LLaVA/llava/eval/eval_gpt_review_bench.py --rule LLaVA/llava/eval/table/rule.json".
# An existing REVIEW_FILE is scored as it is; without one and without JUDGE_CMD the script stops after
# answering and says so. Scores: `python -m llava.eval.summarize_review`, as LLaVA's summary computes them.
# Environment (besides common.sh's): QUESTION_FILE, IMAGE_FOLDER, CONTEXT_FILE, GPT4_ANSWERS, REVIEW_FILE.
BENCHMARK=llava-bench-in-the-wild; source "$(dirname "$0")/common.sh" "$@"
QUESTION_FILE="${QUESTION_FILE:-$DATA/questions.jsonl}"
IMAGE_FOLDER="${IMAGE_FOLDER:-$DATA/images}"
CONTEXT_FILE="${CONTEXT_FILE:-$DATA/context.jsonl}"
GPT4_ANSWERS="${GPT4_ANSWERS:-$DATA/answers_gpt4.jsonl}"
REVIEW_FILE="${REVIEW_FILE:-$DATA/reviews/$(basename "$ANSWER_DIR").jsonl}"

require_file "LLaVA-Bench question file" "$QUESTION_FILE"
require_dir "LLaVA-Bench image folder" "$IMAGE_FOLDER"
require_file "LLaVA-Bench context file" "$CONTEXT_FILE"
require_file "LLaVA-Bench GPT-4 answers" "$GPT4_ANSWERS"

run_sharded llava.eval.model_vqa --model-path "$MODEL_PATH" \
    --question-file "$QUESTION_FILE" --image-folder "$IMAGE_FOLDER"

if [ ! -f "$REVIEW_FILE" ]; then
    if [ -z "${JUDGE_CMD:-}" ]; then
        echo "answers in $ANSWER_DIR/merge.jsonl; no review file $REVIEW_FILE: set JUDGE_CMD to a judge command\
 (see this script's header) or write the review file, then run the same command again"
        exit 0
    fi
    read -ra JUDGE <<< "$JUDGE_CMD"
    mkdir -p "$(dirname "$REVIEW_FILE")"
    "${JUDGE[@]}" --question "$QUESTION_FILE" --context "$CONTEXT_FILE" \
        --answer-list "$GPT4_ANSWERS" "$ANSWER_DIR/merge.jsonl" --output "$REVIEW_FILE" ||
        fail "JUDGE_CMD '$JUDGE_CMD' failed; the answers are kept in $ANSWER_DIR"
    [ -f "$REVIEW_FILE" ] || fail "JUDGE_CMD '$JUDGE_CMD' wrote no review file $REVIEW_FILE"
fi

"$PYTHON" -m llava.eval.summarize_review --review-file "$REVIEW_FILE" --scores-file "$SCORES_FILE"
write_summary
