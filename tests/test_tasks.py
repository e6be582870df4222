"""Benchmarks as registered tasks: the registry, the runner end to end on the tiny checkpoint, MMBench-CN's
prompt rules, and LLaVA-Bench's review step and scores (computed by hand from a hand-written review file)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from llava.eval.run import main as run_main
from llava.eval.summarize_review import main as summarize_main
from llava.eval.scoring.llavabench import summarize_review
from llava.eval.tasks import TASKS, RunPaths, Task, discover_tasks, get_task, register_task
from tests.conftest import DEMO_DIR, run_benchmark_script
from tests.conftest import sample_rows, write_tsv

EXPECTED_TASKS = {"textvqa", "vizwiz", "gqa", "pope", "mme", "sqa", "mmbench", "mmbench_cn", "seed", "vqav2",
                  "mmvet", "llavabench"}
DEMO_QUESTIONS = 3
CN_INSTRUCTION = "请直接回答选项字母。"


def test_every_benchmark_is_a_registered_task():
    assert set(discover_tasks()) == EXPECTED_TASKS
    assert get_task("mmbench_cn").folder == "mmbench_cn"
    with pytest.raises(ValueError, match="unknown task 'nope'; valid tasks: gqa, llavabench"):
        get_task("nope")


def test_a_second_task_with_a_taken_name_is_refused():
    textvqa = get_task("textvqa")
    with pytest.raises(ValueError, match="task 'textvqa' is already registered"):
        register_task(Task(name="textvqa", folder="x", answer_cli="llava.eval.answering.vqa", inputs=(),
                           answer_flags=(), scorer="llava.eval.scoring.textvqa", score_flags=()))
    assert TASKS["textvqa"] is textvqa


def demo_textvqa(eval_dir: Path) -> Path:
    """The first demo questions in TextVQA's layout under `eval_dir`, with their annotations only."""
    folder = eval_dir / "textvqa"
    folder.mkdir(parents=True)
    lines = (DEMO_DIR / "llava_textvqa_demo.jsonl").read_text().splitlines()[:DEMO_QUESTIONS]
    (folder / "llava_textvqa_val_v051_ocr.jsonl").write_text("\n".join(lines) + "\n")
    asked = {json.loads(line)["question_id"] for line in lines}
    annotations = json.loads((DEMO_DIR / "TextVQA_demo_annotations.json").read_text())
    annotations["data"] = [entry for entry in annotations["data"] if entry["image_id"] in asked]
    (folder / "TextVQA_0.5.1_val.json").write_text(json.dumps(annotations))
    (folder / "train_images").symlink_to(DEMO_DIR / "images")
    return folder


def test_runner_answers_scores_and_summarises_textvqa(tiny_original, tmp_path, capsys):
    folder = demo_textvqa(tmp_path)
    argv = ["--tasks", "textvqa", "--model-path", str(tiny_original), "--eval-dir", str(tmp_path),
            "--method", "fastv", "--budget", "64", "--max_new_tokens", "2", "--device", "cpu"]
    run_main(argv)
    answer_dir = folder / "answers" / f"{tiny_original.name}-fastv-64"
    answers = [json.loads(line) for line in (answer_dir / "merge.jsonl").read_text().splitlines()]
    assert len(answers) == DEMO_QUESTIONS and (answer_dir / "1_0.jsonl").read_bytes() == (answer_dir / "merge.jsonl").read_bytes()
    assert answers[0]["metadata"]["run"]["temperature"] == 0 and answers[0]["metadata"]["run"]["conv_mode"] == "vicuna_v1"
    scores = json.loads((answer_dir / "scores.json").read_text())
    assert scores["samples"] == DEMO_QUESTIONS and 0 <= scores["accuracy"] <= 100
    summary = json.loads((answer_dir / "summary.json").read_text())
    assert (summary["benchmark"], summary["method"], summary["setting"]) == ("textvqa", "fastv", "64")
    assert summary["scores"] == scores and summary["questions"] == DEMO_QUESTIONS
    assert "Accuracy:" in capsys.readouterr().out
    run_main(argv)  # a second run resumes: nothing left to answer, same answers, scored again
    assert f"all {DEMO_QUESTIONS} questions already answered" in capsys.readouterr().out
    assert (answer_dir / "summary.json").is_file()


@pytest.mark.parametrize("method, family", [("prumerge", "encoder"), ("random", "baseline"), ("pool", "baseline")])
def test_runner_runs_the_encoder_and_baseline_methods(tiny_original, tmp_path, method, family):
    """The task runner with each method the scripts tests do not run (tome runs through gqa.sh in
    tests/test_scripts_gqa.py, prumerge_plus through textvqa.sh in tests/test_scripts.py): budget 64
    reaches 64 tokens (pooling: 8 x 8)."""
    folder = demo_textvqa(tmp_path)
    run_main(["--tasks", "textvqa", "--model-path", str(tiny_original), "--eval-dir", str(tmp_path),
              "--method", method, "--budget", "64", "--max_new_tokens", "1", "--device", "cpu"])
    summary = json.loads((folder / "answers" / f"{tiny_original.name}-{method}-64" / "summary.json").read_text())
    assert (summary["method"], summary["family"], summary["questions"]) == (method, family, DEMO_QUESTIONS)
    assert summary["mean_vision_tokens"] == 64


def test_runner_under_torchrun_scores_once_every_shard_is_done(tiny_original, tmp_path, monkeypatch, capsys):
    folder = demo_textvqa(tmp_path)
    argv = ["--tasks", "textvqa", "--model-path", str(tiny_original), "--eval-dir", str(tmp_path),
            "--max_new_tokens", "2", "--device", "cpu"]
    answer_dir = folder / "answers" / f"{tiny_original.name}-full"
    for rank in (1, 0):  # as two torchrun processes, the second finishing last
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        run_main(argv)
        assert (answer_dir / "summary.json").is_file() == (rank == 0)
    assert "this shard is done" in capsys.readouterr().out
    assert len((answer_dir / "merge.jsonl").read_text().splitlines()) == DEMO_QUESTIONS
    assert json.loads((answer_dir / "scores.json").read_text())["samples"] == DEMO_QUESTIONS


def test_runner_names_missing_data_before_loading_anything(tmp_path):
    demo_textvqa(tmp_path)
    with pytest.raises(SystemExit) as stop:
        run_main(["--tasks", "textvqa,mmbench_cn", "--model-path", str(tmp_path / "no-model"),
                  "--eval-dir", str(tmp_path)])
    assert stop.value.code == (f"error: MMBench-CN question file not found: {tmp_path}/mmbench_cn/"
                               "mmbench_dev_cn_20231003.tsv (download it as LLaVA's docs/Evaluation.md describes)")
    assert not (tmp_path / "textvqa" / "answers").exists()


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "textvqa", "--model-path", "m", "--sparse"], "name this run's setting with --setting"),
    (["--tasks", "textvqa", "--model-path", "m", "--answers-file", "a.jsonl"], "--answers-file: the runner names"),
    (["--tasks", "textvqa"], "--model-path is required"),
])
def test_runner_refuses_flags_it_cannot_honour(tmp_path, argv, message):
    demo_textvqa(tmp_path)
    with pytest.raises(SystemExit) as stop:
        run_main([*argv, "--eval-dir", str(tmp_path)])
    assert message in str(stop.value.code)


def test_mmbench_cn_asks_with_llavas_chinese_prompt_rules(tmp_path):
    rows = sample_rows()
    rows[0].update(question="标志是什么颜色？", hint="路边的一个标志。", A="红色", B="蓝色", C="绿色")
    folder = tmp_path / "mmbench_cn"
    folder.mkdir()
    write_tsv(folder / "mmbench_dev_cn_20231003.tsv", rows)
    task = get_task("mmbench_cn")
    values = task.resolve(tmp_path, RunPaths(folder / "answers" / "model-full", "model-full"))
    args = task.answer_args(values, tmp_path / "answers.jsonl", "model")
    questions = task.questions(args)
    assert questions[0].text == f"路边的一个标志。\n标志是什么颜色？\nA. 红色\nB. 蓝色\nC. 绿色\n{CN_INSTRUCTION}"
    assert questions[0].record["prompt"] == "路边的一个标志。\n标志是什么颜色？\nA. 红色\nB. 蓝色\nC. 绿色"
    assert all(question.text.endswith(f"\n{CN_INSTRUCTION}") for question in questions)
    assert len(questions) == len(rows)  # round 0 only, as LLaVA's script asks
    assert args.lang == "cn" and "lang" in task.identity_args()  # a resumed run cannot switch language


# A hand-written review file in LLaVA's format; expected numbers computed by hand below.
REVIEWS = [
    {"question_id": 0, "category": "llava_bench_conv", "tuple": [8, 6]},
    {"question_id": 1, "category": "llava_bench_conv", "tuple": [9, 8]},
    {"question_id": 2, "category": "llava_bench_detail", "tuple": [7, 5]},
    {"question_id": 3, "category": "llava_bench_detail", "tuple": [8, 6]},
    {"question_id": 4, "category": "llava_bench_detail", "tuple": [8, 6]},
    {"question_id": 5, "category": "llava_bench_complex", "tuple": [10, 8]},
    {"question_id": 6, "category": "llava_bench_complex", "tuple": [6, 4]},
]
# all: reference 56/7 = 8.0, model 43/7 = 6.142857 -> 6.143 (LLaVA rounds means to 3 decimals first);
#      6.143 / 8.0 * 100 = 76.7875 -> 76.8; x10: 80.0 and 61.43 -> 61.4
# conv: 8.5 and 7.0 -> 82.35 -> 82.4; detail: 23/3 -> 7.667, 17/3 -> 5.667 -> 73.91 -> 73.9, x10 76.7 / 56.7;
# complex: 8.0 and 6.0 -> 75.0
EXPECTED_REVIEW_SCORES = {
    "all": {"relative": 76.8, "reference": 80.0, "model": 61.4, "reviews": 7},
    "llava_bench_complex": {"relative": 75.0, "reference": 80.0, "model": 60.0, "reviews": 2},
    "llava_bench_conv": {"relative": 82.4, "reference": 85.0, "model": 70.0, "reviews": 2},
    "llava_bench_detail": {"relative": 73.9, "reference": 76.7, "model": 56.7, "reviews": 3},
    "unparsed_reviews": 0,
}


def write_reviews(path: Path, reviews: list[dict] = REVIEWS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(review) + "\n" for review in reviews))
    return path


def test_llavabench_scores_from_a_hand_written_review_file(tmp_path, capsys):
    review_file = write_reviews(tmp_path / "reviews" / "model.jsonl")
    assert summarize_review(review_file) == EXPECTED_REVIEW_SCORES
    summarize_main(["--review-file", str(review_file), "--scores-file", str(tmp_path / "scores.json")])
    assert json.loads((tmp_path / "scores.json").read_text()) == EXPECTED_REVIEW_SCORES
    lines = capsys.readouterr().out.splitlines()
    assert lines[:5] == ["model", "all 76.8 80.0 61.4", "llava_bench_complex 75.0 80.0 60.0",
                         "llava_bench_conv 82.4 85.0 70.0", "llava_bench_detail 73.9 76.7 56.7"]
    assert summarize_review(review_file, ignore={5, 6})["all"]["reviews"] == 5  # LLaVA's --ignore


def test_llavabench_unparsed_reviews_count_as_llava_counts_them(tmp_path):
    review_file = write_reviews(tmp_path / "r.jsonl", [*REVIEWS[:2], {"question_id": 9, "tuple": [-1, -1]}])
    scores = summarize_review(review_file)
    assert scores["unparsed_reviews"] == 1 and scores["all"]["reviews"] == 3
    assert scores["all"]["reference"] == round(round(16 / 3, 3) * 10, 1)  # (8 + 9 - 1) / 3


@pytest.mark.parametrize("line,message", [
    ({"question_id": 0, "category": "llava_bench_conv", "score": [8, 6]}, "'tuple' must be a list of two numbers"),
    ({"question_id": 0, "tuple": [8]}, "'tuple' must be a list of two numbers"),
    ({"question_id": 0, "category": 3, "tuple": [8, 6]}, "'category' must be a string"),
])
def test_llavabench_malformed_review_is_refused_naming_the_line(tmp_path, capsys, line, message):
    review_file = write_reviews(tmp_path / "r.jsonl", [REVIEWS[0], line])
    with pytest.raises(SystemExit):
        summarize_main(["--review-file", str(review_file)])
    assert f"review file {review_file}, line 2: {message}" in capsys.readouterr().err


FAKE_JUDGE = """
import argparse, json
parser = argparse.ArgumentParser()
for flag in ("--question", "--context", "--output"):
    parser.add_argument(flag)
parser.add_argument("--answer-list", nargs=2)
args = parser.parse_args()
questions = [json.loads(line) for line in open(args.question)]
with open(args.output, "w") as out:
    for question, answer in zip(questions, open(args.answer_list[1])):
        json.loads(answer)
        out.write(json.dumps({"question_id": question["question_id"],
                              "category": "llava_bench_" + question["category"], "tuple": [8, 4]}) + "\\n")
"""


def llavabench_data(eval_dir: Path) -> Path:
    """Two LLaVA-Bench questions in LLaVA's layout, with context and GPT-4 answers."""
    folder = eval_dir / "llava-bench-in-the-wild"
    (folder / "images").mkdir(parents=True)
    demo_image = sorted((DEMO_DIR / "images").glob("*.png"))[0]
    (folder / "images" / "001.png").write_bytes(demo_image.read_bytes())
    questions = [{"question_id": index, "image": "001.png", "text": text, "category": category}
                 for index, (text, category) in enumerate([("What is shown?", "conv"), ("Describe it.", "detail")])]
    (folder / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (folder / "context.jsonl").write_text(json.dumps({"image": "001.png", "caption": ["A sign."]}) + "\n")
    (folder / "answers_gpt4.jsonl").write_text("".join(
        json.dumps({"question_id": q["question_id"], "text": "A sign.", "answer_id": str(q["question_id"])}) + "\n"
        for q in questions))
    return folder


def test_llavabench_review_step_waits_for_a_judge_then_runs_it(tmp_path, capsys, monkeypatch):
    folder = llavabench_data(tmp_path)
    paths = RunPaths(folder / "answers" / "m-full", "m-full")
    paths.answer_dir.mkdir(parents=True)
    paths.answers.write_text("".join(json.dumps({"question_id": index, "text": "x"}) + "\n" for index in range(2)))
    task = get_task("llavabench")
    monkeypatch.delenv("JUDGE_CMD", raising=False)
    assert task.score(task.resolve(tmp_path, paths), paths) is False
    assert f"no review file {folder}/reviews/m-full.jsonl: set JUDGE_CMD" in capsys.readouterr().out
    judge = tmp_path / "judge.py"
    judge.write_text(FAKE_JUDGE)
    monkeypatch.setenv("JUDGE_CMD", f"{sys.executable} {judge}")
    assert task.score(task.resolve(tmp_path, paths), paths) is True
    scores = json.loads(paths.scores.read_text())
    assert scores["all"] == {"relative": 50.0, "reference": 80.0, "model": 40.0, "reviews": 2}
    assert set(scores) == {"all", "llava_bench_conv", "llava_bench_detail", "unparsed_reviews"}


def test_llavabench_script_answers_reviews_and_summarises(tiny_original, tmp_path):
    folder = llavabench_data(tmp_path)
    env = {"EVAL_DIR": str(tmp_path)}
    done = run_benchmark_script("llavabench.sh", "full", tiny_original, env)
    assert done.returncode == 0, done.stderr
    assert "no review file" in done.stdout and "set JUDGE_CMD" in done.stdout
    answer_dir = folder / "answers" / f"{tiny_original.name}-full"
    assert len((answer_dir / "merge.jsonl").read_text().splitlines()) == 2
    assert not (answer_dir / "summary.json").exists()
    judge = tmp_path / "judge.py"
    judge.write_text(FAKE_JUDGE)
    done = run_benchmark_script("llavabench.sh", "full", tiny_original, {**env, "JUDGE_CMD": f"{sys.executable} {judge}"})
    assert done.returncode == 0, done.stderr
    assert "all 50.0 80.0 40.0" in done.stdout
    summary = json.loads((answer_dir / "summary.json").read_text())
    assert summary["benchmark"] == "llava-bench-in-the-wild" and summary["scores"]["all"]["relative"] == 50.0
    assert (folder / "reviews" / f"{tiny_original.name}-full.jsonl").is_file()


def test_mmbench_cn_script_names_its_missing_question_file(tmp_path):
    done = run_benchmark_script("mmbench_cn.sh", "full", tmp_path, {"EVAL_DIR": str(tmp_path)})
    assert done.returncode == 1
    assert done.stderr.strip() == (f"error: MMBench-CN question file not found: {tmp_path}/mmbench_cn/"
                                   "mmbench_dev_cn_20231003.tsv (download it as LLaVA's docs/Evaluation.md describes)")


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "textvqa", "--set", "nope=1"], "task textvqa has no value or input 'nope'; it has: questions, images"),
    (["--tasks", "textvqa,vizwiz", "--set", "questions=q.jsonl"], "name the task, e.g. --set textvqa.questions=q.jsonl"),
    (["--tasks", "textvqa", "--set", "questions"], "expected KEY=VALUE or TASK.KEY=VALUE"),
    (["--tasks", "mmbench", "--set", "split=mmbench_test_20230712"], "mmbench/mmbench_test_20230712.tsv"),
    (["--tasks", "textvqa", "--preset", "64", "--method", "fastv"], "--preset picks MustDrop's published thresholds"),
])
def test_runner_set_and_preset_refusals_name_the_problem(tmp_path, argv, message):
    demo_textvqa(tmp_path)
    with pytest.raises(SystemExit) as stop:
        run_main([*argv, "--model-path", "m", "--eval-dir", str(tmp_path)])
    assert message in str(stop.value.code)


def test_set_replaces_inputs_and_values_and_preset_picks_each_tasks_thresholds(tmp_path):
    from llava.eval.run import build_parser, drop_args_for, drop_flags_of, overrides_for, run_paths

    folder = demo_textvqa(tmp_path)
    moved = tmp_path / "elsewhere.jsonl"
    moved.write_text((folder / "llava_textvqa_val_v051_ocr.jsonl").read_text())
    args = build_parser().parse_args(["--tasks", "textvqa", "--model-path", "m", "--preset", "64",
                                      "--set", f"textvqa.questions={moved}", "--set", "gqa.questions=unused"])
    textvqa, vizwiz = get_task("textvqa"), get_task("vizwiz")
    values = textvqa.resolve(tmp_path, run_paths(textvqa, tmp_path, args), overrides_for(textvqa, args, 2))
    assert values["questions"] == str(moved) and values["images"] == str(folder / "train_images")
    assert drop_flags_of(drop_args_for(textvqa, args)) == "--sparse --global_thr 0.011 --individual_thr 0.01"
    assert drop_flags_of(drop_args_for(vizwiz, args)) == "--sparse --global_thr 0.005 --individual_thr 0.001"
    assert run_paths(textvqa, tmp_path, args).run == "m-64"
