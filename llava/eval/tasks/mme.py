"""MME: perception and cognition scores from the release folder, which holds images and ground truth."""

from llava.eval.tasks.base import QUESTION_IMAGE_FLAGS, Task, question_inputs
from llava.eval.tasks.registry import register_task

register_task(Task(
    name="mme", folder="MME", answer_cli="llava.eval.model_vqa_loader",
    inputs=question_inputs("MME", "llava_mme.jsonl", "MME_Benchmark_release_version"),
    answer_flags=QUESTION_IMAGE_FLAGS,
    scorer="llava.eval.eval_mme",
    score_flags=("--question-file", "{questions}", "--result-file", "{answers}", "--gt-dir", "{images}",
                 "--scores-file", "{scores}"),
))
