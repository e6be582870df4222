#!/usr/bin/env bash
# The demo's Qwen2.5-VL part (scripts/demo.sh runs it after its LLaVA parts): build the tiny Qwen2.5-VL
# checkpoint if missing, ask it the question of the widest demo image (seen at its own resolution: a grid of
# 2 x 2-patch tokens, positioned in 3-D) with FastV keeping 0.222 of the image's vision tokens, in the
# checkpoint's own chat template, then print the answer with its vision-token figures.
# Environment: QWEN_MODEL_PATH (a real Qwen2.5-VL / Qwen2-VL checkpoint instead), PYTHON (default: the
# repository's .venv), ANSWERS_DIR (default: the demo's answers folder).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
QWEN_MODEL_PATH="${QWEN_MODEL_PATH:-checkpoints/qwen2.5-vl-tiny}"
DEMO=playground/data/eval/demo
ANSWERS="${ANSWERS_DIR:-$DEMO/answers}/$(basename "$QWEN_MODEL_PATH")-fastv.jsonl"

if [ "$QWEN_MODEL_PATH" = checkpoints/qwen2.5-vl-tiny ] && [ ! -d "$QWEN_MODEL_PATH" ]; then
    "$PY" -m llava.model.tiny --arch qwen2_5_vl --out "$QWEN_MODEL_PATH"
fi
rm -f "$ANSWERS"  # the demo always starts fresh; real runs resume instead
echo "== Qwen2.5-VL: one question about the widest demo image ($QWEN_MODEL_PATH)"
"$PY" -m llava.eval.model_vqa_loader \
    --model-path "$QWEN_MODEL_PATH" \
    --question-file "$DEMO/llava_next_demo.jsonl" \
    --image-folder "$DEMO/images" \
    --answers-file "$ANSWERS" \
    --temperature 0 --max_new_tokens 4 \
    --conv-mode auto \
    --method fastv --keep 0.222

echo "== Qwen2.5-VL answer and vision tokens per layer, FastV keeping 0.222 ($ANSWERS)"
"$PY" - "$ANSWERS" <<'PYTHON'
import json, sys
for line in open(sys.argv[1], encoding="utf-8"):
    answer = json.loads(line)
    stats = answer["metadata"]
    print(f"{answer['question_id']}: {answer['text']!r}")
    print(f"  vision tokens in: {stats['vision_tokens_in']}, avg_vision_tokens: {stats['avg_vision_tokens']:.1f} "
          f"(kept fraction {stats['vision_kept_fraction']:.3f}, asked {stats.get('keep_fraction')})")
PYTHON
