"""MMBench (dev, English): letter-only prompt, round 0 as LLaVA asks it; scores and the upload sheet."""

from llava.eval.tasks.base import DataInput, Task
from llava.eval.tasks.registry import register_task

SPLIT = "mmbench_dev_20230712"


def mmbench_task(name: str, what: str, split: str, lang: str) -> Task:
    """An MMBench split (a TSV in the task's folder named after it) asked with `--lang`'s prompt rules."""
    return Task(
        name=name, folder=name, answer_cli="llava.eval.model_vqa_mmbench",
        inputs=(DataInput("questions", f"{what} question file", f"{split}.tsv"),),
        answer_flags=("--question-file", "{questions}", "--lang", lang, "--single-pred-prompt"),
        scorer="llava.eval.eval_mmbench",
        score_flags=("--question-file", "{questions}", "--result-file", "{answers}",
                     "--upload-file", f"{{data}}/answers_upload/{split}/{{run}}.xlsx", "--scores-file", "{scores}"),
    )


register_task(mmbench_task("mmbench", "MMBench", SPLIT, "en"))
