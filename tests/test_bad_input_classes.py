"""Bad input by class (issue 24): every member of each class is refused in one `error:` line that names
the problem, with a non-zero exit and no traceback, before the model loads where that is possible.

One parametrised table per class; the tables are derived from the parsers and the method registry
where they can be, so that a flag or option added later is covered without editing this file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import llava.eval.answering.loop as question_loop
from llava.drop.methods import METHODS
from llava.drop.methods.registry import discover_methods
from llava.eval import calibrate
from llava.eval import run as runner
from llava.eval.answering import vqa
from tests.conftest import DEMO_IMAGE_FOLDER, DEMO_QUESTION_FILE, REPO_ROOT, cli_args, cli_refusal, first_questions
from tests.test_reliability_scripts import demo_textvqa

NON_FINITE = ("nan", "inf", "-inf")


refusal = cli_refusal


def run_module(module: str, argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_error_line(done: subprocess.CompletedProcess, *fragments: str, code: int = 1) -> str:
    """A real process failed with `code`, its stderr one `error:` line holding every fragment, no traceback."""
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a CLI gets as far as loading weights."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded although the input could be refused before")

    monkeypatch.setattr(question_loop, "load_pretrained_model", forbidden)
    monkeypatch.setattr("llava.viz.load_pretrained_model", forbidden)


# --- 1. non-finite numbers ---------------------------------------------------------------------------

def float_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Every option of `parser` that argparse reads with `float` (and so takes "nan" and "inf")."""
    return [action.option_strings[0] for action in parser._actions if action.type is float]


def float_options() -> list[tuple[str, str]]:
    """(method, option) for every float option (plain or optional) of every registered method."""
    discover_methods()
    pairs = []
    for name, method in sorted(METHODS.items()):
        options = getattr(method, "options_class", None)
        for option, hint in typing.get_type_hints(options).items() if options else ():
            if hint is float or float in typing.get_args(hint):
                pairs.append((name, option))
    return pairs


LOADER_ARGV = cli_args(Path("no-model"), DEMO_QUESTION_FILE, Path("unused.jsonl"))
RUNNER_ARGV = ["--tasks", "textvqa", "--model-path", "no-model", "--sparse", "--setting", "x"]
CALIBRATE_ARGV = ["--model-path", "no-model", "--question-file", str(DEMO_QUESTION_FILE)]
FLAG_CASES = [
    *[(vqa.main, LOADER_ARGV, flag) for flag in float_flags(vqa.build_parser())],
    *[(runner.main, RUNNER_ARGV, flag) for flag in float_flags(runner.build_parser())],
    *[(calibrate.main, CALIBRATE_ARGV, flag) for flag in float_flags(calibrate.build_parser())],
]


def test_the_flag_table_holds_every_numeric_flag():
    """A guard on the table: the flags the issue names are among those found."""
    flags = {flag for _, _, flag in FLAG_CASES}
    assert {"--budget", "--temperature", "--top_p", "--global_thr", "--individual_thr", "--merge_thr",
            "--key_rate", "--ratio", "--tolerance"} <= flags
    assert {("fastv", "kept_share"), ("pdrop", "budget"), ("sparsevlm", "rank_scale")} <= set(float_options())


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("main,argv,flag", FLAG_CASES,
                         ids=[f"{main.__module__.rsplit('.', 1)[-1]}{flag}" for main, _, flag in FLAG_CASES])
def test_a_non_finite_flag_is_refused_by_name(no_model_load, main, argv, flag, value):
    message = refusal(main, [*argv, f"{flag}={value}"])  # "=": argparse reads a lone -inf as a flag
    assert message == f"error: {flag} must be a finite number, got {float(value)}"


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("method,option", float_options())
def test_a_non_finite_method_option_is_refused_by_name(no_model_load, method, option, value):
    argv = [*LOADER_ARGV, "--method", method, "--method-args", f"{option}={value}"]
    assert refusal(vqa.main, argv) == f"error: --method-args {option}={value}: {option} must be finite, got '{value}'"


def test_a_non_finite_option_in_a_list_and_in_viz_is_refused(no_model_load, tmp_path):
    from llava.viz import main as viz_main

    argv = [*LOADER_ARGV, "--method", "sparsevlm", "--method-args", "drop_after=2;6,keep=66;-inf"]
    assert "keep=66;-inf: keep must be finite" in refusal(vqa.main, argv)
    argv = ["--model-path", "no-model", "--image", "x.png", "--question", "q", "--method", "fastv",
            "--method-args", "budget=Infinity", "--out-dir", str(tmp_path / "out")]
    assert "--method-args budget=Infinity" in refusal(viz_main, argv)
    assert not (tmp_path / "out").exists()


def test_a_non_finite_flag_stops_a_real_process_in_one_line():
    done = run_module("llava.eval.model_vqa_loader", [*LOADER_ARGV, "--method", "fastv", "--budget", "nan"])
    assert_one_error_line(done, "--budget must be a finite number, got nan")


# --- 2. shards of any size ---------------------------------------------------------------------------

def chunk_files(folder: Path, shards: int) -> list[Path]:
    return [folder / f"{shards}_{index}.jsonl" for index in range(shards)]


def question_ids(questions: Path) -> list[str]:
    return [json.loads(line)["question_id"] for line in questions.read_text().splitlines()]


@pytest.mark.parametrize("questions,shards", [(1, 2), (2, 3), (1, 4)])
def test_more_chunks_than_questions_leave_every_chunk_file(tiny_original, tmp_path, questions, shards, capsys):
    """LLaVA's scripts run --num-chunks N processes, then `cat` N chunk files: an empty chunk must exist."""
    question_file = first_questions(tmp_path, questions)
    for index, chunk in enumerate(chunk_files(tmp_path, shards)):
        vqa.main(cli_args(tiny_original, question_file, chunk, "--num-chunks", str(shards), "--chunk-idx", str(index),
                          max_new_tokens=2))
    merged = [json.loads(line) for chunk in chunk_files(tmp_path, shards) for line in chunk.read_text().splitlines()]
    assert [record["question_id"] for record in merged] == question_ids(question_file)
    assert "this shard has no questions" in capsys.readouterr().out


def textvqa_run_argv(model: Path, eval_dir: Path) -> list[str]:
    return ["--tasks", "textvqa", "--model-path", str(model), "--eval-dir", str(eval_dir), "--max_new_tokens", "2",
            "--device", "cpu"]


@pytest.mark.parametrize("questions,ranks,order", [(2, 3, (2, 0, 1)), (2, 3, (0, 1, 2)), (1, 3, (1, 2, 0))],
                         ids=["empty-rank-first", "empty-rank-last", "two-empty-ranks"])
def test_more_ranks_than_questions_still_merge_and_score(tiny_original, tmp_path, monkeypatch, questions, ranks,
                                                          order):
    """torchrun-style ranks, one after another in this process: the last to finish merges and scores."""
    demo_textvqa(tmp_path / "textvqa", questions)
    for rank in order:
        monkeypatch.setenv("WORLD_SIZE", str(ranks))
        monkeypatch.setenv("RANK", str(rank))
        runner.main(textvqa_run_argv(tiny_original, tmp_path))
    answers = tmp_path / "textvqa" / "answers" / f"{tiny_original.name}-full"
    assert len((answers / "merge.jsonl").read_text().splitlines()) == questions
    assert json.loads((answers / "summary.json").read_text())["questions"] == questions
    assert (answers / "scores.json").is_file()


def test_more_gpus_than_questions_still_merge_and_score(tiny_original, tmp_path):
    """The runner's own per-GPU processes (CPU-only here): three processes for two questions."""
    demo_textvqa(tmp_path / "textvqa", 2)
    done = subprocess.run([sys.executable, "-m", "llava.eval.run", *textvqa_run_argv(tiny_original, tmp_path),
                           "--gpus", "0,1,2"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    answers = tmp_path / "textvqa" / "answers" / f"{tiny_original.name}-full"
    assert [path.stat().st_size == 0 for path in chunk_files(answers, 3)] == [False, False, True]
    assert len((answers / "merge.jsonl").read_text().splitlines()) == 2
    assert (answers / "summary.json").is_file() and (answers / "scores.json").is_file()


# --- 3. what the machine cannot run ------------------------------------------------------------------

HAS_CUDA_TORCH = torch.version.cuda is not None or torch.version.hip is not None
HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None
VIZ_ARGV = ["--model-path", "no-model", "--image", str(DEMO_IMAGE_FOLDER / "175e99412607ad5f.png"), "--question", "q"]
BENCH_ARGV = ["--quick", "--methods", "fastv"]
DEVICE_CASES = [
    (["--device", "gpu"], "--device 'gpu' is not a device torch knows; choose cpu, cuda or cuda:N"),
    (["--device", "cuda:x"], "--device 'cuda:x' is not a device torch knows"),
    (["--device", "meta"], "--device meta: this project runs on cpu or cuda (cuda:N), not meta"),
    (["--device", "mps"], "--device mps: this project runs on cpu or cuda (cuda:N), not mps"),
    pytest.param(["--device", "cuda"], "--device cuda: this torch", marks=pytest.mark.skipif(
        HAS_CUDA_TORCH, reason="this torch has CUDA")),
    pytest.param(["--device", "cuda:3"], "has no CUDA support; install a CUDA build of torch", marks=pytest.mark.skipif(
        HAS_CUDA_TORCH, reason="this torch has CUDA")),
]
QUANTIZATION_CASES = [
    (["--load-8bit", "--load-4bit"], "--load-8bit and --load-4bit: choose one"),
    pytest.param(["--load-8bit"], "--load-8bit needs bitsandbytes, which is not installed: pip install bitsandbytes",
                 marks=pytest.mark.skipif(HAS_BITSANDBYTES, reason="bitsandbytes is installed")),
    pytest.param(["--load-4bit"], "--load-4bit needs bitsandbytes", marks=pytest.mark.skipif(
        HAS_BITSANDBYTES, reason="bitsandbytes is installed")),
]


def cli_main(name: str) -> tuple[Callable[[list[str]], None], list[str]]:
    """(main, its argv without the case's flags) of the CLIs that place a model."""
    from llava.bench import compare
    from llava.viz import main as viz_main

    return {"vqa": (vqa.main, LOADER_ARGV), "run": (runner.main, RUNNER_ARGV), "calibrate": (calibrate.main,
            CALIBRATE_ARGV), "viz": (viz_main, VIZ_ARGV), "bench": (compare.main, BENCH_ARGV)}[name]


@pytest.mark.parametrize("cli", ["vqa", "run", "calibrate", "viz", "bench"])
@pytest.mark.parametrize("flags,expected", DEVICE_CASES)
def test_a_device_torch_cannot_use_is_refused_before_loading(no_model_load, tmp_path, monkeypatch, cli, flags,
                                                             expected):
    monkeypatch.chdir(tmp_path)  # the benchmark's default --out is relative
    main, argv = cli_main(cli)
    assert expected in refusal(main, [*argv, *flags])


@pytest.mark.parametrize("cli", ["vqa", "run", "calibrate"])
@pytest.mark.parametrize("flags,expected", QUANTIZATION_CASES)
def test_quantised_loading_this_machine_cannot_do_is_refused_before_loading(no_model_load, cli, flags, expected):
    main, argv = cli_main(cli)
    assert expected in refusal(main, [*argv, *flags])


def test_a_device_refusal_is_one_line_of_a_real_process():
    done = run_module("llava.eval.model_vqa_loader", [*LOADER_ARGV, "--device", "gpu"])
    assert_one_error_line(done, "--device 'gpu' is not a device torch knows")


# --- 4. checkpoint files -----------------------------------------------------------------------------

def linked_copy(model: Path, copy: Path) -> Path:
    """A checkpoint folder whose files are links to `model`'s (a changed file must be replaced, not edited)."""
    for path in model.rglob("*"):
        target = copy / path.relative_to(model)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    return copy


def set_json_field(path: Path, dotted: str, value) -> None:
    record = json.loads(path.read_text())
    *parents, name = dotted.split(".")
    inner = record
    for parent in parents:
        inner = inner[parent]
    inner[name] = value
    path.unlink()
    path.write_text(json.dumps(record))


def replace_file(path: Path, content: bytes | None) -> None:
    path.unlink()
    if content is not None:
        path.write_bytes(content)


CONFIG_CASES = [  # (layout, file, field, value, what the line says after "<file>: ")
    ("original", "config.json", "mm_vision_tower", 5, "field 'mm_vision_tower' must be str, got int 5"),
    ("original", "config.json", "mm_vision_select_layer", "-2", "field 'mm_vision_select_layer' must be int, got str"),
    ("original", "config.json", "mm_use_im_start_end", "no", "field 'mm_use_im_start_end' must be bool, got str 'no'"),
    ("original", "config.json", "image_aspect_ratio", 3, "field 'image_aspect_ratio' must be str or null, got int 3"),
    ("original", "config.json", "image_grid_pinpoints", "336x672", "field 'image_grid_pinpoints' must be list or null"),
    ("original", "config.json", "num_hidden_layers", "2", "Field 'num_hidden_layers' expected int, got str"),
    ("original", "config.json", "vocab_size", 1.5, "Field 'vocab_size' expected int, got float"),
    ("original", "clip-vision-tower/config.json", "vision_config.hidden_size", "32", "Field 'hidden_size' expected int"),
    ("hf", "config.json", "text_config.num_hidden_layers", "2", "Field 'num_hidden_layers' expected int, got str"),
    ("hf", "config.json", "vision_config.image_size", "336", "Field 'image_size' with value '336' doesn't match"),
    ("hf", "config.json", "text_config", [], "field 'text_config' must be dict, got list []"),
    ("hf", "config.json", "mm_use_im_start_end", 1, "field 'mm_use_im_start_end' must be bool, got int 1"),
]
TOKENIZER_CASES = [  # (layout, file, new content or None to remove it, what the line says)
    ("original", "tokenizer.model", None, "holds no tokenizer vocabulary (none of tokenizer.model, tokenizer.json"),
    ("hf", "tokenizer.model", None, "holds no tokenizer vocabulary"),
    ("original", "tokenizer.model", b"not a model", "tokenizer.model (INTERNAL: could not parse ModelProto"),
    ("hf", "tokenizer.model", b"", "tokenizer.model"),
    ("original", "tokenizer_config.json", b"{broken", "cannot parse {file}: Expecting property name"),
    ("hf", "tokenizer_config.json", b"[1]", "{file}: expected a JSON object, got list"),
    ("original", "tokenizer_config.json", b'{"add_bos_token": "yes"}', "{file}: field 'add_bos_token' must be bool"),
    ("hf", "tokenizer_config.json", b'{"tokenizer_class": 5}', "{file}: field 'tokenizer_class' must be str or null"),
    ("original", "special_tokens_map.json", b"{broken", "cannot parse {file}"),
    ("hf", "added_tokens.json", b"\xff\xfe", "cannot parse {file}"),
]


@pytest.fixture
def no_weight_load(monkeypatch):
    """Fail the test if the checkpoint's weights start to load (config and tokenizer files may be read)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the weights were loaded although the checkpoint could be refused before")

    monkeypatch.setattr("llava.model.builder.load_original_layout", forbidden)
    monkeypatch.setattr("llava.model.builder.load_hf_layout", forbidden)


@pytest.fixture
def checkpoints(tiny_original, tiny_hf) -> dict[str, Path]:
    return {"original": tiny_original, "hf": tiny_hf}


@pytest.mark.parametrize("layout,name,field,value,expected", CONFIG_CASES,
                         ids=[f"{layout}-{name}-{field}" for layout, name, field, *_ in CONFIG_CASES])
def test_a_config_field_of_the_wrong_type_is_named_with_its_file(checkpoints, tmp_path, no_weight_load, layout, name,
                                                                 field, value, expected):
    model = linked_copy(checkpoints[layout], tmp_path / "model")
    set_json_field(model / name, field, value)
    message = refusal(vqa.main, cli_args(model, DEMO_QUESTION_FILE, tmp_path / "a.jsonl"))
    assert message.startswith(f"error: {model / name}: {expected}"), message


@pytest.mark.parametrize("layout,name,content,expected", TOKENIZER_CASES,
                         ids=[f"{layout}-{name}-{'missing' if content is None else 'broken'}"
                              for layout, name, content, _ in TOKENIZER_CASES])
def test_a_missing_or_broken_tokenizer_file_is_named_before_the_weights_load(checkpoints, tmp_path, no_weight_load,
                                                                             layout, name, content, expected):
    model = linked_copy(checkpoints[layout], tmp_path / "model")
    replace_file(model / name, content)
    message = refusal(vqa.main, cli_args(model, DEMO_QUESTION_FILE, tmp_path / "a.jsonl"))
    assert expected.format(file=model / name) in message
    assert "sentencepiece or tiktoken" not in message


def test_a_tower_saved_by_transformers_5_loads_as_the_original_one(tiny_original, loaded_original, tmp_path):
    """`CLIPVisionModel.save_pretrained` writes the tower's names without `vision_model.`; transformers
    loads such a file, and so do we: the same weights, the same model."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from llava.model.builder import load_pretrained_model
    from llava.model.checkpoint_files import iter_tensors, weight_files

    source = tiny_original / "clip-vision-tower"
    tower = tmp_path / "tower"
    vision = CLIPVisionModel(CLIPVisionConfig.from_pretrained(source))  # new, so it saves in its own names
    vision.load_state_dict({name.removeprefix("vision_model."): tensor for name, tensor in
                            iter_tensors(weight_files(source)) if name.startswith("vision_model.")})
    vision.save_pretrained(tower)
    (tower / "preprocessor_config.json").write_bytes((source / "preprocessor_config.json").read_bytes())
    assert not any(name.startswith("vision_model.") for name, _ in iter_tensors(weight_files(tower)))
    _, model, _, _ = load_pretrained_model(str(tiny_original), device="cpu", torch_dtype="fp32",
                                           vision_tower=str(tower))
    expected = loaded_original[1].state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)


# --- 5. images ---------------------------------------------------------------------------------------

def image_questions(tmp_path: Path, images: list[str]) -> Path:
    """A question file with one question per image name, ids q1, q2, ..."""
    lines = [json.dumps({"question_id": f"q{index}", "image": image, "text": "What is written?"})
             for index, image in enumerate(images, start=1)]
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


DEMO_IMAGE_NAME = "175e99412607ad5f.png"
UNREADABLE_IMAGE_CASES = [  # (the images of questions 1..3, what the line says)
    ([DEMO_IMAGE_NAME, DEMO_IMAGE_NAME, "missing.png"], "question 'q3': image not found: {folder}/missing.png"),
    (["missing.png", DEMO_IMAGE_NAME, "gone.png"],
     "question 'q1': image not found: {folder}/missing.png (and 1 more of the 3 questions)"),
    ([DEMO_IMAGE_NAME, "notes.txt"], "question 'q2': cannot read image {folder}/notes.txt: cannot identify image file"),
    ([DEMO_IMAGE_NAME, "folder"], "question 'q2': cannot read image {folder}/folder:"),
]


@pytest.mark.parametrize("images,expected", UNREADABLE_IMAGE_CASES, ids=["missing-last", "two-missing", "not-an-image",
                                                                          "a-folder"])
def test_every_image_is_checked_before_the_model_loads(tiny_original, tmp_path, no_model_load, images, expected):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / DEMO_IMAGE_NAME).symlink_to(DEMO_IMAGE_FOLDER / DEMO_IMAGE_NAME)
    (folder / "notes.txt").write_text("not a picture")
    (folder / "folder").mkdir()
    argv = cli_args(tiny_original, image_questions(tmp_path, images), tmp_path / "a.jsonl")
    argv[argv.index("--image-folder") + 1] = str(folder)
    assert expected.format(folder=folder) in refusal(vqa.main, argv)
    assert not (tmp_path / "a.jsonl").exists()


@pytest.mark.parametrize("name", ["", "  "], ids=["empty", "blank"])
def test_an_empty_image_name_is_refused_not_answered_text_only(tiny_original, tmp_path, no_model_load, name):
    questions = image_questions(tmp_path, [DEMO_IMAGE_NAME, name])
    message = refusal(vqa.main, cli_args(tiny_original, questions, tmp_path / "a.jsonl"))
    assert f"question file {questions}, line 2: 'image' is empty" in message


def test_an_empty_science_qa_image_name_is_refused(tiny_original, tmp_path, no_model_load):
    from llava.eval.answering.science import main as science_main

    questions = tmp_path / "q.json"
    questions.write_text(json.dumps([{"id": "1", "image": "", "conversations": [{"value": "Q?"}]}]))
    assert "question 1: 'image' is empty" in refusal(science_main, cli_args(tiny_original, questions,
                                                                           tmp_path / "a.jsonl"))


def gradient(dtype, low: float, high: float) -> np.ndarray:
    """A 16 x 16 image whose values run from `low` (top left) to `high` (bottom right)."""
    return np.linspace(low, high, 256).reshape(16, 16).astype(dtype)


DEEP_IMAGE_CASES = [  # (file name, pixel values); PIL opens them as I;16, I and F
    ("grey16.png", gradient(np.uint16, 0, 65535)),
    ("grey12-in-16.png", gradient(np.uint16, 0, 4095)),
    ("int32.tif", gradient(np.int32, -70000, 900000)),
    ("float32.tif", gradient(np.float32, 0.0, 1.0)),
    ("float32-wide.tif", gradient(np.float32, -3.5, 1e6)),
]


@pytest.mark.parametrize("name,values", DEEP_IMAGE_CASES, ids=[name for name, _ in DEEP_IMAGE_CASES])
def test_an_image_deeper_than_8_bits_is_scaled_by_its_range_not_clipped(tmp_path, name, values):
    from PIL import Image

    from llava.mm_utils import load_image

    Image.fromarray(values).save(tmp_path / name)
    loaded = np.asarray(load_image(tmp_path / name))
    assert loaded.shape == (16, 16, 3) and loaded.dtype == np.uint8
    grey = loaded[..., 0]
    assert grey[0, 0] == 0 and grey[-1, -1] == 255
    expected = (values.astype(np.float64) - values.min()) / (values.max() - values.min()) * 255
    assert np.abs(grey - expected).max() <= 1  # every value in its place, none clipped to white



# --- 6. files the tool writes ------------------------------------------------------------------------

@pytest.fixture
def unwritable():
    """Make a file or folder unwritable for this test: immutable when running as root (whom modes do not
    stop), read-only otherwise; skipped where neither is possible."""
    changed = []

    def make(path: Path) -> Path:
        if os.geteuid() == 0:
            if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
                pytest.skip("running as root without chattr +i: nothing is unwritable")
            changed.append(lambda: subprocess.run(["chattr", "-i", str(path)], check=True))
        else:
            mode = path.stat().st_mode
            path.chmod(0o555 if path.is_dir() else 0o444)
            changed.append(lambda: path.chmod(mode))
        return path

    yield make
    for undo in reversed(changed):
        undo()


def an_existing_file(tmp_path: Path) -> Path:
    path = tmp_path / "taken"
    path.write_text("someone's file\n")
    return path


def a_folder(tmp_path: Path) -> Path:
    path = tmp_path / "a-folder"
    path.mkdir()
    return path


def output_cli(name: str) -> Callable[[list[str]], None]:
    from llava.bench import compare
    from llava.eval.scoring import pope, run_summary
    from llava.model import convert
    from llava.viz import main as viz_main

    return {"viz": viz_main, "convert": convert.main, "calibrate": calibrate.main, "summary": run_summary.main,
            "pope": pope.main, "bench": compare.main}[name]


OUTPUT_PATH_CASES = [  # (CLI, its argv around the output path {out}, how the path is made, what the line says)
    ("viz", [*VIZ_ARGV, "--out-dir", "{out}"], an_existing_file, "--out-dir {out} is an existing file; give a folder"),
    ("convert", ["--model-path", "no-model", "--out", "{out}"], an_existing_file,
     "--out {out} is an existing file; give a folder"),
    ("bench", [*BENCH_ARGV, "--out", "{out}"], an_existing_file, "--out {out} is an existing file; give a folder"),
    ("calibrate", [*CALIBRATE_ARGV, "--out", "{out}"], a_folder, "--out {out} is a folder; give a file path"),
    ("summary", ["--answers-file", "a.jsonl", "--benchmark", "textvqa", "--setting", "64", "--model-path", "m",
                 "--out", "{out}"], a_folder, "--out {out} is a folder; give a file path"),
    ("pope", ["--annotation-dir", "x", "--question-file", "q.jsonl", "--result-file", "r.jsonl", "--scores-file",
              "{out}"], a_folder, "--scores-file {out} is a folder; give a file path"),
    ("viz", [*VIZ_ARGV, "--out-dir", "{out}/figures"], an_existing_file, "--out-dir {out}/figures: {out} is a file"),
    ("calibrate", [*CALIBRATE_ARGV, "--out", "{out}/t.json"], an_existing_file, "--out {out}/t.json: {out} is a file"),
]


@pytest.mark.parametrize("cli,argv,make,expected", OUTPUT_PATH_CASES,
                         ids=[f"{cli}-{make.__name__}" for cli, _, make, _ in OUTPUT_PATH_CASES])
def test_an_output_path_of_the_wrong_kind_is_refused_before_any_work(no_model_load, tmp_path, capsys, cli, argv,
                                                                     make, expected):
    out = make(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as stopped:
        output_cli(cli)([arg.format(out=out) for arg in argv])
    assert stopped.value.code not in (0, None)
    message = stopped.value.code if isinstance(stopped.value.code, str) else capsys.readouterr().err
    errors = message.splitlines()
    assert len(errors) == 1 and "error:" in errors[0], message
    assert expected.format(out=out) in errors[0]
    assert sorted(tmp_path.rglob("*")) == before


def test_an_unwritable_answers_file_is_refused_before_the_model_loads(tiny_original, tmp_path, no_model_load,
                                                                      unwritable):
    answers = tmp_path / "a.jsonl"
    answers.write_text("")
    unwritable(answers)
    message = refusal(vqa.main, cli_args(tiny_original, DEMO_QUESTION_FILE, answers))
    assert f"--answers-file {answers} cannot be written (read-only or immutable)" in message


def test_an_unwritable_answers_folder_is_refused_before_the_model_loads(tiny_original, tmp_path, no_model_load,
                                                                        unwritable):
    folder = unwritable(a_folder(tmp_path))
    message = refusal(vqa.main, cli_args(tiny_original, DEMO_QUESTION_FILE, folder / "a.jsonl"))
    assert f"cannot write in the folder of --answers-file {folder / 'a.jsonl'}" in message
    assert list(folder.iterdir()) == []


def test_an_answers_path_under_a_file_is_refused(tiny_original, tmp_path, no_model_load):
    taken = an_existing_file(tmp_path)
    message = refusal(vqa.main, cli_args(tiny_original, DEMO_QUESTION_FILE, taken / "a.jsonl"))
    assert f"cannot create the folder of --answers-file {taken / 'a.jsonl'}" in message


def test_an_unwritable_output_folder_is_refused(tmp_path, no_model_load, unwritable):
    from llava.viz import main as viz_main

    folder = unwritable(a_folder(tmp_path))
    message = refusal(viz_main, [*VIZ_ARGV, "--out-dir", str(folder)])
    assert f"--out-dir {folder}: the folder cannot be written in" in message


def test_a_run_that_stops_on_its_first_question_names_no_answers_file(tiny_original, tmp_path):
    """"kept in X" only when X holds answers: a run stopped before its first answer leaves no file."""
    long_question = {"question_id": "long", "text": " ".join(["word"] * 3000)}
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps(long_question) + "\n")
    message = refusal(vqa.main, cli_args(tiny_original, questions, tmp_path / "out" / "a.jsonl"))
    assert message.endswith("no answer was written") and "kept in" not in message
    assert not (tmp_path / "out").exists()


# --- 7. Ctrl-C ---------------------------------------------------------------------------------------

INTERRUPTED = 130


def ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


def interrupted_line(main: Callable[[list[str]], None], argv: list[str], capsys) -> str:
    """Run a CLI in-process that a Ctrl-C stops: exit code 130 and its one `interrupted:` line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == INTERRUPTED
    lines = message_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("interrupted: "), lines
    return lines[0]


def message_lines(stderr: str) -> list[str]:
    """stderr's lines without progress bars (tqdm's "NN%|" lines, redrawn after carriage returns)."""
    return [line for line in stderr.splitlines() if line.strip() and "%|" not in line]


def interrupt_after_answers(monkeypatch, answers: int) -> None:
    """Ctrl-C as answer number `answers + 1` is about to be written."""
    written = []
    real_write_line = question_loop.write_line

    def write_line(handle, record):
        if len(written) == answers:
            raise KeyboardInterrupt
        written.append(record)
        real_write_line(handle, record)

    monkeypatch.setattr(question_loop, "write_line", write_line)


def test_an_interrupted_answering_run_says_what_it_kept_and_resumes(tiny_original, tmp_path, monkeypatch, capsys):
    questions = first_questions(tmp_path, 3)
    answers = tmp_path / "a.jsonl"
    argv = cli_args(tiny_original, questions, answers, max_new_tokens=2)
    interrupt_after_answers(monkeypatch, 1)
    line = interrupted_line(vqa.main, argv, capsys)
    assert line == f"interrupted: 1 answers kept in {answers}; run the same command again to resume"
    assert len(answers.read_text().splitlines()) == 1
    monkeypatch.undo()
    vqa.main(argv)
    assert [json.loads(line)["question_id"] for line in answers.read_text().splitlines()] == question_ids(questions)


def test_a_run_interrupted_before_its_first_answer_leaves_nothing(tiny_original, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(question_loop, "load_pretrained_model", ctrl_c)
    answers = tmp_path / "out" / "a.jsonl"
    line = interrupted_line(vqa.main, cli_args(tiny_original, DEMO_QUESTION_FILE, answers), capsys)
    assert line == "interrupted: no answer was written"
    assert not (tmp_path / "out").exists()


def test_an_interrupted_runner_names_its_answers_folder(tiny_original, tmp_path, monkeypatch, capsys):
    demo_textvqa(tmp_path / "textvqa", 3)
    interrupt_after_answers(monkeypatch, 2)
    line = interrupted_line(runner.main, textvqa_run_argv(tiny_original, tmp_path), capsys)
    folder = tmp_path / "textvqa" / "answers" / f"{tiny_original.name}-full"
    assert line == f"interrupted: 2 answers kept in {folder}; run the same command again to resume"
    assert sorted(path.name for path in folder.iterdir()) == ["1_0.jsonl"]


def scorer_cases() -> list:
    from tests.test_reliability_scorers import CASES

    return [pytest.param(make, id=make.__name__) for make in CASES]


@pytest.mark.parametrize("make", scorer_cases())
def test_an_interrupted_scorer_stops_in_one_line(tmp_path, monkeypatch, capsys, make):
    from tests.test_reliability_scorers import write_jsonl

    case = make(tmp_path)
    argv = case.argv(write_jsonl(tmp_path / "merge.jsonl", case.answers), tmp_path / "scores.json")
    monkeypatch.setattr(json, "loads", ctrl_c)  # while it reads its inputs
    assert interrupted_line(case.main, argv, capsys) == "interrupted: stopped; run the same command again"
    assert not (tmp_path / "scores.json").exists()


def other_cli_cases() -> list:
    """(main, argv, what to interrupt) for the CLIs that are not answering runs or scorers."""
    from llava.bench import compare
    from llava.eval import make_demo_data, report, thresholds
    from llava.eval.scoring import run_summary
    from llava.viz import main as viz_main

    summary = ["--answers-file", str(DEMO_QUESTION_FILE), "--benchmark", "textvqa", "--setting", "64",
               "--model-path", "m", "--out", "{tmp}/summary.json"]
    return [
        pytest.param(report.main, [str(REPO_ROOT / "playground")], "llava.eval.report.find_summaries", id="report"),
        pytest.param(run_summary.main, summary, "llava.eval.scoring.run_summary.build_summary", id="summary"),
        pytest.param(thresholds.main, ["textvqa", "64"], "llava.eval.thresholds.thresholds_for", id="thresholds"),
        pytest.param(make_demo_data.main, ["--out", "{tmp}/demo"], "llava.eval.make_demo_data.make_demo_data",
                     id="make_demo_data"),
        pytest.param(viz_main, [*VIZ_ARGV, "--device", "cpu", "--out-dir", "{tmp}/viz"],
                     "llava.viz.load_pretrained_model", id="viz"),
        pytest.param(calibrate.main, [*CALIBRATE_ARGV, "--device", "cpu", "--conv-mode", "vicuna_v1"], "llava.eval.calibrate.load_model",
                     id="calibrate"),
        pytest.param(compare.main, [*BENCH_ARGV, "--device", "cpu", "--out", "{tmp}/bench"],
                     "llava.bench.compare.load_workload", id="bench"),
        pytest.param(runner.main, [*RUNNER_ARGV, "--device", "cpu"], "llava.eval.run.get_task", id="runner"),
        pytest.param(vqa.main, LOADER_ARGV, "llava.eval.answering.vqa.read_question_lines", id="vqa-reading"),
    ]


@pytest.mark.parametrize("main,argv,target", other_cli_cases())
def test_every_other_cli_stops_on_ctrl_c_in_one_line(tmp_path, monkeypatch, capsys, main, argv, target):
    monkeypatch.setattr(target, ctrl_c)
    line = interrupted_line(main, [arg.format(tmp=tmp_path) for arg in argv], capsys)
    assert line == "interrupted: stopped; run the same command again"


def test_an_interrupted_convert_says_what_it_may_have_left(tiny_original, tmp_path, monkeypatch, capsys):
    from llava.model import convert

    monkeypatch.setattr(convert, "load_pretrained_model", ctrl_c)
    line = interrupted_line(convert.main, ["--model-path", str(tiny_original), "--out", str(tmp_path / "hf")], capsys)
    assert line == f"interrupted: {tmp_path / 'hf'} may hold part of a checkpoint; run the same command again"


def start_interruptible(module: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """A CLI in its own process group, as a terminal runs it, so that a Ctrl-C can reach all its processes."""
    return subprocess.Popen([sys.executable, "-m", module, *argv], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})})


def press_ctrl_c_once_answered(process: subprocess.Popen, answers: list[Path], timeout: float = 240) -> str:
    """Wait for the first finished answer line in any of `answers`, then Ctrl-C the whole process group;
    returns stderr once every process has stopped."""
    deadline = time.monotonic() + timeout
    while not any(path.is_file() and b"\n" in path.read_bytes() for path in answers):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "no answer was written in time"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    return stderr


def many_questions(path: Path, count: int) -> Path:
    """`count` questions about the first three demo images (those `demo_textvqa` copies), so that a run is
    still answering when it is interrupted."""
    lines = DEMO_QUESTION_FILE.read_text().splitlines()[:3]
    path.write_text("".join(lines[index % len(lines)] + "\n" for index in range(count)))
    return path


def test_ctrl_c_stops_a_real_answering_process_in_one_line(tiny_original, tmp_path):
    answers = tmp_path / "a.jsonl"
    process = start_interruptible("llava.eval.model_vqa_loader",
                                  cli_args(tiny_original, many_questions(tmp_path / "q.jsonl", 400), answers,
                                           max_new_tokens=2))
    stderr = press_ctrl_c_once_answered(process, [answers])
    assert process.returncode == INTERRUPTED and "Traceback" not in stderr, stderr
    kept = len(answers.read_text().splitlines())
    assert message_lines(stderr) == [f"interrupted: {kept} answers kept in {answers}; run the same command again to resume"]


# A Ctrl-C that C code swallowed, raising its own error instead (as torch.tensor does when the interrupt
# lands while it probes an object: seen in the runner's per-GPU process while it was still loading).
SWALLOWED_CTRL_C = """
import os, signal
from llava.eval.cli_errors import RunError, main_guard

def run():
    try:
        os.kill(os.getpid(), signal.SIGINT)
        signal.pause()
    except KeyboardInterrupt:
        raise {error}("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None

main_guard(run)
"""


@pytest.mark.parametrize("error", ["RunError", "ValueError"])
@pytest.mark.parametrize("child", [False, True], ids=["cli", "per-gpu-child"])
def test_an_error_raised_by_a_swallowed_ctrl_c_is_reported_as_the_ctrl_c(error, child):
    env = {**os.environ, **({"LLAVA_PARENT_REPORTS_INTERRUPT": "1"} if child else {})}
    done = subprocess.run([sys.executable, "-c", SWALLOWED_CTRL_C.format(error=error)], capture_output=True,
                          text=True, cwd=REPO_ROOT, env=env, timeout=120)
    assert done.returncode == INTERRUPTED, done.stderr
    assert done.stderr.splitlines() == ([] if child else ["interrupted: stopped; run the same command again"])


def test_ctrl_c_stops_the_runner_and_its_gpu_processes_in_one_line(tiny_original, tmp_path):
    """Two per-GPU processes (CPU-only here) and the runner all get the terminal's Ctrl-C; only the runner
    speaks, once, for both."""
    demo_textvqa(tmp_path / "textvqa", 3)
    many_questions(tmp_path / "textvqa" / "llava_textvqa_val_v051_ocr.jsonl", 400)
    folder = tmp_path / "textvqa" / "answers" / f"{tiny_original.name}-full"
    process = start_interruptible("llava.eval.run", [*textvqa_run_argv(tiny_original, tmp_path), "--gpus", "0,1"])
    stderr = press_ctrl_c_once_answered(process, [folder / "2_0.jsonl", folder / "2_1.jsonl"])
    assert process.returncode == INTERRUPTED and "Traceback" not in stderr, stderr
    interrupted = [line for line in stderr.splitlines() if line.startswith(("interrupted:", "error:"))]
    kept = sum(len(path.read_text().splitlines()) for path in folder.glob("2_*.jsonl"))
    assert interrupted == [f"interrupted: {kept} answers kept in {folder}; run the same command again to resume"]


# --- 8. resume and scoring across runs ---------------------------------------------------------------

def with_line_changed(lines: list[str], index: int, **changes) -> list[str]:
    changed = list(lines)
    changed[index] = json.dumps({**json.loads(lines[index]), **changes})
    return changed


ANOTHER_DEMO_IMAGE = "3fc86ee644365862.png"
CHANGED_QUESTION_CASES = [  # (question index, the change, refused?)
    (0, {"text": "What colour is it?"}, True),
    (1, {"image": ANOTHER_DEMO_IMAGE}, True),
    (1, {"text": json.loads(DEMO_QUESTION_FILE.read_text().splitlines()[1])["text"] + " "}, True),
    (2, {"text": "An unanswered question may change."}, False),
]


@pytest.fixture(scope="module")
def two_of_three_answered(tiny_original, tmp_path_factory) -> tuple[list[str], Path]:
    """The first three demo questions and an answers file holding the answers to two of them."""
    folder = tmp_path_factory.mktemp("resume")
    lines = DEMO_QUESTION_FILE.read_text().splitlines()[:3]
    (folder / "q.jsonl").write_text("\n".join(lines[:2]) + "\n")
    vqa.main(cli_args(tiny_original, folder / "q.jsonl", folder / "a.jsonl", max_new_tokens=2))
    return lines, folder / "a.jsonl"


@pytest.mark.parametrize("index,changes,refused", CHANGED_QUESTION_CASES,
                         ids=["answered-text", "answered-image", "answered-text-space", "unanswered-text"])
def test_a_resume_refuses_answered_questions_that_changed(two_of_three_answered, tiny_original, tmp_path,
                                                          monkeypatch, index, changes, refused):
    lines, answers_file = two_of_three_answered
    answers = tmp_path / "a.jsonl"
    answers.write_bytes(answers_file.read_bytes())
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(with_line_changed(lines, index, **changes)) + "\n")
    if not refused:
        vqa.main(cli_args(tiny_original, questions, answers, max_new_tokens=2))
        assert len(answers.read_text().splitlines()) == 3
        return
    monkeypatch.setattr(question_loop, "load_pretrained_model", ctrl_c)  # refused before any load
    message = refusal(vqa.main, cli_args(tiny_original, questions, answers, max_new_tokens=2))
    assert f"{answers} line {index + 1} answers question" in message
    assert "the question file now asks it with another text or image" in message
    assert answers.read_bytes() == answers_file.read_bytes()


def run_of(**settings) -> dict:
    return {"metadata": {"run": {"method": "mustdrop", "temperature": 0.0, **settings}}}


MIXED_RUN_CASES = [  # (the metadata of line 4, what the line says)
    (run_of(method="fastv"), "method='mustdrop' on line 1, method='fastv' on line 4"),
    (run_of(temperature=0.2), "temperature=0.0 on line 1, temperature=0.2 on line 4"),
    ({"metadata": {}}, "line 1 records its run's settings, line 4 does not"),
    ({}, "line 1 records its run's settings, line 4 does not"),
]


@pytest.mark.parametrize("make", scorer_cases())
@pytest.mark.parametrize("fourth,expected", MIXED_RUN_CASES, ids=["method", "temperature", "empty-metadata",
                                                                 "no-metadata"])
def test_a_scorer_refuses_answers_of_different_runs(tmp_path, capsys, make, fourth, expected):
    from tests.test_reliability_scorers import write_jsonl

    case = make(tmp_path)
    answers = [{**answer, **run_of()} for answer in case.answers]
    answers[3] = {**{key: value for key, value in case.answers[3].items() if key != "metadata"}, **fourth}
    result = write_jsonl(tmp_path / "merge.jsonl", answers)
    with pytest.raises(SystemExit) as stopped:
        case.main(case.argv(result, tmp_path / "scores.json"))
    assert stopped.value.code not in (0, None)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"{result} mixes the answers of different runs ({expected})" in errors[0]
    assert not (tmp_path / "scores.json").exists()


@pytest.mark.parametrize("make", scorer_cases())
def test_a_scorer_takes_the_answers_of_one_run(tmp_path, make):
    from tests.test_reliability_scorers import write_jsonl

    case = make(tmp_path)
    answers = [{**answer, **run_of()} for answer in case.answers]
    case.main(case.argv(write_jsonl(tmp_path / "merge.jsonl", answers), tmp_path / "scores.json"))


LABEL_CASES = [  # (scorer case, how an annotation is spoiled, what the line says)
    ("pope", "No", "line 1: label 'No' is not one of 'yes', 'no'"),
    ("pope", "", "line 1: label '' is not one of 'yes', 'no'"),
    ("pope", "yes ", "line 1: label 'yes ' is not one of 'yes', 'no'"),
    ("seed", "E", "question 101669: label 'E' is not one of 'A', 'B', 'C', 'D'"),
    ("seed", "a", "question 101669: label 'a' is not one of"),
    ("science_qa", -1, "answer -1 is not an index of its 2 choices"),
    ("science_qa", True, "answer True is not an index of its 2 choices"),
    ("science_qa", 2, "answer 2 is not an index of its 2 choices"),
]


def spoil_first_label(case_name: str, tmp_path: Path, label) -> None:
    """Give the first annotation of a scorer case's benchmark the label `label`."""
    if case_name == "pope":
        first = next((tmp_path / "coco").glob("coco_pope_*.json"))
        lines = first.read_text().splitlines()
        first.write_text("\n".join([json.dumps({**json.loads(lines[0]), "label": label}), *lines[1:]]) + "\n")
    elif case_name == "seed":
        set_json_field_in_list(tmp_path / "SEED-Bench.json", "questions", "answer", label)
    else:
        problems = json.loads((tmp_path / "problems.json").read_text())
        problems["1"]["answer"] = label
        (tmp_path / "problems.json").write_text(json.dumps(problems))


def set_json_field_in_list(path: Path, list_name: str, field: str, value) -> None:
    record = json.loads(path.read_text())
    record[list_name][0][field] = value
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("case_name,label,expected", LABEL_CASES)
def test_an_annotation_label_outside_the_vocabulary_is_refused(tmp_path, capsys, case_name, label, expected):
    from tests import test_reliability_scorers as scorer_cases_module
    from tests.test_reliability_scorers import write_jsonl

    case = getattr(scorer_cases_module, case_name)(tmp_path)
    spoil_first_label(case_name, tmp_path, label)
    with pytest.raises(SystemExit):
        case.main(case.argv(write_jsonl(tmp_path / "merge.jsonl", case.answers), tmp_path / "scores.json"))
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], errors
    assert not (tmp_path / "scores.json").exists()


# --- 9. readers of our own outputs -------------------------------------------------------------------

STATS = {"avg_vision_tokens": 64.0, "prefill_flops_ratio": 0.2, "prefill_seconds": 0.1, "vision_seconds": 0.05,
         "decode_seconds": 0.2, "new_tokens": 3}
GOOD_ANSWER = {"question_id": "q", "text": "a", "metadata": STATS}
SCORES_CASES = [  # (scores.json content, what the line says after the file's name)
    (b"[60.0]", "is not a scorer's output: expected a JSON object, got list"),
    (b'"60"', "is not a scorer's output: expected a JSON object, got str"),
    (b"{accuracy: 60}", "cannot parse scores file {path}"),
    (b"\xff\xfe{}", "scores file {path}: not UTF-8 text"),
]
ANSWERS_CASES = [  # (the second answers line, what the line says)
    ([1, 2], "line 2: expected a JSON object, got list"),
    ({**GOOD_ANSWER, "metadata": {**STATS, "avg_vision_tokens": "64"}},
     "line 2: metadata 'avg_vision_tokens' must be a finite number, got '64'"),
    ({**GOOD_ANSWER, "metadata": {key: value for key, value in STATS.items() if key != "new_tokens"}},
     "line 2: metadata 'new_tokens' must be a finite number, got None"),
    ({**GOOD_ANSWER, "metadata": {**STATS, "prefill_seconds": float("nan")}},
     "line 2: metadata 'prefill_seconds' must be a finite number, got nan"),
    ({**GOOD_ANSWER, "metadata": {**STATS, "peak_memory_bytes": True}},
     "line 2: metadata 'peak_memory_bytes' must be a finite number, got True"),
]


def summary_argv(tmp_path: Path, answers: Path, scores: Path | None = None) -> list[str]:
    return ["--answers-file", str(answers), "--benchmark", "textvqa", "--setting", "64", "--model-path", "m",
            "--out", str(tmp_path / "summary.json"), *(["--scores-file", str(scores)] if scores else [])]


def answers_with(tmp_path: Path, *records) -> Path:
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.mark.parametrize("content,expected", SCORES_CASES, ids=["list", "string", "not-json", "not-utf8"])
def test_a_summary_refuses_a_scores_file_of_the_wrong_shape(tmp_path, content, expected):
    from llava.eval.scoring import run_summary

    scores = tmp_path / "scores.json"
    scores.write_bytes(content)
    message = refusal(run_summary.main, summary_argv(tmp_path, answers_with(tmp_path, GOOD_ANSWER), scores))
    assert expected.format(path=scores) in message and str(scores) in message
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("second,expected", ANSWERS_CASES, ids=["not-an-object", "text-number", "missing",
                                                                "nan", "boolean"])
def test_a_summary_refuses_answer_statistics_of_the_wrong_shape(tmp_path, second, expected):
    from llava.eval.scoring import run_summary

    answers = answers_with(tmp_path, GOOD_ANSWER, second)
    message = refusal(run_summary.main, summary_argv(tmp_path, answers))
    assert f"answers file {answers}, {expected}" in message
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("make,expected", [
    (lambda path: path.write_bytes(b"\xff{}"), "{path}: not UTF-8 text"),
    (lambda path: path.mkdir(), "cannot read {path}"),
    (lambda path: path.write_text('{"benchmark": ["gqa"]}'), "{path} is not a run summary: 'benchmark' must be a string"),
], ids=["not-utf8", "a-folder", "list-benchmark"])
def test_the_runs_table_refuses_a_summary_of_the_wrong_shape(tmp_path, make, expected):
    from llava.eval import report

    path = tmp_path / "run" / "summary.json"
    path.parent.mkdir()
    make(path)
    assert expected.format(path=path) in refusal(report.main, [str(tmp_path)])
