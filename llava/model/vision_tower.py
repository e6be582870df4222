"""Locate the CLIP vision tower that an original-layout LLaVA checkpoint names in `mm_vision_tower`.

The original checkpoints do not contain the tower; they name it (e.g. `openai/clip-vit-large-patch14-336`)
and LLaVA downloads it. We never download: the tower must be a local directory or already be in the
Hugging Face cache.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from llava.model.checkpoint_files import CheckpointError

TOWER_CONFIG = "config.json"


def resolve_vision_tower(name: str, model_dir: Path, override: str | None = None) -> Path:
    """Return the local directory of the vision tower.

    Looked up in order: the `--vision-tower` override, `name` as a path (absolute or relative to the
    working directory), `name` relative to the model directory, `name` as a hub id in the local
    Hugging Face cache (offline).
    """
    if override is not None:
        path = Path(override).expanduser()
        if not (path / TOWER_CONFIG).is_file():
            raise CheckpointError(f"--vision-tower {override}: no {TOWER_CONFIG} in that directory")
        return path
    for candidate in (Path(name).expanduser(), model_dir / name):
        if (candidate / TOWER_CONFIG).is_file():
            return candidate
    try:
        return Path(snapshot_download(repo_id=name, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        pass
    raise CheckpointError(
        f"vision tower '{name}' (mm_vision_tower of {model_dir / 'config.json'}) was not found locally. "
        f"Download it first, e.g. `hf download {name}` (it then sits in the Hugging Face "
        "cache), or pass --vision-tower /path/to/the/tower/directory."
    )
