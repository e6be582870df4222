#!/usr/bin/env bash
# TextVQA with MustDrop.   bash scripts/v1_5/eval/textvqa.sh [full|192|128|64|640|320|160|default]
# Thresholds: the reference code's published LLaVA-1.5-7B TextVQA settings (llava/eval/thresholds.py).
# LLaVA-NeXT: MODEL_PATH=<v1.6 checkpoint> THR_320="global individual" bash scripts/v1_5/eval/textvqa.sh 320
# (thresholds from python -m llava.eval.calibrate; the conversation mode is the checkpoint's own: CONV_MODE=auto).
source "$(dirname "$0")/common.sh" "$@"
run_task textvqa questions=QUESTION_FILE images=IMAGE_FOLDER annotations=ANNOTATION_FILE
