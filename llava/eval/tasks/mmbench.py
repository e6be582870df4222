"""MMBench (dev, English): letter-only prompt, round 0 as LLaVA asks it; scores and the upload sheet."""

from llava.eval.tasks.base import DataInput, Task
from llava.eval.tasks.registry import register_task

SPLIT = "mmbench_dev_20230712"


def mmbench_task(name: str, what: str, split: str, lang: str) -> Task:
    """An MMBench split (a TSV in the task's folder named after it) asked with `--lang`'s prompt rules."""
    return Task(
        name=name, folder=name, answer_cli="llava.eval.answering.mmbench",
        # rounds: "--all-rounds" asks every circular round (LLaVA's script asks round 0 only)
        values=(("split", split), ("upload_dir", "{data}/answers_upload/{split}"), ("rounds", "")),
        inputs=(DataInput("questions", f"{what} question file", "{data}/{split}.tsv"),),
        answer_flags=("--question-file", "{questions}", "--lang", lang, "--single-pred-prompt", "{rounds}"),
        scorer="llava.eval.scoring.mmbench",
        score_flags=("--question-file", "{questions}", "--result-file", "{answers}",
                     "--upload-file", "{upload_dir}/{run}.xlsx", "--scores-file", "{scores}"),
    )


register_task(mmbench_task("mmbench", "MMBench", SPLIT, "en"))
