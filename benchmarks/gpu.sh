#!/usr/bin/env bash
# The GPU benchmark set at LLaVA-1.5-7B's real widths (random weights, no download): MustDrop's published
# LLaVA-1.5 settings, MustDrop on LLaVA-NeXT at 640 / 320 / 160 tokens, and every method at 64 tokens,
# in bf16 with SDPA on one CUDA device; under 8 minutes on one H100. Installs nothing.
#
#   bash benchmarks/gpu.sh [--quick] [--out DIR]
#
# --quick runs the same four on the CPU at the quick shape (CI). Results go to DIR (default
# benchmarks/results/gpu/): prefill_decode/, next/, compare/ and throughput/, each with its .md, .json and .png.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="$ROOT/.venv/bin/python"
[ -x "$PYTHON" ] || PYTHON=python3

QUICK=0
OUT="$ROOT/benchmarks/results/gpu"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1; shift ;;
        --out) OUT="${2:?--out needs a directory}"; shift 2 ;;
        *) echo "usage: bash benchmarks/gpu.sh [--quick] [--out DIR]; unknown argument: $1" >&2; exit 2 ;;
    esac
done

if [ "$QUICK" = 1 ]; then
    COMMON=(--quick --device cpu --threads 1)
    THROUGHPUT=(--methods fastv --batch-sizes 1,2 --answer-tokens 3)
    COMPARE=(--methods fastv)  # a smoke run: tests/test_compare.py compares every method
else
    if ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        echo "gpu.sh: no CUDA device visible to $PYTHON; run with --quick for the CPU version" >&2
        exit 1
    fi
    nvidia-smi -L || true
    # 3 repeats and 32 new tokens keep the four runs (four 7B builds included) under 8 minutes on an H100.
    COMMON=(--shape 7b --device cuda --dtype bfloat16 --repeats 3)
    # The decoder-stage methods and VisionZip, eager and replayed as a CUDA graph side by side; 128-token
    # answers at batches 1, 8 and 16 (3-token answers measure prefill, which prefill_decode already does).
    THROUGHPUT=(--methods mustdrop,fastv,pdrop,sparsevlm,visionzip --decode eager,cuda-graph --batch-sizes 1,8,16
                --answer-tokens 128 --repeats 1)
    COMPARE=()
fi
"$PYTHON" -c 'import torch, transformers; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}")'

run() {  # run <name> <module> [flags...]: one benchmark, timed, into $OUT/<name>
    local name="$1" module="$2"
    shift 2
    echo "== $name: $PYTHON -m $module ${COMMON[*]} $* --out $OUT/$name"
    local started=$SECONDS
    "$PYTHON" -m "$module" "${COMMON[@]}" "$@" --out "$OUT/$name"
    echo "== $name done in $((SECONDS - started)) s"
}

run prefill_decode llava.bench.prefill_decode
run next llava.bench.prefill_decode --next
run compare llava.bench.compare --budgets 64 ${COMPARE[@]+"${COMPARE[@]}"}
run throughput llava.bench.throughput "${THROUGHPUT[@]}"
echo "gpu.sh: all four written under $OUT in $SECONDS s"
