"""Find and stream the weight files of a checkpoint directory, one tensor at a time.

Streaming (rather than loading whole state dicts) keeps peak memory at one copy of the model, which
matters for 7B checkpoints on user machines.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete or unreadable; the message says what to fix."""


FieldTypes = Mapping[str, tuple[type, ...]]  # a JSON field's name -> the Python types its value may have
SHOWN_VALUE_CHARS = 60
ALTERNATIVES_DETAIL = ". Errors: "  # where transformers goes on to list why each allowed type failed


def read_json_object(path: Path) -> dict:
    """One of a checkpoint's JSON files (config, tokenizer config, ...) as a dict; a file that cannot be
    read, parsed, or is not an object is one line naming it, not a library's traceback."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot parse {path}: {error}; download it again") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def check_field_types(record: dict, types: FieldTypes, path: Path) -> None:
    """Refuse a field of `record` (read from `path`) whose value has a type it may not have; bool never
    passes for int. Fields that are absent are left to their defaults."""
    for name, allowed in types.items():
        if name not in record:
            continue
        value = record[name]
        if isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool)):
            continue
        expected = " or ".join("null" if kind is type(None) else kind.__name__ for kind in allowed)
        shown = repr(value)[:SHOWN_VALUE_CHARS]
        raise CheckpointError(f"{path}: field {name!r} must be {expected}, got {type(value).__name__} {shown}")


@contextmanager
def config_field_errors(path: Path) -> Iterator[None]:
    """transformers' config classes check their fields' types; their error (a chained library traceback)
    becomes one line naming the file and the field."""
    try:
        yield
    except StrictDataclassError as error:
        cause = " ".join(str(error.__cause__ or error).split())
        raise CheckpointError(f"{path}: {cause.split(ALTERNATIVES_DETAIL)[0]}") from None


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


REMAP_BYTES = 512 * 2**20  # a .bin shard is mapped afresh after this much of it was read (see iter_tensors)


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) pairs from safetensors or torch .bin files, without holding a shard in memory.

    Both formats are memory-mapped, and a mapped page the load has read stays in the process's resident set
    until its file is unmapped: reading a 10 GB shard through one mapping holds all of it beside the
    converted weights (a 7B load into bf16 peaked at 1.55x the weights). So a safetensors tensor is read
    through a mapping of its own (opening one is cheap), and a .bin shard is mapped afresh after every
    REMAP_BYTES read (each mapping unpickles the shard's index, ~25 ms for a 10 GB shard): at most that much
    of a shard stays resident, released once the caller has copied the tensors into the model."""
    for path in files:
        yield from safetensors_tensors(path) if path.suffix == ".safetensors" else torch_file_tensors(path)


def safetensors_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            names = list(handle.keys())
        for name in names:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                tensor = handle.get_tensor(name)
            yield name, tensor
    except (SafetensorError, OSError) as error:
        raise unreadable(path, error) from None


def torch_file_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    state, read = load_torch_file(path), 0
    for name in list(state):
        if read >= REMAP_BYTES:
            state, read = load_torch_file(path), 0
        tensor = state[name]
        read += tensor.nbytes
        yield name, tensor


def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # torch raises several types for a corrupt pickle/zip
        raise unreadable(path, error) from None
