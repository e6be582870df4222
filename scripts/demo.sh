#!/usr/bin/env bash
# The main job on a fresh machine: set up, build the tiny demo checkpoint if missing, evaluate the
# bundled TextVQA-format demo set with MustDrop switched on, print the answers and the accuracy.
# Override MODEL_PATH to run the same job on a real checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
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
