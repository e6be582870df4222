#!/usr/bin/env bash
# Create .venv-lmms: MustDrop with its `lmms` extra (lmms-eval 0.7.x), for `lmms-eval --model mustdrop`
# and `bash scripts/test.sh --lmms`. A separate environment, because lmms-eval pins older libraries
# (protobuf < 7 through wandb, filelock < 4) than the ones .venv is tested with.
# torch: as in setup.sh, a torch already in .venv-lmms is kept (put your CUDA build there first on a GPU
# machine); otherwise requirements.txt's pinned CPU wheel. Either way the install below keeps that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv-lmms
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
if ! "$VENV/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'; then
    "$VENV/bin/python" -m pip install --quiet -r requirements.txt
fi
KEEP_TORCH="$(mktemp)"
trap 'rm -f "$KEEP_TORCH"' EXIT
"$VENV/bin/python" -W ignore -c 'import torch; print(f"torch=={torch.__version__}")' > "$KEEP_TORCH"
"$VENV/bin/python" -m pip install --quiet -e ".[lmms,test]" -c "$KEEP_TORCH"
# lmms-eval requires torchvision, and the package index's torchvision is built for CUDA torch: next to a
# CPU torch it cannot load (libc10_cuda.so is missing), and transformers, which imports torchvision when
# it is installed, then fails to import at all. Our models do not use torchvision, so it goes.
if ! "$VENV/bin/python" -c 'import torchvision' 2> /dev/null; then
    echo "note: removing torchvision from $VENV: this build cannot load next to $(cat "$KEEP_TORCH") (a CPU torch);" \
         "transformers would fail to import with it"
    "$VENV/bin/python" -m pip uninstall --quiet --yes torchvision
fi
