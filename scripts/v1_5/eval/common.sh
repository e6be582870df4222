#!/usr/bin/env bash
# Shared by the benchmark scripts, which are thin wrappers over `python -m llava.eval.run`: this file
# checks the token setting and the Python, then hands the task to the runner (which checks the data,
# answers, shards over GPUs, resumes, scores and writes summary.json). A script sources it with its
# arguments, then calls run_task with the environment variables that may replace the task's inputs:
#     source "$(dirname "$0")/common.sh" "$@"
#     run_task gqa questions=QUESTION_FILE images=IMAGE_FOLDER gqa_questions=GQA_QUESTIONS
# Environment: THR_192/THR_128/THR_64 ("global individual": MustDrop's thresholds for that setting
# instead of the published ones; THR_keep0_111 for the setting keep0.111, from `llava.eval.calibrate
# --keep-targets`), MODEL_PATH (default liuhaotian/llava-v1.5-7b), PYTHON (default: the
# repository's .venv, else python3), EVAL_DIR (default: the repository's playground/data/eval),
# CUDA_VISIBLE_DEVICES (one answering process per listed GPU), EXTRA_ARGS (added to the runner's
# flags), CONV_MODE (default auto: the checkpoint's own conversation mode from its config files,
# vicuna_v1 for LLaVA-1.5 and llava-v1.6-vicuna, mistral_instruct for llava-v1.6-mistral, chatml_direct
# for llava-v1.6-34b), METHOD (another method of llava/drop/methods, e.g. fastv: the setting then
# becomes its --budget instead of MustDrop's thresholds; the setting "default" runs it with its own
# defaults, which is how a method that picks its own token count, such as prumerge_plus, runs).
# LLaVA-NeXT (v1.6) checkpoints run through the same scripts: MODEL_PATH=<v1.6 checkpoint> with the
# settings 640, 320 or 160 (total vision tokens of the base image and its crops; full runs without
# dropping) and THR_640/THR_320/THR_160 from `python -m llava.eval.calibrate` (no published pairs).
# keep<F> (e.g. keep0.111) keeps that share of each image's vision tokens, on any checkpoint: METHOD's
# --keep F, or MustDrop's budget variant at F (its thresholds when THR_keep<F> is set). It is the setting
# for Qwen2.5-VL / Qwen2-VL, whose images bring as many tokens as their resolution gives.
# Bad input stops a script with one `error: ...` line before anything is loaded or written.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd -P)"
USAGE="usage: bash scripts/v1_5/eval/$(basename "$0") [full|192|128|64|640|320|160|keep<F>|default]"
EXIT_USAGE=2
# pyproject.toml's runtime dependencies, by import name: a Python lacking one is not the project's.
REQUIRED_MODULES=(torch transformers accelerate tokenizers sentencepiece google.protobuf safetensors PIL einops
                  tqdm shortuuid numpy openpyxl)

# fail MESSAGE [EXIT_CODE]: the one line a user sees, on stderr, then stop (exit code 1 by default).
fail() {
    echo "error: $1" >&2
    exit "${2:-1}"
}

[ $# -le 1 ] || fail "expected one token setting, got $#: $USAGE" "$EXIT_USAGE"
SETTING="${1:-full}"
MODEL_PATH="${MODEL_PATH:-liuhaotian/llava-v1.5-7b}"
METHOD="${METHOD:-}"

case "$SETTING" in
    full|192|128|64) ;;
    640|320|160) NEXT_SETTING=1 ;;  # LLaVA-NeXT's settings (total vision tokens of the base image and crops)
    default) [ -n "$METHOD" ] || fail "the setting 'default' runs METHOD with its own defaults: set METHOD \
(e.g. METHOD=prumerge_plus)" "$EXIT_USAGE" ;;
    keep0.*|keep1|keep1.0) KEEP="${SETTING#keep}" ;;  # a kept share of each image's vision tokens (any family)
    *) fail "unknown setting '$SETTING': choose full, 192, 128 or 64 (LLaVA-1.5), 640, 320 or 160 (LLaVA-NeXT)\
, keep<F> (a share in (0, 1] of each image's vision tokens, e.g. keep0.111), or default with METHOD ($USAGE)" \
        "$EXIT_USAGE" ;;
esac

# drop_flags: the runner's flags for the setting. Another METHOD takes the setting as its budget;
# MustDrop takes THR_<setting> ("global individual") when set, else the published thresholds of
# each benchmark (--preset; llava/eval/thresholds.py: LLaVA-1.5's only, so the LLaVA-NeXT settings
# 640/320/160 need THR_<setting>); re-calibrate for another benchmark or model with
# `python -m llava.eval.calibrate`.
NUMBER='^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$'
DROP_FLAGS=(--setting "$SETTING")
THR_NAME="THR_${SETTING//./_}"  # keep0.111 -> THR_keep0_111
if [ -n "${KEEP:-}" ] && ! [[ "$KEEP" =~ $NUMBER ]]; then
    fail "setting '$SETTING': keep<F> takes a number F in (0, 1], e.g. keep0.111" "$EXIT_USAGE"
fi
if [ "$SETTING" = full ]; then
    :
elif [ "$SETTING" = default ]; then
    DROP_FLAGS+=(--method "$METHOD")
elif [ -n "$METHOD" ] && [ -n "${KEEP:-}" ]; then
    DROP_FLAGS+=(--method "$METHOD" --keep "$KEEP")
elif [ -n "$METHOD" ]; then
    DROP_FLAGS+=(--method "$METHOD" --budget "$SETTING")
elif [ -n "${KEEP:-}" ] && [ -z "${!THR_NAME:-}" ]; then
    DROP_FLAGS+=(--sparse --keep "$KEEP")  # MustDrop's budget variant at that share (thresholds: THR_keep...)
elif [ -z "${!THR_NAME:-}" ] && [ -n "${NEXT_SETTING:-}" ]; then
    fail "no published MustDrop thresholds for LLaVA-NeXT's $SETTING setting: find a pair with \
python -m llava.eval.calibrate --model-path $MODEL_PATH --question-file Q --image-folder I --targets $SETTING, \
then set $THR_NAME=\"global individual\"" "$EXIT_USAGE"
elif [ -n "${!THR_NAME:-}" ]; then
    read -r G I REST <<< "${!THR_NAME}" || true
    [[ "${G:-}" =~ $NUMBER && "${I:-}" =~ $NUMBER && -z "${REST:-}" ]] ||
        fail "$THR_NAME must be two numbers \"global individual\", got '${!THR_NAME}'" "$EXIT_USAGE"
    DROP_FLAGS+=(--sparse --global_thr "$G" --individual_thr "$I")
else
    DROP_FLAGS+=(--preset "$SETTING")
fi

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

# run_task TASK [KEY=VARIABLE ...]: run TASK with `python -m llava.eval.run` (which replaces this
# shell); each VARIABLE that is set replaces the task's input or value KEY (llava/eval/tasks/TASK.py).
run_task() {
    local task="$1" pair variable flags=()
    shift
    for pair in "$@"; do
        variable="${pair#*=}"
        [ -z "${!variable:-}" ] || flags+=(--set "${pair%%=*}=${!variable}")
    done
    [ -z "${CUDA_VISIBLE_DEVICES:-}" ] || flags+=(--gpus "$CUDA_VISIBLE_DEVICES")
    # shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
    exec "$PYTHON" -m llava.eval.run --tasks "$task" --model-path "$MODEL_PATH" --eval-dir "$EVAL_DIR" \
        --conv-mode "${CONV_MODE:-auto}" "${DROP_FLAGS[@]}" ${flags[@]+"${flags[@]}"} ${EXTRA_ARGS:-}
}
