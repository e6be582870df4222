"""LLaVA-Bench (in-the-Wild): answers in LLaVA's format, reviewed by an external judge, scored from the
review file as LLaVA's summary does (`python -m llava.eval.summarize_review`).

No judge is reachable from here, so the review step is a command the user configures in JUDGE_CMD. It
is run once, with LLaVA's `eval_gpt_review_bench.py` flags appended:
`$JUDGE_CMD --question Q --context C --answer-list answers_gpt4.jsonl ANSWERS --output REVIEW`, and must
write one review line per question (`{"question_id", "category", "tuple": [gpt4, model]}`) to REVIEW,
`<data>/reviews/<run>.jsonl` unless the run sets `review`. LLaVA's own script works as the judge:
`JUDGE_CMD="python LLaVA/llava/eval/eval_gpt_review_bench.py --rule LLaVA/llava/eval/table/rule.json"`.
Without JUDGE_CMD and without a review file, the run stops after answering and says how to make one.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping
from pathlib import Path

from llava.eval.cli_errors import RunError
from llava.eval.tasks.base import QUESTION_IMAGE_FLAGS, DataInput, RunPaths, Task, question_inputs
from llava.eval.tasks.registry import register_task

JUDGE_ENV = "JUDGE_CMD"


class ReviewedTask(Task):
    """A task whose scorer reads a review file that an external judge writes from the answers."""

    def score(self, values: Mapping[str, str], run: RunPaths) -> bool:
        review = Path(values["review"])
        if not review.is_file():
            judge = os.environ.get(JUDGE_ENV, "").strip()
            if not judge:
                print(f"{self.name}: answers in {run.answers}; no review file {review}: set {JUDGE_ENV} to a judge "
                      f"command (see llava/eval/tasks/llavabench.py) or write the review file, then run again")
                return False
            self.run_judge(judge, values, review)
        self.run_scorer(["--review-file", str(review), "--scores-file", str(run.scores)], run)
        return True

    def run_judge(self, judge: str, values: Mapping[str, str], review: Path) -> None:
        review.parent.mkdir(parents=True, exist_ok=True)
        command = [*shlex.split(judge), "--question", values["questions"], "--context", values["context"],
                   "--answer-list", values["reference_answers"], values["answers"], "--output", str(review)]
        print(f"{self.name}: reviewing with {shlex.join(command)}")
        try:
            done = subprocess.run(command, check=False)
        except OSError as error:
            raise RunError(f"{JUDGE_ENV} {judge!r} cannot be run: {error}") from None
        if done.returncode != 0 or not review.is_file():
            raise RunError(f"{JUDGE_ENV} {judge!r} failed (exit code {done.returncode}) or wrote no {review}")


register_task(ReviewedTask(
    name="llavabench", folder="llava-bench-in-the-wild", answer_cli="llava.eval.answering.open_ended",
    inputs=(*question_inputs("LLaVA-Bench", "questions.jsonl", "images"),
            DataInput("context", "LLaVA-Bench context file", "context.jsonl"),
            DataInput("reference_answers", "LLaVA-Bench GPT-4 answers", "answers_gpt4.jsonl")),
    answer_flags=QUESTION_IMAGE_FLAGS,
    values=(("review", "{data}/reviews/{run}.jsonl"),),
    scorer="llava.eval.scoring.llavabench",
    score_flags=(),
))
