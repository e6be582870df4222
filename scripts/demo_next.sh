#!/usr/bin/env bash
# The demo's LLaVA-NeXT part (scripts/demo.sh runs it alongside its LLaVA-1.5 part and prints its output
# last): build the tiny LLaVA-NeXT checkpoint if missing, ask it the one question of the widest demo
# image (anyres tiles it into a base image and two crops) with MustDrop in the checkpoint's own
# conversation mode (--conv-mode auto), then print the answer with its vision-token figures: images,
# crops, avg_vision_tokens (all images, per layer) and avg_vision_tokens_per_image.
# Environment: NEXT_MODEL_PATH (a real v1.6 checkpoint instead), PYTHON (default: the repository's
# .venv), ANSWERS_DIR (default: the demo's answers folder).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
NEXT_MODEL_PATH="${NEXT_MODEL_PATH:-checkpoints/llava-v1.6-tiny}"
DEMO=playground/data/eval/demo
ANSWERS="${ANSWERS_DIR:-$DEMO/answers}/$(basename "$NEXT_MODEL_PATH")-mustdrop.jsonl"

# llava.model.tiny renames a checkpoint into place only once complete, so an existing folder is whole:
# skipping the call saves starting torch when it is there (about 3 s of the demo's wall time).
if [ "$NEXT_MODEL_PATH" = checkpoints/llava-v1.6-tiny ] && [ ! -d "$NEXT_MODEL_PATH" ]; then
    "$PY" -m llava.model.tiny --arch next --out "$NEXT_MODEL_PATH"
fi
rm -f "$ANSWERS"  # the demo always starts fresh; real runs resume instead
echo "== LLaVA-NeXT: one question about the widest demo image ($NEXT_MODEL_PATH)"
"$PY" -m llava.eval.model_vqa_loader \
    --model-path "$NEXT_MODEL_PATH" \
    --question-file "$DEMO/llava_next_demo.jsonl" \
    --image-folder "$DEMO/images" \
    --answers-file "$ANSWERS" \
    --temperature 0 --max_new_tokens 4 \
    --conv-mode auto \
    --sparse --global_thr 0.001 --individual_thr 0.001

echo "== LLaVA-NeXT answer and vision tokens per layer, MustDrop ($ANSWERS)"
"$PY" - "$ANSWERS" <<'PYTHON'
import json, sys
for line in open(sys.argv[1], encoding="utf-8"):
    answer = json.loads(line)
    stats = answer["metadata"]
    print(f"{answer['question_id']}: {answer['text']!r}")
    print(f"  images: {stats['images']} (the base image and {stats['crops']} crops), "
          f"avg_vision_tokens: {stats['avg_vision_tokens']:.1f} (of {stats['vision_tokens_in']}), "
          f"avg_vision_tokens_per_image: {stats['avg_vision_tokens_per_image']:.1f}")
PYTHON
