"""Session-wide tiny checkpoints: written once per test run, never downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llava.model.tiny import write_tiny_checkpoint

# Our tiny models gain nothing from intra-op threads, and on a loaded 2-core machine torch's thread
# pool oversubscribes the cores: a 0.05 s vision pass was seen taking 10 s. One thread keeps tests steady.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO_ROOT / "playground" / "data" / "eval" / "demo"


@pytest.fixture(scope="session")
def tiny_original(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llava-tiny", layout="original")


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llava-tiny-hf", layout="hf")


@pytest.fixture(scope="session")
def loaded_original(tiny_original):
    """(tokenizer, model, image_processor, context_len) of the original-layout tiny model, fp32 on CPU."""
    from llava.model.builder import load_pretrained_model

    return load_pretrained_model(str(tiny_original), device="cpu", torch_dtype="fp32")


@pytest.fixture(scope="session")
def loaded_hf(tiny_hf):
    from llava.model.builder import load_pretrained_model

    return load_pretrained_model(str(tiny_hf), device="cpu", torch_dtype="fp32")


@pytest.fixture(scope="session")
def demo_images() -> list[Path]:
    return sorted((DEMO_DIR / "images").glob("*.png"))
