"""The benchmark scripts under bad input: one `error:` line, a non-zero exit, nothing written or lost.

Most cases stop before any model load. The scripts' choice of Python is tested in a copy of the
repository (its scripts, its llava linked) whose `.venv/bin/python` and PATH `python` are stand-ins
that log their use; the runner's failure paths run on the tiny checkpoint, in one process and on two
(CPU-only) "GPUs".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import llava.eval.run as runner
from tests.conftest import DEMO_DIR, REPO_ROOT

SCRIPT_TIMEOUT_S = 300
END_TO_END_QUESTIONS = 3
# Variables the scripts read: unset for every case unless the case sets them.
SCRIPT_VARIABLES = ("PYTHON", "PYTHONPATH", "MODEL_PATH", "EVAL_DIR", "QUESTION_FILE", "IMAGE_FOLDER",
                    "ANNOTATION_FILE", "ANNOTATION_DIR", "GT_DIR", "BASE_DIR", "GQA_QUESTIONS", "SPLIT", "METHOD",
                    "THR_192", "THR_128", "THR_64", "EXTRA_ARGS", "CONV_MODE", "UPLOAD_FILE", "UPLOAD_DIR")
# Every script's inputs in LLaVA's layout under EVAL_DIR, in the order the script checks them
# (a trailing "/" marks a folder), and what its error line names when that input is missing.
INPUTS = {
    "textvqa.sh": ["textvqa/llava_textvqa_val_v051_ocr.jsonl", "textvqa/train_images/",
                   "textvqa/TextVQA_0.5.1_val.json"],
    "vizwiz.sh": ["vizwiz/llava_test.jsonl", "vizwiz/test/"],
    "gqa.sh": ["gqa/llava_gqa_testdev_balanced.jsonl", "gqa/data/images/", "gqa/data/testdev_balanced_questions.json"],
    "pope.sh": ["pope/llava_pope_test.jsonl", "pope/val2014/", "pope/coco/coco_pope_random.json"],
    "mme.sh": ["MME/llava_mme.jsonl", "MME/MME_Benchmark_release_version/"],
    "sqa.sh": ["scienceqa/llava_test_CQM-A.json", "scienceqa/images/test/", "scienceqa/problems.json",
               "scienceqa/pid_splits.json"],
    "mmbench.sh": ["mmbench/mmbench_dev_20230712.tsv"],
    "seed.sh": ["seed_bench/llava-seed-bench.jsonl", "seed_bench/SEED-Bench-image/", "seed_bench/SEED-Bench.json"],
    "vqav2.sh": ["vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", "vqav2/test2015/",
                 "vqav2/llava_vqav2_mscoco_test2015.jsonl"],
    "mmvet.sh": ["mm-vet/llava-mm-vet.jsonl", "mm-vet/images/"],
}
NAMED_WHEN_MISSING = {"pope/coco/coco_pope_random.json": "pope/coco"}  # the folder must hold coco_pope_*.json


def write_executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def logging_python(path: Path, log: Path) -> Path:
    """A Python that notes its use in `log` and runs the test's own Python."""
    return write_executable(path, f'#!/bin/sh\necho "$0" >> "{log}"\nexec "{sys.executable}" "$@"\n')


def system_python_without_project(bin_dir: Path, log: Path) -> Path:
    """`python` and `python3` on PATH that lack the project's packages, as on a fresh machine."""
    for name in ("python", "python3"):
        write_executable(bin_dir / name, f'#!/bin/sh\necho "$0" >> "{log}"\n'
                                         "echo \"ModuleNotFoundError: No module named 'shortuuid'\" >&2\nexit 1\n")
    return bin_dir


def copy_of_repo(root: Path, with_venv: bool) -> Path:
    """The scripts and (linked) llava of this repository at `root`, with a logging .venv if asked."""
    shutil.copytree(REPO_ROOT / "scripts", root / "scripts")
    (root / "llava").symlink_to(REPO_ROOT / "llava", target_is_directory=True)
    if with_venv:
        logging_python(root / ".venv" / "bin" / "python", root.parent / "venv-python.log")
    return root


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under root, symbolic links not followed."""
    if not root.exists():
        return {}
    entries: dict[str, bytes | None] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            entries[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in files:
            path = Path(folder, name)
            entries[os.path.relpath(path, root)] = None if path.is_symlink() else path.read_bytes()
    return entries


def run(script: str, args: list[str], env: dict[str, str], cwd: Path, scripts_root: Path = REPO_ROOT,
        path_prefix: Path | None = None) -> subprocess.CompletedProcess:
    base = {key: value for key, value in os.environ.items() if key not in SCRIPT_VARIABLES}
    if path_prefix is not None:
        base["PATH"] = f"{path_prefix}{os.pathsep}{base['PATH']}"
    return subprocess.run(["bash", str(scripts_root / "scripts" / "v1_5" / "eval" / script), *args], cwd=cwd,
                          env={**base, "CUDA_VISIBLE_DEVICES": "", **env}, capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_S)


def assert_one_error_line(done: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """The run failed with `code`, printing one `error:` line holding every fragment, no traceback, no resume hint."""
    assert done.returncode == code, done.stderr
    output = done.stdout + done.stderr
    assert "Traceback" not in output and "re-run" not in output, output
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def make_inputs(eval_dir: Path, entries: list[str]) -> None:
    for entry in entries:
        path = eval_dir / entry
        if entry.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}\n")


def demo_textvqa(folder: Path, questions: int = END_TO_END_QUESTIONS) -> list[str]:
    """The first demo questions in LLaVA's TextVQA layout under `folder`; returns their image names."""
    lines = (DEMO_DIR / "llava_textvqa_demo.jsonl").read_text().splitlines()[:questions]
    images = [json.loads(line)["image"] for line in lines]
    (folder / "train_images").mkdir(parents=True)
    for image in images:
        shutil.copy(DEMO_DIR / "images" / image, folder / "train_images" / image)
    (folder / "llava_textvqa_val_v051_ocr.jsonl").write_text("\n".join(lines) + "\n")
    annotations = json.loads((DEMO_DIR / "TextVQA_demo_annotations.json").read_text())
    ids = {Path(image).stem for image in images}
    annotations["data"] = [entry for entry in annotations["data"] if entry["image_id"] in ids]
    (folder / "TextVQA_0.5.1_val.json").write_text(json.dumps(annotations))
    return images


# --- the issue: the README's first command, then a benchmark script --------------------------------


def test_after_demo_setup_a_script_uses_the_venv_and_names_the_missing_question_file(tmp_path):
    repo = copy_of_repo(tmp_path / "repo", with_venv=True)
    fake_bin = system_python_without_project(tmp_path / "bin", tmp_path / "system-python.log")
    before = snapshot(repo)
    done = run("textvqa.sh", ["64"], {}, cwd=repo, scripts_root=repo, path_prefix=fake_bin)
    assert_one_error_line(done, 1, "TextVQA question file not found: "
                          "playground/data/eval/textvqa/llava_textvqa_val_v051_ocr.jsonl", "docs/Evaluation.md")
    venv_python = str(repo.resolve() / ".venv" / "bin" / "python")
    assert set((tmp_path / "venv-python.log").read_text().split()) == {venv_python}  # the check, then the runner
    assert not (tmp_path / "system-python.log").exists()
    assert snapshot(repo) == before  # no answers folder, nothing else


def test_without_venv_the_scripts_use_python3_and_say_what_it_lacks(tmp_path):
    repo = copy_of_repo(tmp_path / "repo", with_venv=False)
    fake_bin = system_python_without_project(tmp_path / "bin", tmp_path / "system-python.log")
    before = snapshot(repo)
    done = run("textvqa.sh", ["64"], {}, cwd=repo, scripts_root=repo, path_prefix=fake_bin)
    assert_one_error_line(done, 1, "python3 is not a Python 3 with the project's packages", "shortuuid",
                          "bash scripts/setup.sh")
    assert (tmp_path / "system-python.log").read_text().strip() == str(fake_bin / "python3")
    assert snapshot(repo) == before


def test_without_venv_a_python3_with_the_project_runs_from_any_directory(tmp_path):
    repo = copy_of_repo(tmp_path / "repo", with_venv=False)
    logging_python(tmp_path / "bin" / "python3", tmp_path / "python3.log")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run("textvqa.sh", [], {}, cwd=elsewhere, scripts_root=repo, path_prefix=tmp_path / "bin")
    # the default data folder is the repository's, whatever the working directory
    expected = repo.resolve() / "playground" / "data" / "eval" / "textvqa" / "llava_textvqa_val_v051_ocr.jsonl"
    assert_one_error_line(done, 1, f"not found: {expected}")
    assert set((tmp_path / "python3.log").read_text().split()) == {str(tmp_path / "bin" / "python3")}
    assert snapshot(elsewhere) == {}


# --- missing benchmark data ------------------------------------------------------------------------


TASK_OF_SCRIPT = {"sqa.sh": "sqa", "seed.sh": "seed", "mmvet.sh": "mmvet"}  # else the script's own name


def missing_input_case(tmp_path: Path, script: str, missing: int) -> tuple[Path, str]:
    """Every input of `script` but one in LLaVA's layout; the eval folder and the path the error must name."""
    eval_dir = tmp_path / "eval"
    entries = INPUTS[script]
    make_inputs(eval_dir, entries[:missing] + entries[missing + 1:])
    named = NAMED_WHEN_MISSING.get(entries[missing], entries[missing].rstrip("/"))
    return eval_dir, f": {eval_dir / named} (download it as LLaVA's docs/Evaluation.md describes)"


@pytest.mark.parametrize("script,missing", [(script, index) for script, entries in INPUTS.items()
                                            for index in range(len(entries))])
def test_a_missing_input_is_named_before_anything_is_written(tmp_path, capsys, script, missing):
    """What each script's task checks (the runner, in this process; the next test runs scripts)."""
    eval_dir, message = missing_input_case(tmp_path, script, missing)
    before = snapshot(tmp_path)
    task = TASK_OF_SCRIPT.get(script, script.removesuffix(".sh"))
    with pytest.raises(SystemExit) as stop:
        runner.main(["--tasks", task, "--model-path", "m", "--eval-dir", str(eval_dir), "--preset", "64"])
    assert str(stop.value.code).startswith("error: ") and message in str(stop.value.code)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("script", ["textvqa.sh", "pope.sh", "seed.sh"])
def test_a_scripts_missing_input_is_named_before_anything_is_written(tmp_path, script):
    eval_dir, message = missing_input_case(tmp_path, script, len(INPUTS[script]) - 1)
    before = snapshot(tmp_path)
    done = run(script, ["64"], {"EVAL_DIR": str(eval_dir), "PYTHON": sys.executable}, cwd=tmp_path)
    assert_one_error_line(done, 1, message)
    assert snapshot(tmp_path) == before


def test_an_input_of_the_wrong_kind_is_named(tmp_path):
    (tmp_path / "questions").mkdir()
    before = snapshot(tmp_path)
    done = run("mmbench.sh", [], {"EVAL_DIR": str(tmp_path), "PYTHON": sys.executable,
                                  "QUESTION_FILE": str(tmp_path / "questions")}, cwd=tmp_path)
    assert_one_error_line(done, 1, f"MMBench question file is not a readable file: {tmp_path / 'questions'}")
    assert snapshot(tmp_path) == before


# --- bad settings and environment --------------------------------------------------------------------


@pytest.mark.parametrize("args,env,code,fragment", [
    (["100"], {}, 2, "unknown setting '100': choose full, 192, 128 or 64 (LLaVA-1.5), 640, 320 or 160 (LLaVA-NeXT)"),
    (["320"], {}, 2, "no published MustDrop thresholds for LLaVA-NeXT's 320 setting"),
    (["64", "128"], {}, 2, "expected one token setting, got 2"),
    (["64"], {"THR_64": "0.011"}, 2, "THR_64 must be two numbers \"global individual\", got '0.011'"),
    (["128"], {"THR_128": "0.001 high"}, 2, "THR_128 must be two numbers"),
    (["full"], {"MODEL_PATH": "checkpoints/llava-v1.5-13b"}, 1,
     "model checkpoint not found: checkpoints/llava-v1.5-13b"),
    (["full"], {"MODEL_PATH": "./missing-model/"}, 1, "model checkpoint not found: ./missing-model/"),
    (["full"], {"PYTHON": "no-such-python"}, 1, "Python not found: 'no-such-python'"),
], ids=["setting", "next-without-thresholds", "two-settings", "one-threshold", "word-threshold", "checkpoints-path", "relative-path", "no-python"])
def test_bad_settings_stop_before_anything_is_written(tmp_path, args, env, code, fragment):
    demo_textvqa(tmp_path / "textvqa")
    before = snapshot(tmp_path)
    done = run("textvqa.sh", args, {"EVAL_DIR": str(tmp_path), "PYTHON": sys.executable, **env}, cwd=tmp_path)
    assert_one_error_line(done, code, fragment)
    assert snapshot(tmp_path) == before


def test_a_python_without_the_projects_packages_is_refused(tmp_path):
    demo_textvqa(tmp_path / "textvqa")
    # -S: no site-packages, like a system Python; llava itself is still found (the scripts put it on the path)
    bare = write_executable(tmp_path / "bin" / "bare-python", f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    before = snapshot(tmp_path)
    done = run("textvqa.sh", ["64"], {"EVAL_DIR": str(tmp_path), "PYTHON": str(bare)}, cwd=tmp_path)
    assert_one_error_line(done, 1, f"{bare} cannot import torch", "shortuuid", "bash scripts/setup.sh")
    assert snapshot(tmp_path) == before


def test_a_python_importing_another_llava_is_refused(tmp_path):
    """Run from a folder holding another llava package (an original LLaVA checkout): that one would win."""
    demo_textvqa(tmp_path / "textvqa")
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "__init__.py").write_text("")
    before = snapshot(tmp_path)
    done = run("textvqa.sh", ["64"], {"EVAL_DIR": str(tmp_path), "PYTHON": sys.executable}, cwd=tmp_path)
    assert_one_error_line(done, 1, f"imports llava from {tmp_path.resolve() / 'llava'}, not from",
                          "run the script from the repository's root")
    assert snapshot(tmp_path) == before


# --- the runner's answering and scoring steps ------------------------------------------------------


@pytest.mark.parametrize("gpus", ["", "0,1"], ids=["one-process", "two-gpus"])
def test_a_failure_before_any_answer_passes_the_error_through_and_leaves_no_folder(tmp_path, gpus):
    """A folder that is no checkpoint fails in every answering process before its first answer."""
    demo_textvqa(tmp_path / "eval" / "textvqa")
    (tmp_path / "not-a-checkpoint").mkdir()
    before = snapshot(tmp_path / "eval")
    done = run("textvqa.sh", ["64"], {"EVAL_DIR": str(tmp_path / "eval"), "PYTHON": sys.executable,
                                      "MODEL_PATH": str(tmp_path / "not-a-checkpoint"), "CUDA_VISIBLE_DEVICES": gpus},
               cwd=tmp_path)
    assert done.returncode == 1
    assert "re-run" not in done.stderr and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == (2 if gpus else 1) and len(set(lines)) == 1, done.stderr  # one line per process
    assert lines[0].startswith("error: ") and "not-a-checkpoint" in lines[0]
    assert snapshot(tmp_path / "eval") == before  # no answers folder, no empty chunk file, no lock


def test_a_killed_gpu_process_is_reported(tmp_path, monkeypatch, capsys):
    demo_textvqa(tmp_path / "textvqa")
    monkeypatch.setattr(runner, "run_on_gpus", lambda command, gpus: [0, -9])
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as stop:
        runner.main(["--tasks", "textvqa", "--model-path", "m", "--eval-dir", str(tmp_path), "--gpus", "3,5"])
    assert stop.value.code == "error: the process on GPU 5 was killed by signal 9 before answering any question"
    assert snapshot(tmp_path) == before


def test_gpu_processes_run_as_ranks_of_one_run_each_on_its_gpu():
    """Each process reports WORLD_SIZE, RANK, LOCAL_RANK and its one visible GPU through its exit code."""
    env = "os.environ"
    script = (f"import os, sys; sys.exit(int({env}['WORLD_SIZE']) * 100 + int({env}['RANK']) * 10 "
              f"+ int({env}['LOCAL_RANK']) * 50 + int({env}['CUDA_VISIBLE_DEVICES']))")
    codes = runner.run_on_gpus([sys.executable, "-c", script], ["4", "7"])
    assert codes == [204, 217]  # world 2, ranks 0 and 1, local rank 0, GPUs 4 and 7
    assert runner.worker_argv(["--gpus", "4,7", "--tasks=a,b", "--budget", "64"], "a") == ["--budget", "64", "--tasks", "a"]


def test_a_failing_scorer_never_leaves_scores_of_other_answers(tiny_original, tmp_path, capsys):
    """Scores and summary always describe merge.jsonl as it is: a scorer that fails keeps those of the
    same answers, and removes those of answers since redone."""
    demo_textvqa(tmp_path / "textvqa")
    argv = ["--tasks", "textvqa", "--model-path", str(tiny_original), "--eval-dir", str(tmp_path),
            "--max_new_tokens", "2", "--device", "cpu"]
    runner.main(argv)
    answers = tmp_path / "textvqa" / "answers" / f"{tiny_original.name}-full"
    scored = {name: (answers / name).read_bytes() for name in ("merge.jsonl", "scores.json", "summary.json")}
    (tmp_path / "textvqa" / "TextVQA_0.5.1_val.json").write_text('{"accur')  # the scorer now fails
    capsys.readouterr()
    with pytest.raises(SystemExit):
        runner.main(argv)  # nothing to answer; the same answers, which keep their scores
    assert "annotation file" in capsys.readouterr().err
    assert {name: (answers / name).read_bytes() for name in scored} == scored
    (answers / "merge.jsonl").write_text('{"question_id": "an earlier run"}\n')  # scored answers, since redone
    with pytest.raises(SystemExit) as stop:
        runner.main(argv)
    assert "did not score" in str(stop.value.code) and "the answers are kept" in str(stop.value.code)
    assert (answers / "merge.jsonl").read_bytes() == scored["merge.jsonl"]
    assert sorted(path.name for path in answers.iterdir()) == ["1_0.jsonl", "merge.jsonl"]


# --- real runs on the tiny checkpoint ------------------------------------------------------------------


def test_the_python_cli_refusing_its_flags_leaves_nothing_behind(tmp_path):
    """The real CLI refuses an unknown method before the model load: its line only, no folder, no resume hint."""
    demo_textvqa(tmp_path / "textvqa")
    before = snapshot(tmp_path)
    done = run("textvqa.sh", ["64"], {"EVAL_DIR": str(tmp_path), "PYTHON": sys.executable, "METHOD": "nosuch"},
               cwd=tmp_path)
    assert_one_error_line(done, 1, "nosuch")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("gpus,chunk_lines", [("", {"1_0.jsonl": 1}), ("0,1", {"2_0.jsonl": 1, "2_1.jsonl": 1})],
                         ids=["one-process", "two-gpus"])
def test_a_run_stopped_after_some_answers_says_how_to_resume(tiny_original, tmp_path, gpus, chunk_lines):
    images = demo_textvqa(tmp_path / "textvqa")
    broken = tmp_path / "textvqa" / "train_images" / images[1]  # in the first chunk of two, after one answer
    broken.write_bytes(broken.read_bytes()[:100])  # its header reads (checked before the load), its pixels do not
    done = run("textvqa.sh", ["64"], {"EVAL_DIR": str(tmp_path), "PYTHON": sys.executable,
                                      "MODEL_PATH": str(tiny_original), "CUDA_VISIBLE_DEVICES": gpus,
                                      "EXTRA_ARGS": "--max_new_tokens 2 --device cpu"}, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    answers = tmp_path / "textvqa" / "answers" / f"{tiny_original.name}-64"
    assert images[1] in done.stderr
    answered = sum(chunk_lines.values())
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: stopped with {answered} answers in {answers}; fix the cause and re-run the same command to resume")
    assert {name: len((answers / name).read_text().splitlines()) for name in chunk_lines} == chunk_lines
    assert not (answers / "merge.jsonl").exists()


def test_demo_like_setup_runs_textvqa_end_to_end_from_anywhere(tiny_original, tmp_path):
    """.venv made, the system python lacking the project, LLaVA's layout, run from another directory."""
    repo = copy_of_repo(tmp_path / "repo", with_venv=True)
    fake_bin = system_python_without_project(tmp_path / "bin", tmp_path / "system-python.log")
    data = repo / "playground" / "data" / "eval" / "textvqa"
    demo_textvqa(data)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"MODEL_PATH": str(tiny_original), "EXTRA_ARGS": "--max_new_tokens 2 --device cpu"}
    done = run("textvqa.sh", ["64"], env, cwd=elsewhere, scripts_root=repo, path_prefix=fake_bin)
    assert done.returncode == 0, done.stderr
    assert f"Samples: {END_TO_END_QUESTIONS}" in done.stdout and "Accuracy:" in done.stdout
    answers = data / "answers" / f"{tiny_original.name}-64"
    assert len((answers / "merge.jsonl").read_text().splitlines()) == END_TO_END_QUESTIONS
    summary = json.loads((answers / "summary.json").read_text())
    assert summary["questions"] == END_TO_END_QUESTIONS
    assert summary["scores"] == json.loads((answers / "scores.json").read_text())
    assert not list(answers.glob(".*.pending"))
    assert not (tmp_path / "system-python.log").exists() and snapshot(elsewhere) == {}
