"""What a benchmark task is: its data under playground/data/eval, how it is asked, how it is scored.

A task names LLaVA's answering CLI for its question format and the scorer (or submission converter)
for its answers, and gives both their flags as templates over its data paths, so that the runner asks
and scores exactly as `scripts/v1_5/eval/<benchmark>.sh` does. Placeholders in the flag templates:
`{data}` (the task's folder), one per input (`{questions}`, `{images}`, ...), and for the scorer
`{answers}` (the merged answers file), `{answer_dir}`, `{run}` (the answers folder's name, e.g.
`llava-v1.5-7b-64`) and `{scores}` (where the scorer writes its scores JSON).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llava.eval.cli_errors import RunError

if TYPE_CHECKING:  # the answering loop (and torch) load only when a task is asked
    from llava.eval.question_loop import Question

DATA_HINT = "download it as LLaVA's docs/Evaluation.md describes"
QUESTION_IMAGE_FLAGS = ("--question-file", "{questions}", "--image-folder", "{images}")  # LLaVA's VQA CLIs


@dataclass(frozen=True)
class DataInput:
    """One input of a task: `path` relative to the task's folder; `kind` is "file" or "dir";
    `match` (a glob) asks that the folder hold at least one such file."""

    key: str
    what: str
    path: str
    kind: str = "file"
    match: str | None = None

    def check(self, folder: Path) -> Path:
        """The input's path, or a RunError naming the path LLaVA's layout expects."""
        path = folder / self.path
        if self.kind == "file":
            if path.is_file():
                return path
            if path.exists():
                raise RunError(f"{self.what} is not a readable file: {path}")
        else:
            if path.is_dir():
                if self.match is not None and not any(path.glob(self.match)):
                    raise RunError(f"{self.what} has no {self.match}: {path} ({DATA_HINT})")
                return path
            if path.exists():
                raise RunError(f"{self.what} is not a readable folder: {path}")
        raise RunError(f"{self.what} not found: {path} ({DATA_HINT})")


def question_inputs(benchmark: str, questions: str, images: str) -> tuple[DataInput, DataInput]:
    """The question file and image folder most tasks start with, named for error messages."""
    return (DataInput("questions", f"{benchmark} question file", questions),
            DataInput("images", f"{benchmark} image folder", images, kind="dir"))


@dataclass(frozen=True)
class RunPaths:
    """Where one run of a task writes: its answers folder, the merged answers, the pending scores."""

    answer_dir: Path
    run: str

    @property
    def answers(self) -> Path:
        return self.answer_dir / "merge.jsonl"

    @property
    def scores(self) -> Path:
        return self.answer_dir / ".scores.json.pending"


@dataclass(frozen=True)
class Task:
    """A benchmark, registered by `name` (see registry.py). `folder` is its directory under the eval
    directory (LLaVA's layout), `answer_cli` the module that answers its questions (it provides
    `build_parser` and `questions_from_file`), `scorer` the module that scores or converts the answers
    (its `main(argv)`), and the two flag tuples the templates described in this module's docstring."""

    name: str
    folder: str
    answer_cli: str
    inputs: tuple[DataInput, ...]
    answer_flags: tuple[str, ...]
    scorer: str
    score_flags: tuple[str, ...]

    def data_paths(self, eval_dir: Path) -> dict[str, str]:
        """Every input's path, checked (a RunError names the first missing one), plus `data`."""
        folder = eval_dir / self.folder
        paths = {item.key: str(item.check(folder)) for item in self.inputs}
        return {"data": str(folder), **paths}

    def answer_args(self, eval_dir: Path, answers_file: Path, model_path: str) -> argparse.Namespace:
        """The answering CLI's parsed flags for this task (its defaults for every model flag)."""
        flags = [flag.format(**self.data_paths(eval_dir)) for flag in self.answer_flags]
        parser = self.cli_module().build_parser()
        return parser.parse_args([*flags, "--answers-file", str(answers_file), "--model-path", model_path])

    def cli_module(self):
        return importlib.import_module(self.answer_cli)

    def identity_args(self) -> tuple[str, ...]:
        """The CLI's own prompt flags that resuming must check (e.g. MMBench's --lang)."""
        return getattr(self.cli_module(), "IDENTITY_ARGS", ())

    def questions(self, args: argparse.Namespace) -> list[Question]:
        """The task's questions, prompt rules applied, read by its answering CLI's reader."""
        return self.cli_module().questions_from_file(args)

    def run_values(self, eval_dir: Path, run: RunPaths) -> dict[str, str]:
        """What the score flag templates may name: the data paths and the run's own paths."""
        return {**self.data_paths(eval_dir), "answers": str(run.answers), "answer_dir": str(run.answer_dir),
                "run": run.run, "scores": str(run.scores)}

    def score(self, eval_dir: Path, run: RunPaths) -> bool:
        """Score (or convert) `run.answers` with the task's scorer, which prints its scores and writes
        them to `run.scores`; a refusal is a RunError after the scorer's own message. False when the
        scores wait for a step outside this run (a task that needs one says which)."""
        values = self.run_values(eval_dir, run)
        self.run_scorer([flag.format(**values) for flag in self.score_flags], run)
        return True

    def run_scorer(self, argv: list[str], run: RunPaths) -> None:
        try:
            importlib.import_module(self.scorer).main(argv)
        except SystemExit as stop:
            if stop.code not in (0, None):
                if isinstance(stop.code, str):  # sys.exit("error: ...") prints only when uncaught
                    print(stop.code, file=sys.stderr)
                raise RunError(f"task {self.name}: {self.scorer} did not score {run.answers} "
                               "(see above); the answers are kept") from None
