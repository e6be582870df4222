"""Session-wide tiny checkpoints: written once per test run, never downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
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


def vicuna_prompt(question: str, with_image: bool = True) -> str:
    """The vicuna_v1 template around one question, with the <image> placeholder first."""
    from llava.conversation import get_conv_template

    conversation = get_conv_template("vicuna_v1")
    conversation.append_message(conversation.roles[0], ("<image>\n" if with_image else "") + question)
    conversation.append_message(conversation.roles[1], None)
    return conversation.get_prompt()


def answer(loaded, image_path, drop, question="What is the word?"):
    """Ten greedy tokens about one image, dropping per `drop` (a DropConfig, a DropMethod or None)."""
    from llava.drop.generate import SamplingConfig, generate
    from llava.drop.methods import as_method
    from llava.mm_utils import load_image, process_images, tokenizer_image_token

    tokenizer, model, image_processor, _ = loaded
    input_ids = tokenizer_image_token(vicuna_prompt(question), tokenizer, return_tensors="pt")
    pixel_values = process_images([load_image(image_path)], image_processor)
    return generate(model, input_ids, pixel_values, SamplingConfig(max_new_tokens=10), {tokenizer.eos_token_id},
                    drop=as_method(drop))


SCRIPT_TIMEOUT_S = 600


def run_benchmark_script(script: str, setting: str, model: Path, extra_env: dict[str, str]):
    """`bash scripts/v1_5/eval/<script> <setting>` on CPU with this Python, 2 new tokens, `extra_env` on top."""
    env = {**os.environ, "MODEL_PATH": str(model), "PYTHON": sys.executable,
           "EXTRA_ARGS": "--max_new_tokens 2 --device cpu", "CUDA_VISIBLE_DEVICES": "", **extra_env}
    return subprocess.run(["bash", f"scripts/v1_5/eval/{script}", setting], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)

