"""The benchmark scripts under bad input: one `error:` line, a non-zero exit, nothing written or lost.

Most cases stop before any model load. The scripts' choice of Python is tested in a copy of the
repository (its scripts, its llava linked) whose `.venv/bin/python` and PATH `python` are stand-ins
that log their use; the sharding cases run a stand-in Python whose benchmark CLIs fail on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert (tmp_path / "venv-python.log").read_text().strip() == str(repo.resolve() / ".venv" / "bin" / "python")
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
    assert (tmp_path / "python3.log").read_text().strip() == str(tmp_path / "bin" / "python3")
    assert snapshot(elsewhere) == {}


# --- missing benchmark data ------------------------------------------------------------------------


@pytest.mark.parametrize("script,missing", [(script, index) for script, entries in INPUTS.items()
                                            for index in range(len(entries))])
def test_a_missing_input_is_named_before_anything_is_written(tmp_path, script, missing):
    eval_dir = tmp_path / "eval"
    entries = INPUTS[script]
    make_inputs(eval_dir, entries[:missing] + entries[missing + 1:])
    before = snapshot(tmp_path)
    done = run(script, ["64"], {"EVAL_DIR": str(eval_dir), "PYTHON": sys.executable}, cwd=tmp_path)
    named = NAMED_WHEN_MISSING.get(entries[missing], entries[missing].rstrip("/"))
    assert_one_error_line(done, 1, f": {eval_dir / named} (download it as LLaVA's docs/Evaluation.md describes)")
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
    (["100"], {}, 2, "unknown setting '100': choose full, 192, 128 or 64"),
    (["64", "128"], {}, 2, "expected one token setting, got 2"),
    (["64"], {"THR_64": "0.011"}, 2, "THR_64 must be two numbers \"global individual\", got '0.011'"),
    (["128"], {"THR_128": "0.001 high"}, 2, "THR_128 must be two numbers"),
    (["full"], {"MODEL_PATH": "checkpoints/llava-v1.5-13b"}, 1,
     "model checkpoint not found: checkpoints/llava-v1.5-13b"),
    (["full"], {"MODEL_PATH": "./missing-model/"}, 1, "model checkpoint not found: ./missing-model/"),
    (["full"], {"PYTHON": "no-such-python"}, 1, "Python not found: 'no-such-python'"),
], ids=["setting", "two-settings", "one-threshold", "word-threshold", "checkpoints-path", "relative-path", "no-python"])
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


# --- the answering and scoring steps, with a stand-in Python -----------------------------------------

STAND_IN_PYTHON = """#!/bin/sh
# The benchmark CLIs act as $STAND_IN says; anything else (the environment check) runs the real Python.
if [ "$1" = -m ]; then
    module=$2; previous=""
    for arg in "$@"; do
        case "$previous" in
            --answers-file) answers=$arg ;; --scores-file) scores=$arg ;; --out) out=$arg ;; --chunk-idx) chunk=$arg ;;
        esac
        previous=$arg
    done
    case "$module:$STAND_IN" in
        llava.eval.model_vqa_loader:refuses)
            echo "error: unknown method 'nosuch'" >&2; exit 1 ;;
        llava.eval.model_vqa_loader:locks-then-fails)
            : > "$answers"; echo 123 > "$answers.lock"; echo "error: checkpoint not found" >&2; exit 1 ;;
        llava.eval.model_vqa_loader:answers-one-then-fails)
            echo '{"question_id": 1}' >> "$answers"; echo "error: image not found" >&2; exit 1 ;;
        llava.eval.model_vqa_loader:killed)
            kill -9 $$ ;;
        llava.eval.model_vqa_loader:*)
            echo 123 > "$answers.lock"; echo "{\\"question_id\\": $chunk}" >> "$answers"; exit 0 ;;
        llava.eval.eval_textvqa:scorer-fails)
            echo '{"accur' > "$scores"; echo "error: annotation file is not JSON" >&2; exit 1 ;;
        llava.eval.eval_textvqa:*)
            echo '{"accuracy": 50.0}' > "$scores"; exit 0 ;;
        llava.eval.run_summary:*)
            echo '{"fresh": true}' > "$out"; exit 0 ;;
    esac
fi
exec "%s" "$@"
"""


@pytest.fixture
def stand_in(tmp_path) -> dict[str, str]:
    """EVAL_DIR with a TextVQA set and a stand-in PYTHON (set STAND_IN to choose its behaviour)."""
    demo_textvqa(tmp_path / "eval" / "textvqa")
    python = write_executable(tmp_path / "bin" / "python", STAND_IN_PYTHON % sys.executable)
    return {"EVAL_DIR": str(tmp_path / "eval"), "PYTHON": str(python), "MODEL_PATH": "liuhaotian/llava-v1.5-7b"}


ANSWERS = Path("textvqa/answers/llava-v1.5-7b-64")


@pytest.mark.parametrize("behaviour,gpus", [("refuses", ""), ("locks-then-fails", ""), ("locks-then-fails", "0,1")])
def test_a_failure_before_any_answer_passes_the_error_through_and_leaves_no_folder(tmp_path, stand_in, behaviour, gpus):
    before = snapshot(tmp_path / "eval")
    done = run("textvqa.sh", ["64"], {**stand_in, "STAND_IN": behaviour, "CUDA_VISIBLE_DEVICES": gpus}, cwd=tmp_path)
    assert done.returncode == 1
    assert "re-run" not in done.stderr and "Traceback" not in done.stderr
    assert set(done.stderr.strip().splitlines()) == {done.stderr.strip().splitlines()[0]}  # the CLI's line, per shard
    assert snapshot(tmp_path / "eval") == before  # the answers folder, its empty files and locks are gone


def test_a_killed_cli_is_reported(tmp_path, stand_in):
    before = snapshot(tmp_path / "eval")
    done = run("textvqa.sh", ["64"], {**stand_in, "STAND_IN": "killed"}, cwd=tmp_path)
    assert_one_error_line(done, 137, "llava.eval.model_vqa_loader was killed by signal 9 before answering any question")
    assert snapshot(tmp_path / "eval") == before


def test_a_failure_after_answers_were_written_says_how_to_resume(tmp_path, stand_in):
    done = run("textvqa.sh", ["64"], {**stand_in, "STAND_IN": "answers-one-then-fails"}, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: image not found",
        f"error: stopped with 1 answers in {tmp_path / 'eval' / ANSWERS}; "
        "fix the cause and re-run the same command to resume",
    ]
    assert (tmp_path / "eval" / ANSWERS / "1_0.jsonl").read_text() == '{"question_id": 1}\n'
    assert not (tmp_path / "eval" / ANSWERS / "merge.jsonl").exists()


def test_the_merge_takes_the_chunks_in_order_and_not_their_locks(tmp_path, stand_in):
    done = run("textvqa.sh", ["64"], {**stand_in, "STAND_IN": "answers", "CUDA_VISIBLE_DEVICES": "3,5"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    answers = tmp_path / "eval" / ANSWERS
    assert (answers / "merge.jsonl").read_text() == '{"question_id": 0}\n{"question_id": 1}\n'
    assert json.loads((answers / "scores.json").read_text()) == {"accuracy": 50.0}
    assert json.loads((answers / "summary.json").read_text()) == {"fresh": True}
    assert sorted(path.name for path in answers.iterdir()) == [
        "2_0.jsonl", "2_0.jsonl.lock", "2_1.jsonl", "2_1.jsonl.lock", "merge.jsonl", "scores.json", "summary.json"]


def test_a_failing_scorer_leaves_the_answers_and_no_summary_claiming_success(tmp_path, stand_in):
    answers = tmp_path / "eval" / ANSWERS
    answers.mkdir(parents=True)  # an earlier run, scored, whose answers were since redone
    (answers / "merge.jsonl").write_text('{"question_id": "old"}\n')
    (answers / "scores.json").write_text('{"accuracy": 99.0}')
    (answers / "summary.json").write_text('{"stale": true}')
    done = run("textvqa.sh", ["64"], {**stand_in, "STAND_IN": "scorer-fails"}, cwd=tmp_path)
    assert_one_error_line(done, 1, "annotation file is not JSON")
    assert (answers / "merge.jsonl").read_text() == '{"question_id": 0}\n'
    assert sorted(path.name for path in answers.iterdir()) == ["1_0.jsonl", "1_0.jsonl.lock", "merge.jsonl"]


def test_a_failing_scorer_keeps_the_summary_of_the_same_answers(tmp_path, stand_in):
    answers = tmp_path / "eval" / ANSWERS
    answers.mkdir(parents=True)  # an earlier scored run; the stand-in CLI writes the same answer again
    (answers / "1_0.jsonl").write_text("")
    (answers / "merge.jsonl").write_text('{"question_id": 0}\n')
    (answers / "scores.json").write_text('{"accuracy": 50.0}')
    (answers / "summary.json").write_text('{"scored": true}')
    done = run("textvqa.sh", ["64"], {**stand_in, "STAND_IN": "scorer-fails"}, cwd=tmp_path)
    assert_one_error_line(done, 1, "annotation file is not JSON")
    assert (answers / "merge.jsonl").read_text() == '{"question_id": 0}\n'
    assert (answers / "scores.json").read_text() == '{"accuracy": 50.0}'
    assert (answers / "summary.json").read_text() == '{"scored": true}'
    assert not list(answers.glob(".*.pending"))


# --- real runs on the tiny checkpoint ------------------------------------------------------------------


def test_the_python_cli_refusing_its_flags_leaves_nothing_behind(tmp_path):
    """The real CLI refuses an unknown method before the model load: its line only, no folder, no resume hint."""
    demo_textvqa(tmp_path / "textvqa")
    before = snapshot(tmp_path)
    done = run("textvqa.sh", ["64"], {"EVAL_DIR": str(tmp_path), "PYTHON": sys.executable, "METHOD": "nosuch"},
               cwd=tmp_path)
    assert_one_error_line(done, 1, "nosuch")
    assert snapshot(tmp_path) == before


def test_a_run_stopped_after_some_answers_says_how_to_resume(tiny_original, tmp_path):
    images = demo_textvqa(tmp_path / "textvqa")
    (tmp_path / "textvqa" / "train_images" / images[1]).unlink()
    done = run("textvqa.sh", ["64"], {"EVAL_DIR": str(tmp_path), "PYTHON": sys.executable,
                                      "MODEL_PATH": str(tiny_original),
                                      "EXTRA_ARGS": "--max_new_tokens 2 --device cpu"}, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    answers = tmp_path / "textvqa" / "answers" / f"{tiny_original.name}-64"
    assert images[1] in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: stopped with 1 answers in {answers}; fix the cause and re-run the same command to resume")
    assert len((answers / "1_0.jsonl").read_text().splitlines()) == 1
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
