#!/usr/bin/env bash
# The main job on a fresh machine: set up, build the tiny demo checkpoint if missing, evaluate the
# bundled TextVQA-format demo set with MustDrop switched on, print the answers and the accuracy; alongside,
# scripts/demo_next.sh asks the tiny LLaVA-NeXT checkpoint one anyres question (a base image and two
# crops), and its answer with its per-image and total vision-token figures is printed last.
# Override MODEL_PATH (LLaVA-1.5) and NEXT_MODEL_PATH (LLaVA-NeXT) to run the same job on real checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
# The LLaVA-NeXT part runs alongside the LLaVA-1.5 one (their Python start-ups overlap, which keeps the
# demo short); its output is printed once the LLaVA-1.5 part is done.
NEXT_LOG="$(mktemp)"
bash scripts/demo_next.sh > "$NEXT_LOG" 2>&1 &
NEXT_PID=$!
trap 'pkill -P "$NEXT_PID" 2> /dev/null || true; kill "$NEXT_PID" 2> /dev/null || true; rm -f "$NEXT_LOG"' EXIT  # if this part fails
MODEL_PATH="${MODEL_PATH:-checkpoints/llava-v1.5-tiny}"
DEMO=playground/data/eval/demo
ANSWERS="$DEMO/answers/$(basename "$MODEL_PATH")-mustdrop.jsonl"

if [ "$MODEL_PATH" = checkpoints/llava-v1.5-tiny ]; then
    $PY -m llava.model.tiny --out "$MODEL_PATH"
fi
rm -f "$ANSWERS"  # the demo always starts fresh; real runs resume instead
$PY -m llava.eval.model_vqa_loader \
    --model-path "$MODEL_PATH" \
    --question-file "$DEMO/llava_textvqa_demo.jsonl" \
    --image-folder "$DEMO/images" \
    --answers-file "$ANSWERS" \
    --temperature 0 --max_new_tokens 16 \
    --conv-mode vicuna_v1 \
    --sparse --global_thr 0.001 --individual_thr 0.001

echo "== answers ($ANSWERS)"
cat "$ANSWERS"
echo "== TextVQA accuracy (random-weight demo model: expect about 0%)"
$PY -m llava.eval.eval_textvqa --annotation-file "$DEMO/TextVQA_demo_annotations.json" --result-file "$ANSWERS"

NEXT_STATUS=0
wait "$NEXT_PID" || NEXT_STATUS=$?
cat "$NEXT_LOG"  # LLaVA-NeXT: one anyres question, its answer and vision-token figures
exit "$NEXT_STATUS"
