#!/usr/bin/env bash
# Shared by the benchmark scripts: token settings, paths, and LLaVA-style sharding over GPUs.
# A script sets BENCHMARK (its folder under playground/data/eval) and optionally THR_192/THR_128/THR_64
# ("global individual"), then sources this file with its arguments:
#     BENCHMARK=gqa; source "$(dirname "$0")/common.sh" "$@"
# It provides SETTING, MODEL_PATH, MODEL_NAME, PYTHON, DATA, ANSWER_DIR, DROP_FLAGS and run_sharded.
# Environment: MODEL_PATH (default liuhaotian/llava-v1.5-7b), PYTHON, EVAL_DIR, CUDA_VISIBLE_DEVICES
# (one shard per listed GPU), EXTRA_ARGS (added to every inference command), METHOD (another method of
# llava/drop/methods, e.g. fastv: the setting then becomes its --budget instead of MustDrop's thresholds).
set -euo pipefail

SETTING="${1:-full}"
MODEL_PATH="${MODEL_PATH:-liuhaotian/llava-v1.5-7b}"
MODEL_NAME="$(basename "${MODEL_PATH%/}")"
PYTHON="${PYTHON:-python}"
EVAL_DIR="${EVAL_DIR:-./playground/data/eval}"
DATA="$EVAL_DIR/$BENCHMARK"
METHOD="${METHOD:-}"
ANSWER_DIR="$DATA/answers/$MODEL_NAME${METHOD:+-$METHOD}-$SETTING"

# Default thresholds: the reference code's published TextVQA settings for LLaVA-1.5-7B (SPEC.md).
# The authors published no others except VizWiz-64; re-calibrate for another benchmark or model with
# `python -m llava.drop.calibrate`.
THR_192="${THR_192:-0.001 0.001}"
THR_128="${THR_128:-0.0012 0.001}"
THR_64="${THR_64:-0.011 0.01}"

case "$SETTING" in
    full) DROP_FLAGS=() ;;
    192|128|64)
        if [ -n "$METHOD" ]; then
            DROP_FLAGS=(--method "$METHOD" --budget "$SETTING")
        else
            THRESHOLDS="THR_$SETTING"
            read -r G I <<< "${!THRESHOLDS}"
            DROP_FLAGS=(--sparse --global_thr "$G" --individual_thr "$I")
        fi ;;
    *) echo "unknown setting '$SETTING': choose full, 192, 128 or 64" >&2; exit 2 ;;
esac
mkdir -p "$ANSWER_DIR"

# run_sharded MODULE ARGS...: run `python -m MODULE ARGS` once per GPU in CUDA_VISIBLE_DEVICES (once
# on a machine without them), each on its chunk, then concatenate the chunks in order into
# $ANSWER_DIR/merge.jsonl. A chunk that fails stops the script; re-running resumes every chunk.
run_sharded() {
    local module="$1"; shift
    local gpus=() pids=() idx failed=0
    IFS=',' read -ra gpus <<< "${CUDA_VISIBLE_DEVICES:-}"
    local chunks=${#gpus[@]}
    [ "$chunks" -ge 1 ] || chunks=1
    for idx in $(seq 0 $((chunks - 1))); do
        local device_env=()
        [ ${#gpus[@]} -ge 1 ] && device_env=(env "CUDA_VISIBLE_DEVICES=${gpus[$idx]}")
        "${device_env[@]}" "$PYTHON" -m "$module" "$@" \
            --answers-file "$ANSWER_DIR/${chunks}_${idx}.jsonl" \
            --num-chunks "$chunks" --chunk-idx "$idx" \
            --temperature 0 --conv-mode "${CONV_MODE:-vicuna_v1}" \
            "${DROP_FLAGS[@]}" ${EXTRA_ARGS:-} &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    if [ "$failed" -ne 0 ]; then
        echo "a shard failed; fix the cause and re-run the same command to resume" >&2
        exit 1
    fi
    : > "$ANSWER_DIR/merge.jsonl"
    for idx in $(seq 0 $((chunks - 1))); do cat "$ANSWER_DIR/${chunks}_${idx}.jsonl" >> "$ANSWER_DIR/merge.jsonl"; done
}

# write_summary: $ANSWER_DIR/summary.json from the merged answers and (if the scorer wrote it)
# $ANSWER_DIR/scores.json; `python -m llava.eval.report playground/data/eval` tabulates them.
write_summary() {
    "$PYTHON" -m llava.eval.run_summary --answers-file "$ANSWER_DIR/merge.jsonl" \
        --scores-file "$ANSWER_DIR/scores.json" --benchmark "$BENCHMARK" --setting "$SETTING" \
        --model-path "$MODEL_PATH" --drop-flags "${DROP_FLAGS[*]:-}" --out "$ANSWER_DIR/summary.json"
}
