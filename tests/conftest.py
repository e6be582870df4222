"""Session-wide tiny checkpoints: written once per test run, never downloaded."""

from __future__ import annotations

import base64
import csv
import os
import subprocess
import sys
from collections.abc import Iterable
from io import BytesIO
from pathlib import Path

import pytest
import torch
from PIL import Image

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


def load_on_cpu(checkpoint: Path, **options):
    """(tokenizer, model, image_processor, context_len) of a tiny checkpoint, fp32 on CPU (`options`: the
    loader's others, e.g. max_pixels)."""
    from llava.model.builder import load_pretrained_model

    return load_pretrained_model(str(checkpoint), device="cpu", torch_dtype="fp32", **options)


@pytest.fixture(scope="session")
def loaded_original(tiny_original):
    return load_on_cpu(tiny_original)


@pytest.fixture(scope="session")
def loaded_hf(tiny_hf):
    return load_on_cpu(tiny_hf)


@pytest.fixture(scope="session")
def demo_images() -> list[Path]:
    return sorted((DEMO_DIR / "images").glob("*.png"))


def method_at_budget(name: str, budget: int):
    """Method `name` built with `budget`, or with its defaults if it picks its own count (PruMerge+)."""
    from llava.drop.methods import METHODS, create_method

    return create_method(name) if METHODS[name].own_count else create_method(name, {"budget": str(budget)})


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


# --- helpers shared by several test modules ---------------------------------------------------------

DEMO_QUESTION_FILE = DEMO_DIR / "llava_textvqa_demo.jsonl"
DEMO_IMAGE_FOLDER = DEMO_DIR / "images"


def cli_args(model: Path, questions: Path, answers: Path, *extra: str, max_new_tokens: int = 4) -> list[str]:
    """An answering CLI's flags for a greedy CPU run on the demo images."""
    return [
        "--model-path", str(model), "--question-file", str(questions), "--image-folder", str(DEMO_IMAGE_FOLDER),
        "--answers-file", str(answers), "--temperature", "0", "--conv-mode", "vicuna_v1",
        "--max_new_tokens", str(max_new_tokens), "--device", "cpu", *extra,
    ]


def loader_answer(model: Path, image_name: str, question: str, tmp_path: Path, *flags: str,
                  max_new_tokens: int = 4) -> dict:
    """model_vqa_loader's answers line for one greedy question about demo image `image_name`, with `flags`."""
    import json
    import tempfile

    from llava.eval.model_vqa_loader import main as answer_questions

    run_dir = Path(tempfile.mkdtemp(dir=tmp_path))  # a fresh answers file: no resume across calls
    questions = run_dir / "question.jsonl"
    questions.write_text(json.dumps({"question_id": "q", "image": image_name, "text": question}) + "\n")
    answers = run_dir / "answers.jsonl"
    answer_questions(cli_args(model, questions, answers, *flags, max_new_tokens=max_new_tokens))
    return json.loads(answers.read_text())


def first_questions(tmp_path: Path, count: int) -> Path:
    lines = DEMO_QUESTION_FILE.read_text().splitlines()[:count]
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def annotations_for(questions: Path, tmp_path: Path) -> Path:
    """The demo's TextVQA annotations of just these questions (the scorer wants every one answered)."""
    import json

    asked = {json.loads(line)["question_id"] for line in questions.read_text().splitlines()}
    annotations = json.loads((DEMO_DIR / "TextVQA_demo_annotations.json").read_text())
    annotations["data"] = [entry for entry in annotations["data"] if entry["image_id"] in asked]
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(annotations))
    return path


def hf_input_ids(input_ids: torch.Tensor, image_token_id: int, vision_tokens: int) -> torch.Tensor:
    """transformers' Llava expects one <image> token per vision token instead of our single sentinel."""
    from llava.constants import IMAGE_TOKEN_INDEX

    ids = input_ids[0].tolist()
    at = ids.index(IMAGE_TOKEN_INDEX)
    return torch.tensor([ids[:at] + [image_token_id] * vision_tokens + ids[at + 1 :]])


def run_demo_script(script: str, setting: str, model: Path, extra_env: dict[str, str]):
    """`run_benchmark_script` on the bundled TextVQA-format demo questions and images."""
    return run_benchmark_script(script, setting, model, {
        "QUESTION_FILE": str(DEMO_QUESTION_FILE), "IMAGE_FOLDER": str(DEMO_IMAGE_FOLDER), **extra_env})


MMBENCH_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]


def image_base64(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (24, 16)) -> str:
    buffer = BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def sample_rows() -> list[dict[str, str]]:
    """Three questions with 3, 4 and 2 options; the hint is text, pandas' "nan", and empty."""
    return [
        {"index": "0", "question": "What color is the sign?", "hint": "A sign by the road.", "A": "red", "B": "blue",
         "C": "green", "D": "", "answer": "A", "category": "color", "l2-category": "attribute"},
        {"index": "1", "question": "How many cars?", "hint": "nan", "A": "1", "B": "2", "C": "3", "D": "4",
         "answer": "C", "category": "count", "l2-category": "instance"},
        {"index": "2", "question": "Is it day?", "hint": "", "A": "yes", "B": "no", "C": "", "D": "",
         "answer": "B", "category": "color", "l2-category": "attribute"},
    ]


def write_tsv(path: Path, rows: list[dict[str, str]], columns: list[str] = MMBENCH_COLUMNS) -> Path:
    """An MMBench-style TSV; every row gets an image unless it brings its own."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t", extrasaction="ignore")
        writer.writeheader()
        for index, row in enumerate(rows):
            writer.writerow({"image": image_base64((40 * index, 90, 160)), **row})
    return path


# --- LLaVA-NeXT (v1.6) tiny checkpoints ---------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_next_original(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llava-next-tiny", layout="original", arch="next")


@pytest.fixture(scope="session")
def tiny_next_hf(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llava-next-tiny-hf", layout="hf", arch="next")


@pytest.fixture(scope="session")
def loaded_next_original(tiny_next_original):
    return load_on_cpu(tiny_next_original)


@pytest.fixture(scope="session")
def loaded_next_hf(tiny_next_hf):
    return load_on_cpu(tiny_next_hf)


def demo_question_inputs(loaded, image_name: str, question: str, conv_mode: str):
    """The encoded prompt (ids, the image's model inputs, its size or grid) for one demo image on a loaded model."""
    from llava.mm_utils import load_image
    from llava.model.inputs import encode_question

    tokenizer, model, image_processor, _ = loaded
    image = load_image(DEMO_IMAGE_FOLDER / image_name)
    return encode_question(question, image, model, tokenizer, image_processor, conv_mode)


def next_demo_inputs(loaded, image_name: str, question: str = "What is written here?"):
    """The encoded prompt (ids, base image + crops, image size) for one demo image on a loaded NeXT model."""
    return demo_question_inputs(loaded, image_name, question, "vicuna_v1")


# The demo images by shape and how LLaVA-NeXT's tiny checkpoint tiles them (base image + crops):
# tall 180x300 -> a column of 2 crops, square 400x400 -> 2 x 2, wide 500x160 -> a row of 2.
NEXT_DEMO_IMAGES = {"tall": "175e99412607ad5f.png", "square": "3fc86ee644365862.png", "wide": "4c6552be651e1ca5.png"}


def questions_about(image_names: Iterable[str], tmp_path: Path) -> Path:
    """A question file holding the demo questions about these images, in the demo file's order."""
    wanted = {f'"image": "{name}"' for name in image_names}
    lines = [line for line in DEMO_QUESTION_FILE.read_text().splitlines() if any(key in line for key in wanted)]
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def cli_refusal(main, argv: list[str]) -> str:
    """Run a CLI in-process; its one `error:` line (SystemExit with a message is exit code 1 on stderr)."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    message = stopped.value.code
    assert isinstance(message, str) and message.startswith("error: "), message
    assert "\n" not in message and "Traceback" not in message
    return message


# --- Qwen2.5-VL / Qwen2-VL tiny checkpoints (transformers layout, as Qwen ships them) --------------------

@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen2.5-vl-tiny", layout="hf", arch="qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen2-vl-tiny", layout="hf", arch="qwen2_vl")


@pytest.fixture(scope="session")
def loaded_qwen(tiny_qwen):
    return load_on_cpu(tiny_qwen)


@pytest.fixture(scope="session")
def loaded_qwen2(tiny_qwen2):
    return load_on_cpu(tiny_qwen2)


@pytest.fixture(params=["qwen2_5_vl", "qwen2_vl"])
def loaded_any_qwen(request):
    """Each Qwen family's tiny checkpoint, loaded (a test using it runs once per family)."""
    return request.getfixturevalue("loaded_qwen" if request.param == "qwen2_5_vl" else "loaded_qwen2")


def qwen_demo_inputs(loaded, shape: str, question: str):
    """The encoded prompt (ids, patches, patch grid) about one demo image (NEXT_DEMO_IMAGES) on a loaded Qwen."""
    from llava.model.qwen import QWEN_CONV_MODE

    return demo_question_inputs(loaded, NEXT_DEMO_IMAGES[shape], question, QWEN_CONV_MODE)
