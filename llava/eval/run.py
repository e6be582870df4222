"""Answer, score and summarise registered benchmark tasks with one command.

    python -m llava.eval.run --tasks textvqa,gqa --model-path M --method fastv --budget 64
    python -m llava.eval.run --tasks textvqa,vizwiz --model-path M --preset 64     # MustDrop, published pairs
    python -m llava.eval.run --tasks mmbench_cn --model-path M --sparse --global_thr 0.011 \
        --individual_thr 0.01 --setting 64 --gpus 0,1,2,3

Every task (see llava/eval/tasks/) reads its data from LLaVA's layout under --eval-dir (default: EVAL_DIR,
else this repository's playground/data/eval) and writes where LLaVA's scripts do:
`<task folder>/answers/<model>[-<method>]-<setting>/` gets the answers (chunk files `<n>_<i>.jsonl`,
merged into `merge.jsonl`), `scores.json` and `summary.json`. The folder's setting is --setting, else
--preset or --budget (`keep<F>` for --keep F), else `full` for a run without dropping. Every model,
sampling and dropping flag of `model_vqa_loader` is accepted (temperature 0 and conv mode vicuna_v1 by
default, as LLaVA's scripts run; `--conv-mode auto` takes the checkpoint's own mode from its config files,
as `scripts/v1_5/eval/` do). `--set KEY=VALUE` replaces one of a task's inputs or values (e.g. `questions=PATH`;
`TASK.KEY=VALUE` when several tasks run). `scripts/v1_5/eval/<benchmark>.sh` are thin wrappers
over this runner.

A run resumes after its last answer. It shards one way: as ranks of `torchrun` / `accelerate launch`,
or with `--gpus 0,1` as one process per GPU, started here as such ranks; each answers its chunk and
the last to finish merges and scores. Missing data stops the run with one `error:` line naming the path,
before the model loads.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

from llava.eval.answering.answers_file import finished_lines, locked_answers_file, remove_if_empty
from llava.eval.cli_errors import INTERRUPTED_EXIT_CODE, Interrupted, RunError, interruptible, kept_note, main_guard
from llava.eval.answering.loop import add_model_args, answer_shard, resolve_conv_mode, validate_args
from llava.eval.scoring.run_summary import build_summary, read_scores
from llava.eval.answering.sharding import ONE_PROCESS, launcher_shard, llava_chunk_path, merged_answers, replace_if_changed, run_on_gpus
from llava.eval.tasks import RunPaths, Task, get_task
from llava.eval.thresholds import TOKEN_SETTINGS, thresholds_for

REPO_EVAL_DIR = Path(__file__).resolve().parents[2] / "playground" / "data" / "eval"
RUNNER_OWNED = ("answers_file", "num_chunks", "chunk_idx")  # set per task by the runner
STALE_AFTER_NEW_ANSWERS = ("scores.json", "summary.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--tasks", required=True, help="comma-separated task names, e.g. textvqa,gqa")
    parser.add_argument("--eval-dir", default=None, help="LLaVA's playground/data/eval (default: EVAL_DIR or the repo's)")
    parser.add_argument("--setting", default=None, help="name of the run's answers folder suffix, e.g. 64")
    parser.add_argument("--preset", type=int, default=None, choices=TOKEN_SETTINGS,
                        help="MustDrop at each task's published thresholds for this many tokens (llava.eval.thresholds)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="[TASK.]KEY=VALUE",
                        help="replace a task's input or value, e.g. questions=my_questions.jsonl (repeatable)")
    parser.add_argument("--gpus", default=None, help="comma-separated GPU ids: one answering process per GPU")
    add_model_args(parser)
    parser.set_defaults(model_path=None, temperature=0.0)  # no --conv-mode: vicuna_v1 (RUNNER_CONV_MODE), qwen
    return parser


RUNNER_CONV_MODE = "vicuna_v1"  # what LLaVA's evaluation scripts pass


def model_flag_names() -> set[str]:
    """The namespace keys of the shared model/sampling/dropping flags the runner hands to every task."""
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    return set(vars(parser.parse_args([]))) - set(RUNNER_OWNED)


def setting_of(args: argparse.Namespace) -> str:
    if args.setting:
        return args.setting
    if args.preset is not None:
        return str(args.preset)
    if args.budget is not None:
        return f"{args.budget:g}"
    if args.keep is not None:
        return f"keep{args.keep:g}"
    if not args.sparse and args.method in (None, "none"):
        return "full"
    raise RunError("name this run's setting with --setting (e.g. --setting 64): it names the answers folder")


def drop_args_for(task: Task, args: argparse.Namespace) -> argparse.Namespace:
    """The run's flags for `task`: --preset becomes MustDrop with the task's published thresholds."""
    if args.preset is None:
        return args
    task_args = copy.copy(args)
    pair = thresholds_for(task.name, args.preset)
    task_args.sparse, task_args.global_thr, task_args.individual_thr = True, pair.global_thr, pair.individual_thr
    return task_args


def drop_flags_of(args: argparse.Namespace) -> str:
    """The dropping flags as one string, as summary.json records them."""
    flags = []
    if args.sparse:
        flags += ["--sparse", "--global_thr", f"{args.global_thr:g}", "--individual_thr", f"{args.individual_thr:g}"]
    if args.method:
        flags += ["--method", args.method]
    if args.budget is not None:
        flags += ["--budget", f"{args.budget:g}"]
    if args.keep is not None:
        flags += ["--keep", f"{args.keep:g}"]
    if args.method_args:
        flags += ["--method-args", args.method_args]
    return " ".join(flags)


def run_paths(task: Task, eval_dir: Path, args: argparse.Namespace) -> RunPaths:
    model_name = Path(args.model_path.rstrip("/")).name
    method = f"-{args.method}" if args.method and not args.sparse else ""
    run = f"{model_name}{method}-{setting_of(args)}"
    return RunPaths(eval_dir / task.folder / "answers" / run, run)


def overrides_for(task: Task, args: argparse.Namespace, task_count: int) -> dict[str, str]:
    """The --set pairs meant for `task`; a bare KEY only when one task runs."""
    overrides = {}
    for pair in args.overrides:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise RunError(f"--set {pair!r}: expected KEY=VALUE or TASK.KEY=VALUE")
        name, dot, key = key.rpartition(".")
        if not dot and task_count > 1:
            raise RunError(f"--set {pair!r}: several tasks run; name the task, e.g. --set {task.name}.{pair}")
        if not dot or name == task.name:
            overrides[key] = value
    return overrides


def answer(task: Task, values: dict[str, str], args: argparse.Namespace, paths: RunPaths) -> None:
    """Answer this process's chunk of the task's questions, then merge and score if every chunk is done.
    A failure after some answers says how many are kept and that the same command resumes."""
    shard = launcher_shard() or ONE_PROCESS
    chunk = llava_chunk_path(paths.answers, shard)
    task_args = task.answer_args(values, chunk, args.model_path)
    for name in model_flag_names():
        setattr(task_args, name, getattr(args, name))
    questions = task.questions(task_args)
    try:
        answer_shard(task_args, questions, shard, chunk, task.identity_args())
    except (Interrupted, KeyboardInterrupt):
        raise Interrupted(kept_note(answers_in(chunk), paths.answer_dir)) from None
    except RunError as error:
        answered = answers_in(chunk)
        reason = str(error)
        if not answered:
            raise RunError(reason) from None
        print(f"error: {reason}", file=sys.stderr)
        raise RunError(f"stopped with {answered} answers in {paths.answer_dir}; "
                       "fix the cause and re-run the same command to resume") from None
    with locked_answers_file(paths.answers, wait=True):  # shards finishing together merge one at a time
        merged = merged_answers(paths.answers, questions, shard.count, llava_chunk_path)
        if merged is None:
            print(f"{task.name}: this shard is done; the last shard to finish merges and scores")
            return
        if replace_if_changed(paths.answers, merged):
            for stale in STALE_AFTER_NEW_ANSWERS:
                (paths.answer_dir / stale).unlink(missing_ok=True)
        score_and_summarise(task, values, args, paths)


def answers_in(chunk: Path) -> int:
    return len(finished_lines(chunk)) if chunk.is_file() else 0


def score_and_summarise(task: Task, values: dict[str, str], args: argparse.Namespace, paths: RunPaths) -> None:
    """Score the merged answers, then write scores.json and summary.json together (not at all while
    the task waits for an external step, such as llavabench's review)."""
    paths.scores.unlink(missing_ok=True)
    try:
        if not task.score(values, paths):
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


def answer_on_gpus(task: Task, gpus: list[str], argv: list[str], paths: RunPaths) -> None:
    """One process per GPU, each a rank of this run limited to `task`; a failure is reported once all
    have stopped, and a run that answered nothing leaves no folder behind."""
    created = [folder for folder in (paths.answer_dir, *paths.answer_dir.parents) if not folder.exists()]
    try:
        codes = run_on_gpus([sys.executable, "-m", "llava.eval.run", *worker_argv(argv, task.name)], gpus)
    except KeyboardInterrupt:
        codes = [INTERRUPTED_EXIT_CODE]  # every process has stopped (run_on_gpus waits for them)
    failed = [(rank, code) for rank, code in enumerate(codes) if code != 0]
    if not failed:
        return
    remove_if_empty(created)
    answered = sum(answers_in(path) for path in paths.answer_dir.glob(f"{len(gpus)}_*.jsonl"))
    if INTERRUPTED_EXIT_CODE in codes:  # the processes stay silent on Ctrl-C: say once what they kept
        raise Interrupted(kept_note(answered, paths.answer_dir))
    if answered:
        raise RunError(f"stopped with {answered} answers in {paths.answer_dir}; "
                       "fix the cause and re-run the same command to resume")
    rank, code = failed[0]
    if code < 0:
        raise RunError(f"the process on GPU {gpus[rank]} was killed by signal {-code} before answering any question")
    sys.exit(code)  # the process said why, in its own error line


def worker_argv(argv: list[str], task_name: str) -> list[str]:
    """This run's command line for one task, without --gpus: what each per-GPU process runs."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--gpus", "--tasks"):
            skip = True
        elif not arg.startswith(("--gpus=", "--tasks=")):
            kept.append(arg)
    return [*kept, "--tasks", task_name]


def check_runner_args(args: argparse.Namespace) -> None:
    if args.model_path is None:
        raise RunError("--model-path is required")
    defaults = build_parser().parse_args(["--tasks", "x"])
    changed = [name for name in RUNNER_OWNED if getattr(args, name) != getattr(defaults, name)]
    if changed:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise RunError(f"{flags}: the runner names each task's answers file; shard with --gpus or torchrun instead")
    if args.preset is not None and (args.sparse or args.method not in (None, "none") or args.budget is not None
                                    or args.keep is not None):
        raise RunError("--preset picks MustDrop's published thresholds; drop --sparse, --method, --budget and --keep, "
                       "or give the thresholds yourself with --sparse --global_thr G --individual_thr I")
    if args.gpus is not None and launcher_shard() is not None:
        raise RunError("--gpus under torchrun / accelerate launch: shard one way, not both")


def run(args: argparse.Namespace, argv: list[str]) -> None:
    gpus = [gpu.strip() for gpu in (args.gpus or "").split(",") if gpu.strip()]
    if len(gpus) == 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[0]  # before anything (the device check too) touches CUDA
    check_runner_args(args)
    validate_args(args)
    try:
        tasks = [get_task(name.strip()) for name in args.tasks.split(",") if name.strip()]
    except ValueError as error:
        raise RunError(str(error)) from None
    if not tasks:
        raise RunError("--tasks names no task")
    eval_dir = Path(args.eval_dir or os.environ.get("EVAL_DIR") or REPO_EVAL_DIR)
    runs = []
    for task in tasks:  # every task's data, before any model loads
        paths = run_paths(task, eval_dir, drop_args_for(task, args))
        runs.append((task, paths, task.resolve(eval_dir, paths, overrides_for(task, args, len(tasks)))))
    if len(gpus) <= 1:
        resolve_conv_mode(args, RUNNER_CONV_MODE)  # once for every task; each process of a --gpus run resolves its own
    for task, paths, values in runs:
        print(f"== {task.name}: {paths.answer_dir}")
        if len(gpus) > 1:
            answer_on_gpus(task, gpus, argv, paths)
        else:
            answer(task, values, drop_args_for(task, args), paths)


@interruptible
def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    main_guard(lambda: run(args, argv))


if __name__ == "__main__":
    main()
