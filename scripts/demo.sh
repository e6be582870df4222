#!/usr/bin/env bash
# The main job on a fresh machine: set up, build the tiny demo checkpoint if missing, answer and score the
# bundled TextVQA-format demo set three times with the task runner (unpruned, MustDrop at its published
# 64-token thresholds, FastV at 64 tokens) and print the runs as the paper's table
# (`python -m llava.eval.report --paper`: score, Avg, vision tokens, FLOPs ratio, prefill ms), then the
# path of one `llava.viz` picture of what MustDrop keeps of one image. Last, scripts/demo_next.sh asks
# the tiny LLaVA-NeXT checkpoint one anyres question (a base image and two crops), and its answer with
# its per-image and total vision-token figures is printed, and scripts/demo_qwen.sh asks the tiny Qwen2.5-VL
# checkpoint one question at the image's own resolution, FastV keeping 0.222 of its vision tokens.
# Override MODEL_PATH (LLaVA-1.5) and NEXT_MODEL_PATH (LLaVA-NeXT) to run the same job on real checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
MODEL_PATH="${MODEL_PATH:-checkpoints/llava-v1.5-tiny}"
DEMO=playground/data/eval/demo
RUNS="$DEMO/runs"  # the runner writes <task>/answers/<run>/ (answers, scores.json, summary.json) here
MAX_NEW_TOKENS=16
if [ "$MODEL_PATH" = checkpoints/llava-v1.5-tiny ]; then
    $PY -m llava.model.tiny --out "$MODEL_PATH"
    MAX_NEW_TOKENS=4  # random weights: longer gibberish changes no score, and decoding is most of the time
fi
rm -rf "$RUNS"  # the demo always starts fresh; real runs resume instead
mkdir -p "$RUNS"
read -r GLOBAL_THR INDIVIDUAL_THR <<< "$($PY -m llava.eval.thresholds textvqa 64)"

# run_setting NAME LABEL [FLAGS...]: the demo set through `python -m llava.eval.run` (answers, TextVQA
# scores, summary.json); its output goes to $RUNS/NAME.log, shown only if the run fails.
run_setting() {
    local log="$RUNS/$1.log"
    echo "   $2"
    shift 2
    if ! $PY -m llava.eval.run --tasks textvqa --model-path "$MODEL_PATH" --eval-dir "$RUNS" \
        --set questions="$DEMO/llava_textvqa_demo.jsonl" --set images="$DEMO/images" \
        --set annotations="$DEMO/TextVQA_demo_annotations.json" \
        --max_new_tokens "$MAX_NEW_TOKENS" "$@" > "$log" 2>&1; then
        cat "$log"
        exit 1
    fi
}

echo "== The demo set ($(grep -c . "$DEMO/llava_textvqa_demo.jsonl") TextVQA-format questions) on $MODEL_PATH, three runs:"
# One after the other, with nothing else running, so that their prefill times compare.
run_setting full "unpruned"
run_setting mustdrop "MustDrop, the published 64-token thresholds ($GLOBAL_THR $INDIVIDUAL_THR)" --preset 64
run_setting fastv "FastV, budget 64 tokens" --method fastv --budget 64

echo "== The paper's table (python -m llava.eval.report --paper $RUNS; a random-weight model scores about 0)"
$PY -m llava.eval.report --paper "$RUNS" 2>&1

# The picture and the LLaVA-NeXT part run alongside each other (their Python start-ups overlap, which
# keeps the demo short); each one's output is printed once both are done.
VIZ_IMAGE=c735df5ef7697fb9.png  # the demo's first question: "what does the sign say?"
$PY -m llava.viz --model-path "$MODEL_PATH" --image "$DEMO/images/$VIZ_IMAGE" --question "what does the sign say?" \
    --method mustdrop --method-args "global_thr=$GLOBAL_THR,individual_thr=$INDIVIDUAL_THR" \
    --out-dir "$RUNS/viz" > "$RUNS/viz.log" 2>&1 &
VIZ_PID=$!
trap 'kill "$VIZ_PID" 2> /dev/null || true' EXIT  # if the LLaVA-NeXT part fails
NEXT_STATUS=0
bash scripts/demo_next.sh > "$RUNS/next.log" 2>&1 || NEXT_STATUS=$?
QWEN_STATUS=0
bash scripts/demo_qwen.sh > "$RUNS/qwen.log" 2>&1 || QWEN_STATUS=$?
if wait "$VIZ_PID"; then
    echo "== What MustDrop keeps of $VIZ_IMAGE, stage by stage (python -m llava.viz): $RUNS/viz/overview.png"
else
    cat "$RUNS/viz.log"
    exit 1
fi

cat "$RUNS/next.log"  # LLaVA-NeXT: one anyres question, its answer and vision-token figures
cat "$RUNS/qwen.log"  # Qwen2.5-VL: one question at the image's own resolution, FastV keeping a share
[ "$NEXT_STATUS" -eq 0 ] || exit "$NEXT_STATUS"
exit "$QWEN_STATUS"
