"""Find and stream the weight files of a checkpoint directory, one tensor at a time.

Streaming (rather than loading whole state dicts) keeps peak memory at one copy of the model, which
matters for 7B checkpoints on user machines.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete or unreadable; the message says what to fix."""


def weight_files(checkpoint_dir: Path) -> list[Path]:
    """Return the weight shards of a directory, preferring safetensors over .bin."""
    for index_name, single_name in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        index_path = checkpoint_dir / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise CheckpointError(f"cannot read the shard index {index_path} ({error!r}); download it again") from None
            shards = [checkpoint_dir / name for name in dict.fromkeys(weight_map.values())]
            missing = [str(s) for s in shards if not s.is_file()]
            if missing:
                raise CheckpointError(
                    f"{index_path} lists weight files that are not on disk: {', '.join(missing)}; "
                    "download the complete checkpoint"
                )
            return shards
        if (checkpoint_dir / single_name).is_file():
            return [checkpoint_dir / single_name]
    raise CheckpointError(
        f"no weights found in {checkpoint_dir}: expected {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, "
        f"{BIN_INDEX} or {BIN_SINGLE}"
    )


def unreadable(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(f"cannot read weight file {path}: {error}; it is truncated or corrupt, download it again")


def check_weight_files(files: list[Path]) -> None:
    """Open every safetensors shard's header before the (long) load starts: safetensors checks there
    that the file covers every tensor, so a truncated download fails at once, naming the shard."""
    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt", device="cpu"):
                    pass
            except (SafetensorError, OSError) as error:
                raise unreadable(path, error) from None


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) pairs from safetensors or torch .bin files without holding them all."""
    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    for name in handle.keys():
                        yield name, handle.get_tensor(name)
            except (SafetensorError, OSError) as error:
                raise unreadable(path, error) from None
        else:
            try:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as error:  # torch raises several types for a corrupt pickle/zip
                raise unreadable(path, error) from None
            yield from state.items()
            del state
