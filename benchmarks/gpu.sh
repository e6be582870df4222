#!/usr/bin/env bash
# The GPU benchmark set at LLaVA-1.5-7B's real widths (random weights, no download): MustDrop's published
# LLaVA-1.5 settings, MustDrop on LLaVA-NeXT at 640 / 320 / 160 tokens, every method at 64 tokens, and
# short-answer throughput (time to first token and questions/s against batch size) on LLaVA-1.5 and
# LLaVA-NeXT, and FastV on Qwen2.5-VL at 0.333 / 0.222 / 0.111 of an image's tokens with its throughput, in bf16 with SDPA on one CUDA device; under 8 minutes on one H100. Installs nothing.
#
#   bash benchmarks/gpu.sh [--quick] [--out DIR]
#
# --quick runs the same seven on the CPU at the quick shape (CI). Results go to DIR (default
# benchmarks/results/gpu/): prefill_decode/, next/, compare/, throughput/, throughput_next/, qwen/ and
# throughput_qwen/, each with its .md, .json and .png.
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
    THROUGHPUT=(--methods fastv --batch-sizes 1,2)
    # NeXT's unpruned prefill (2928 vision tokens) takes ~3 s a prompt here: batch 1 only, and one budget at
    # which FastV is refused (the skip path) and VisionZip runs.
    THROUGHPUT_NEXT=(--next --methods fastv,visionzip --batch-sizes 1 --budgets 160)
    COMPARE=(--methods fastv)  # a smoke run: tests/test_compare.py compares every method
    THROUGHPUT_QWEN=(--qwen --methods fastv --batch-sizes 1 --budgets 32)  # the quick image brings 192 tokens
else
    if ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        echo "gpu.sh: no CUDA device visible to $PYTHON; run with --quick for the CPU version" >&2
        exit 1
    fi
    nvidia-smi -L || true
    # 3 repeats and 32 new tokens for the first three runs. The set fitted 8 minutes on an H100 (7B builds
    # included) with a 128-token throughput run in place of the two short-answer runs below, which are
    # estimated to take less (the count below; not yet timed on a GPU).
    COMMON=(--shape 7b --device cuda --dtype bfloat16 --repeats 3)
    # Short answers (3 tokens, the default) for the decoder-stage methods and VisionZip, with the unpruned
    # model and the limit at each budget, one repeat. Estimate: from docs/throughput-h200.png (128-token
    # answers, questions/s less the decode time) a LLaVA-1.5 prompt's vision stage and prefill took 32 to
    # 51 ms at these widths when prompts were prefilled one at a time (together, no slower); say 50 ms on
    # an H100. Each batch size costs a setting three batches (warm-up, TTFT, answers): LLaVA-1.5, 7 settings
    # x 3 x (1 + 16 + 64) prompts x 50 ms = 85 s. NeXT (5 views and a 3000-token prefill: ~150 ms unpruned,
    # ~70 ms at 320/160) at batches 1 and 16 (64 unpruned answers' KV caches, ~100 GB, would not fit):
    # 10 settings (FastV, PDrop and SparseVLM refuse 160 on NeXT) x 3 x 17 prompts = 40 s. With two 7B
    # builds (~20 s each) about 2.8 minutes, less than the 128-token eager and CUDA-graph run they replace
    # (counted alike: 6 settings x 2 passes x ~16 s = 3.3 minutes).
    THROUGHPUT=(--methods mustdrop,fastv,pdrop,sparsevlm,visionzip --batch-sizes 1,16,64 --repeats 1)
    THROUGHPUT_NEXT=(--next --methods mustdrop,fastv,pdrop,sparsevlm,visionzip --batch-sizes 1,16 --repeats 1)
    # Qwen2.5-VL-7B's widths, a 1024 x 768 image (999 vision tokens, ~1,060-token prompts), budgets 222 and 111:
    # the decoder methods (the others are skipped with the reason). Not yet timed on a GPU.
    THROUGHPUT_QWEN=(--qwen --methods fastv,pdrop,sparsevlm --batch-sizes 1,16 --repeats 1)
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
run throughput_next llava.bench.throughput "${THROUGHPUT_NEXT[@]}"
run qwen llava.bench.prefill_decode --qwen
run throughput_qwen llava.bench.throughput "${THROUGHPUT_QWEN[@]}"
echo "gpu.sh: all seven written under $OUT in $SECONDS s"
