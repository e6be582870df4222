"""Answer, score and summarise registered benchmark tasks with one command.

    python -m llava.eval.run --tasks textvqa,gqa --model-path M --method fastv --budget 64
    python -m llava.eval.run --tasks mmbench_cn --model-path M --sparse --global_thr 0.011 \
        --individual_thr 0.01 --setting 64

Every task (see llava/eval/tasks/) reads its data from LLaVA's layout under --eval-dir (default: EVAL_DIR,
else this repository's playground/data/eval) and writes where `scripts/v1_5/eval/<benchmark>.sh` does:
`<task folder>/answers/<model>[-<method>]-<setting>/` gets the answers (`1_0.jsonl`, merged into
`merge.jsonl`), `scores.json` and `summary.json`. The folder's setting is --setting, else the --budget,
else `full` for a run without dropping. Every model, sampling and dropping flag of `model_vqa_loader`
is accepted (temperature 0 and conv mode vicuna_v1 by default, as the scripts run). A run resumes after
its last answer; under `torchrun` each process answers one shard and the merged file is scored once
complete. Missing data stops the run with one `error:` line naming the path, before the model loads.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from llava.eval.answers_file import AnswersFileError, locked_answers_file
from llava.eval.cli_errors import RunError, main_guard
from llava.eval.question_loop import add_model_args, run_questions, validate_args
from llava.eval.run_summary import build_summary, read_scores
from llava.eval.sharding import launcher_shard
from llava.eval.tasks import RunPaths, Task, get_task

REPO_EVAL_DIR = Path(__file__).resolve().parents[2] / "playground" / "data" / "eval"
CHUNK_FILE = "1_0.jsonl"  # the answers file of a one-chunk run, as the scripts name it
RUNNER_OWNED = ("answers_file", "num_chunks", "chunk_idx")  # set per task by the runner


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", required=True, help="comma-separated task names, e.g. textvqa,gqa")
    parser.add_argument("--eval-dir", default=None, help="LLaVA's playground/data/eval (default: EVAL_DIR or the repo's)")
    parser.add_argument("--setting", default=None, help="name of the run's answers folder suffix, e.g. 64")
    add_model_args(parser)
    parser.set_defaults(model_path=None, temperature=0.0, conv_mode="vicuna_v1")
    return parser


def model_flag_names() -> set[str]:
    """The namespace keys of the shared model/sampling/dropping flags the runner hands to every task."""
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    return set(vars(parser.parse_args([]))) - set(RUNNER_OWNED)


def setting_of(args: argparse.Namespace) -> str:
    if args.setting:
        return args.setting
    if args.budget is not None:
        return f"{args.budget:g}"
    if not args.sparse and args.method in (None, "none"):
        return "full"
    raise RunError("name this run's setting with --setting (e.g. --setting 64): it names the answers folder")


def drop_flags_of(args: argparse.Namespace) -> str:
    """The dropping flags as one string, as the scripts record them in summary.json."""
    flags = []
    if args.sparse:
        flags += ["--sparse", "--global_thr", f"{args.global_thr:g}", "--individual_thr", f"{args.individual_thr:g}"]
    if args.method:
        flags += ["--method", args.method]
    if args.budget is not None:
        flags += ["--budget", f"{args.budget:g}"]
    if args.method_args:
        flags += ["--method-args", args.method_args]
    return " ".join(flags)


def run_paths(task: Task, eval_dir: Path, args: argparse.Namespace) -> RunPaths:
    model_name = Path(args.model_path.rstrip("/")).name
    method = f"-{args.method}" if args.method and not args.sparse else ""
    run = f"{model_name}{method}-{setting_of(args)}"
    return RunPaths(eval_dir / task.folder / "answers" / run, run)


def answer(task: Task, eval_dir: Path, args: argparse.Namespace, paths: RunPaths) -> int | None:
    """Answer the task's questions into the run's chunk file; the number of questions, or None for a
    torchrun shard whose merged answers another shard will write."""
    chunk = paths.answer_dir / CHUNK_FILE
    task_args = task.answer_args(eval_dir, chunk, args.model_path)
    for name in model_flag_names():
        setattr(task_args, name, getattr(args, name))
    questions = task.questions(task_args)
    paths.answer_dir.mkdir(parents=True, exist_ok=True)
    run_questions(task_args, questions, task.identity_args())
    if launcher_shard() is not None and not chunk.is_file():
        print(f"{task.name}: this shard is done; the last shard to finish merges and scores")
        return None
    return len(questions)


def merge(paths: RunPaths) -> int:
    """merge.jsonl from the chunk file, as the scripts' merge step makes it; new answers make earlier
    scores stale. The number of answers."""
    merged = (paths.answer_dir / CHUNK_FILE).read_bytes()
    if not paths.answers.is_file() or paths.answers.read_bytes() != merged:
        temporary = paths.answer_dir / f".merge.jsonl.{os.getpid()}.pending"
        temporary.write_bytes(merged)
        os.replace(temporary, paths.answers)
        for stale in ("scores.json", "summary.json"):
            (paths.answer_dir / stale).unlink(missing_ok=True)
    return len(merged.splitlines())


def finish(task: Task, eval_dir: Path, args: argparse.Namespace, paths: RunPaths, questions: int) -> None:
    """Merge, score and summarise under the merged file's lock, so two torchrun shards finishing
    together cannot both write the scores."""
    try:
        with locked_answers_file(paths.answers):
            if merge(paths) == questions:
                score_and_summarise(task, eval_dir, args, paths)
    except AnswersFileError as error:
        if launcher_shard() is None:
            raise RunError(str(error)) from None
        print(f"{task.name}: another shard is scoring ({error})")


def score_and_summarise(task: Task, eval_dir: Path, args: argparse.Namespace, paths: RunPaths) -> None:
    """Score the merged answers, then write scores.json and summary.json together (not at all while
    the task waits for an external step, such as llavabench's review)."""
    paths.scores.unlink(missing_ok=True)
    try:
        if not task.score(eval_dir, paths):
            return
        summary = build_summary(paths.answers, task.folder, setting_of(args), args.model_path,
                                drop_flags_of(args), read_scores(str(paths.scores)))
        pending = paths.answer_dir / f".summary.json.{os.getpid()}.pending"
        pending.write_text(json.dumps(summary, indent=2) + "\n")
        if paths.scores.is_file():
            os.replace(paths.scores, paths.answer_dir / "scores.json")
        os.replace(pending, paths.answer_dir / "summary.json")
    finally:
        paths.scores.unlink(missing_ok=True)  # a failed scorer's half-written scores
    print(f"{task.name}: summary {paths.answer_dir / 'summary.json'}")


def check_runner_args(args: argparse.Namespace) -> None:
    if args.model_path is None:
        raise RunError("--model-path is required")
    defaults = build_parser().parse_args(["--tasks", "x"])
    changed = [name for name in RUNNER_OWNED if getattr(args, name) != getattr(defaults, name)]
    if changed:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise RunError(f"{flags}: the runner names each task's answers file; shard with torchrun instead")


def run(args: argparse.Namespace) -> None:
    check_runner_args(args)
    validate_args(args)
    try:
        tasks = [get_task(name.strip()) for name in args.tasks.split(",") if name.strip()]
    except ValueError as error:
        raise RunError(str(error)) from None
    if not tasks:
        raise RunError("--tasks names no task")
    eval_dir = Path(args.eval_dir or os.environ.get("EVAL_DIR") or REPO_EVAL_DIR)
    for task in tasks:  # every task's data, before any model loads
        task.data_paths(eval_dir)
    setting_of(args)
    for task in tasks:
        paths = run_paths(task, eval_dir, args)
        print(f"== {task.name}: {paths.answer_dir}")
        questions = answer(task, eval_dir, args, paths)
        if questions is not None:
            finish(task, eval_dir, args, paths, questions)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    main_guard(lambda: run(args))


if __name__ == "__main__":
    main()
