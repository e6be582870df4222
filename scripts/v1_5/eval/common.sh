#!/usr/bin/env bash
# Shared by the benchmark scripts: token settings, paths, input checks, and LLaVA-style sharding over GPUs.
# A script sets BENCHMARK (its folder under playground/data/eval, which also picks the published
# thresholds of llava/eval/thresholds.py), then sources this file with its arguments:
#     BENCHMARK=gqa; source "$(dirname "$0")/common.sh" "$@"
# It provides SETTING, MODEL_PATH, MODEL_NAME, PYTHON, DATA, ANSWER_DIR, SCORES_FILE,
# require_file / require_dir / require_match (call them for every input before run_sharded),
# run_sharded (which sets DROP_FLAGS) and write_summary.
# Environment: THR_192/THR_128/THR_64 ("global individual": MustDrop's thresholds for that setting
# instead of the published ones), MODEL_PATH (default liuhaotian/llava-v1.5-7b), PYTHON (default: the
# repository's .venv, else python3), EVAL_DIR (default: the repository's playground/data/eval),
# CUDA_VISIBLE_DEVICES (one shard per listed GPU), EXTRA_ARGS (added to every inference command),
# METHOD (another method of llava/drop/methods, e.g. fastv: the setting then becomes its --budget
# instead of MustDrop's thresholds).
# Bad input stops a script with one `error: ...` line before anything is loaded or written.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd -P)"
USAGE="usage: bash scripts/v1_5/eval/$(basename "$0") [full|192|128|64]"
DATA_HINT="download it as LLaVA's docs/Evaluation.md describes"
EXIT_USAGE=2
# pyproject.toml's runtime dependencies, by import name: a Python lacking one is not the project's.
REQUIRED_MODULES=(torch transformers accelerate tokenizers sentencepiece google.protobuf safetensors PIL einops
                  tqdm shortuuid numpy openpyxl)

# fail MESSAGE [EXIT_CODE]: the one line a user sees, on stderr, then stop (exit code 1 by default).
fail() {
    echo "error: $1" >&2
    exit "${2:-1}"
}

# require_file / require_dir WHAT PATH: stop naming PATH when a benchmark input is missing.
require_file() {
    [ -f "$2" ] && [ -r "$2" ] && return 0
    [ -e "$2" ] && fail "$1 is not a readable file: $2"
    fail "$1 not found: $2 ($DATA_HINT)"
}
require_dir() {
    [ -d "$2" ] && [ -r "$2" ] && return 0
    [ -e "$2" ] && fail "$1 is not a readable folder: $2"
    fail "$1 not found: $2 ($DATA_HINT)"
}
# require_match WHAT DIR GLOB: stop unless DIR holds at least one file matching GLOB.
require_match() {
    require_dir "$1" "$2"
    compgen -G "$2/$3" > /dev/null || fail "$1 has no $3: $2 ($DATA_HINT)"
}

[ $# -le 1 ] || fail "expected one token setting, got $#: $USAGE" "$EXIT_USAGE"
SETTING="${1:-full}"
MODEL_PATH="${MODEL_PATH:-liuhaotian/llava-v1.5-7b}"
MODEL_NAME="$(basename "${MODEL_PATH%/}")"
METHOD="${METHOD:-}"

case "$SETTING" in
    full|192|128|64) ;;
    *) fail "unknown setting '$SETTING': choose full, 192, 128 or 64 ($USAGE)" "$EXIT_USAGE" ;;
esac

# The project's environment: the repository's .venv when there is one (scripts/setup.sh and
# scripts/demo.sh make it), else the python3 on PATH; the repository's llava comes first on the path,
# so an installed original LLaVA cannot stand in for it whatever the working directory.
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO_ROOT/.venv/bin/python" ]; then
        PYTHON="$REPO_ROOT/.venv/bin/python"
    elif command -v python3 > /dev/null; then
        PYTHON=python3
    else
        PYTHON=python
    fi
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
command -v "$PYTHON" > /dev/null ||
    fail "Python not found: '$PYTHON' (run bash scripts/setup.sh to create .venv, or set PYTHON)"
CHECK_ENVIRONMENT='
import importlib.util, os, sys
def found(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False
repo, modules = sys.argv[1], sys.argv[2:]
missing = [name for name in modules if not found(name)]
if missing:
    sys.exit("cannot import " + ", ".join(missing))
origin = os.path.realpath(importlib.util.find_spec("llava").origin or "")
if not origin.startswith(os.path.realpath(os.path.join(repo, "llava")) + os.sep):
    sys.exit("imports llava from " + os.path.dirname(origin) + ", not from " + repo)
'
if ! PROBLEM="$("$PYTHON" -c "$CHECK_ENVIRONMENT" "$REPO_ROOT" llava "${REQUIRED_MODULES[@]}" 2>&1)"; then
    PROBLEM="${PROBLEM##*$'\n'}"
    [[ "$PROBLEM" != "imports llava "* ]] || fail "$PYTHON $PROBLEM: run the script from the repository's root"
    [[ "$PROBLEM" == "cannot import "* ]] ||
        PROBLEM="is not a Python 3 with the project's packages${PROBLEM:+ ($PROBLEM)}"
    fail "$PYTHON $PROBLEM: run bash scripts/setup.sh (it makes .venv, which these scripts use)\
 or set PYTHON to a Python with MustDrop installed (pip install -e .)"
fi

case "$MODEL_PATH" in  # a local path (a hub id such as liuhaotian/llava-v1.5-7b is looked up later)
    /*|./*|../*|checkpoints/*)
        [ -d "$MODEL_PATH" ] || fail "model checkpoint not found: $MODEL_PATH\
 (set MODEL_PATH to a checkpoint folder: see the README's 'Running a real checkpoint')" ;;
esac

# LLaVA's layout: playground/data/eval of this repository (written relative when run from its root).
if [ -z "${EVAL_DIR:-}" ]; then
    EVAL_DIR="$REPO_ROOT/playground/data/eval"
    [ "$(pwd -P)" = "$REPO_ROOT" ] && EVAL_DIR=playground/data/eval
fi
DATA="$EVAL_DIR/$BENCHMARK"
ANSWER_DIR="$DATA/answers/$MODEL_NAME${METHOD:+-$METHOD}-$SETTING"
# The scorer writes here; write_summary moves it to scores.json with summary.json, so the two appear
# together and only when the scorer and the summary both succeeded.
SCORES_FILE="$ANSWER_DIR/.scores.json.pending"
SUMMARY_PENDING="$ANSWER_DIR/.summary.json.pending"
MERGE_PENDING="$ANSWER_DIR/.merge.jsonl.pending"

# On a failed run: drop half-written files, and the answer folders this run made when no answer
# reached them (their empty chunk files and those files' .lock sidecars included).
NEW_DIRS=()
CHUNK_FILES=()
clean_up_on_failure() {
    local status=$? chunk dir
    [ "$status" -ne 0 ] || return 0
    rm -f "$SCORES_FILE" "$SUMMARY_PENDING" "$MERGE_PENDING"
    if [ ${#NEW_DIRS[@]} -gt 0 ]; then
        for chunk in ${CHUNK_FILES[@]+"${CHUNK_FILES[@]}"}; do
            [ -s "$chunk" ] && return "$status"
        done
        for chunk in ${CHUNK_FILES[@]+"${CHUNK_FILES[@]}"}; do rm -f "$chunk" "$chunk.lock"; done
        for dir in "${NEW_DIRS[@]}"; do rmdir "$dir" 2> /dev/null || break; done
    fi
    return "$status"
}
trap clean_up_on_failure EXIT

# make_answer_dir: create $ANSWER_DIR, remembering which folders did not exist (deepest first).
make_answer_dir() {
    local dir="$ANSWER_DIR"
    while [ ! -e "$dir" ]; do
        NEW_DIRS+=("$dir")
        dir="$(dirname "$dir")"
    done
    mkdir -p "$ANSWER_DIR"
}

# answered_lines: how many answers the chunk files hold.
answered_lines() {
    local chunk total=0
    for chunk in "${CHUNK_FILES[@]}"; do
        [ -f "$chunk" ] && total=$((total + $(wc -l < "$chunk")))
    done
    echo "$total"
}

# set_drop_flags: DROP_FLAGS for the setting (run_sharded calls it before it writes anything). Another
# METHOD takes the setting as its budget; MustDrop takes THR_<setting> ("global individual") when set,
# else the published thresholds (llava/eval/thresholds.py: the reference code's for LLaVA-1.5-7B,
# TextVQA's where the authors published none for this benchmark); re-calibrate for another benchmark
# or model with `python -m llava.eval.calibrate`.
NUMBER='^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$'
DROP_FLAGS=()
set_drop_flags() {
    local name="THR_$SETTING" pair G I REST
    if [ "$SETTING" = full ]; then
        DROP_FLAGS=()
    elif [ -n "$METHOD" ]; then
        DROP_FLAGS=(--method "$METHOD" --budget "$SETTING")
    else
        pair="${!name:-}"
        if [ -z "$pair" ]; then
            pair="$("$PYTHON" -m llava.eval.thresholds "$BENCHMARK" "$SETTING")" ||
                fail "$PYTHON -m llava.eval.thresholds $BENCHMARK $SETTING failed"
        fi
        read -r G I REST <<< "$pair" || true
        [[ "${G:-}" =~ $NUMBER && "${I:-}" =~ $NUMBER && -z "${REST:-}" ]] ||
            fail "$name must be two numbers \"global individual\", got '$pair'" "$EXIT_USAGE"
        DROP_FLAGS=(--sparse --global_thr "$G" --individual_thr "$I")
    fi
}

# run_sharded MODULE ARGS...: run `python -m MODULE ARGS` once per GPU in CUDA_VISIBLE_DEVICES (once
# on a machine without them), each on its chunk $ANSWER_DIR/<chunks>_<idx>.jsonl, then concatenate the
# chunks in order into $ANSWER_DIR/merge.jsonl. A chunk that fails stops the script; once answering
# has started, re-running the same command resumes every chunk. A failure before any answer was written
# (the Python CLI has said why in one line) leaves no answers folder behind.
run_sharded() {
    local module="$1"; shift
    set_drop_flags
    local gpus=() pids=() idx pid status first_failure=0
    IFS=',' read -ra gpus <<< "${CUDA_VISIBLE_DEVICES:-}"
    local chunks=${#gpus[@]}
    [ "$chunks" -ge 1 ] || chunks=1
    CHUNK_FILES=()
    for idx in $(seq 0 $((chunks - 1))); do CHUNK_FILES+=("$ANSWER_DIR/${chunks}_${idx}.jsonl"); done
    make_answer_dir
    for idx in $(seq 0 $((chunks - 1))); do
        local device_env=()
        [ ${#gpus[@]} -ge 1 ] && device_env=(env "CUDA_VISIBLE_DEVICES=${gpus[$idx]}")
        "${device_env[@]}" "$PYTHON" -m "$module" "$@" \
            --answers-file "${CHUNK_FILES[$idx]}" \
            --num-chunks "$chunks" --chunk-idx "$idx" \
            --temperature 0 --conv-mode "${CONV_MODE:-vicuna_v1}" \
            "${DROP_FLAGS[@]}" ${EXTRA_ARGS:-} &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do
        status=0
        { wait "$pid" || status=$?; } 2> /dev/null  # our own line below says it if a signal killed it
        [ "$first_failure" -ne 0 ] || first_failure=$status
    done
    if [ "$first_failure" -ne 0 ]; then
        local answered
        answered="$(answered_lines)"
        if [ "$answered" -gt 0 ]; then
            echo "error: stopped with $answered answers in $ANSWER_DIR;\
 fix the cause and re-run the same command to resume" >&2
        elif [ "$first_failure" -gt 128 ]; then
            echo "error: $module was killed by signal $((first_failure - 128)) before answering any question" >&2
        fi
        exit "$first_failure"
    fi
    merge_chunks
}

# merge_chunks: $ANSWER_DIR/merge.jsonl from the chunk files (never from their .lock sidecars),
# replaced in one step. New answers make an earlier run's scores and summary stale: they are removed.
merge_chunks() {
    local merged="$ANSWER_DIR/merge.jsonl"
    cat "${CHUNK_FILES[@]}" > "$MERGE_PENDING"
    if cmp -s "$MERGE_PENDING" "$merged"; then
        rm "$MERGE_PENDING"
        return 0
    fi
    mv "$MERGE_PENDING" "$merged"
    rm -f "$ANSWER_DIR/scores.json" "$ANSWER_DIR/summary.json"
}

# write_summary: $ANSWER_DIR/summary.json from the merged answers and (if the scorer wrote it)
# $SCORES_FILE, which becomes $ANSWER_DIR/scores.json; `python -m llava.eval.report playground/data/eval`
# tabulates the summaries.
write_summary() {
    "$PYTHON" -m llava.eval.run_summary --answers-file "$ANSWER_DIR/merge.jsonl" \
        --scores-file "$SCORES_FILE" --benchmark "$BENCHMARK" --setting "$SETTING" \
        --model-path "$MODEL_PATH" --drop-flags "${DROP_FLAGS[*]:-}" --out "$SUMMARY_PENDING"
    if [ -f "$SCORES_FILE" ]; then mv "$SCORES_FILE" "$ANSWER_DIR/scores.json"; fi
    mv "$SUMMARY_PENDING" "$ANSWER_DIR/summary.json"
}
