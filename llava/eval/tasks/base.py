"""What a benchmark task is: its data under playground/data/eval, how it is asked, how it is scored.

A task names LLaVA's answering CLI for its question format and the scorer (or submission converter)
for its answers, and gives both their flags as templates, so that the runner (and through it
`scripts/v1_5/eval/<benchmark>.sh`) asks and scores exactly as LLaVA's scripts do.

Placeholders in the templates: `{data}` (the task's folder), `{answer_dir}`, `{answers}` (the merged
answers file), `{run}` (the answers folder's name, e.g. `llava-v1.5-7b-64`), `{scores}` (where the
scorer writes its scores JSON), one per named value of the task (`values`, e.g. MMBench's `{split}`),
and one per input (`{questions}`, `{images}`, ...). A run may override any value or input by key
(`python -m llava.eval.run --set questions=PATH`); an override is used as given.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llava.eval.cli_errors import RunError

if TYPE_CHECKING:  # the answering loop (and torch) load only when a task is asked
    from llava.eval.answering.loop import Question

DATA_HINT = "download it as LLaVA's docs/Evaluation.md describes"
QUESTION_IMAGE_FLAGS = ("--question-file", "{questions}", "--image-folder", "{images}")  # LLaVA's VQA CLIs


@dataclass(frozen=True)
class DataInput:
    """One input of a task. `path` is relative to the task's folder, unless it holds a placeholder
    (then it names its own root, e.g. "{data}/{split}.tsv"); `kind` is "file" or "dir"; `match` (a
    glob) asks that the folder hold at least one such file."""

    key: str
    what: str
    path: str
    kind: str = "file"
    match: str | None = None

    def default_path(self, folder: Path, values: Mapping[str, str]) -> Path:
        return Path(self.path.format(**values)) if "{" in self.path else folder / self.path

    def check(self, path: Path) -> Path:
        """`path`, or a RunError naming it when it is missing or of the wrong kind."""
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
    (its `main(argv)`), the two flag tuples the templates described in this module's docstring (a
    flag that formats to "" is left out), and `values` the task's named values with their defaults,
    in order (a default may use the values before it, `{data}` and the run's paths)."""

    name: str
    folder: str
    answer_cli: str
    inputs: tuple[DataInput, ...]
    answer_flags: tuple[str, ...]
    scorer: str
    score_flags: tuple[str, ...]
    values: tuple[tuple[str, str], ...] = ()

    def keys(self) -> list[str]:
        """What a run may override: the task's values and inputs."""
        return [name for name, _ in self.values] + [item.key for item in self.inputs]

    def resolve(self, eval_dir: Path, run: RunPaths, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
        """Every value the templates may name, each input checked (a RunError names the first
        missing one), `overrides` (by key) used as given."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(self.keys()))
        if unknown:
            raise RunError(f"task {self.name} has no value or input {', '.join(map(repr, unknown))}; "
                           f"it has: {', '.join(self.keys())}")
        folder = eval_dir / self.folder
        values = {"data": str(folder), "answer_dir": str(run.answer_dir), "answers": str(run.answers),
                  "run": run.run, "scores": str(run.scores)}
        for name, default in self.values:
            values[name] = overrides[name] if name in overrides else default.format(**values)
        for item in self.inputs:
            path = Path(overrides[item.key]) if item.key in overrides else item.default_path(folder, values)
            values[item.key] = str(item.check(path))
        return values

    def answer_args(self, values: Mapping[str, str], answers_file: Path, model_path: str) -> argparse.Namespace:
        """The answering CLI's parsed flags for this task (its defaults for every model flag)."""
        flags = format_flags(self.answer_flags, values)
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

    def score(self, values: Mapping[str, str], run: RunPaths) -> bool:
        """Score (or convert) `run.answers` with the task's scorer, which prints its scores and writes
        them to `run.scores`; a refusal is a RunError after the scorer's own message. False when the
        scores wait for a step outside this run (a task that needs one says which)."""
        self.run_scorer(format_flags(self.score_flags, values), run)
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


def format_flags(templates: tuple[str, ...], values: Mapping[str, str]) -> list[str]:
    """The flags with their placeholders filled; a flag that is empty once filled is left out."""
    flags = [template.format(**values) for template in templates]
    return [flag for flag in flags if flag]
