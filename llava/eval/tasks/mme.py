"""MME: perception and cognition scores from the release folder, which holds images and ground truth."""

from llava.eval.tasks.base import QUESTION_IMAGE_FLAGS, DataInput, Task, question_inputs
from llava.eval.tasks.registry import register_task

register_task(Task(
    name="mme", folder="MME", answer_cli="llava.eval.answering.vqa",
    inputs=(*question_inputs("MME", "llava_mme.jsonl", "MME_Benchmark_release_version"),
            DataInput("gt", "MME ground-truth folder", "{images}", kind="dir")),
    answer_flags=QUESTION_IMAGE_FLAGS,
    scorer="llava.eval.scoring.mme",
    score_flags=("--question-file", "{questions}", "--result-file", "{answers}", "--gt-dir", "{gt}",
                 "--scores-file", "{scores}"),
))
