"""GQA (testdev-balanced); the predictions file goes next to the answers."""

from llava.eval.tasks.base import QUESTION_IMAGE_FLAGS, DataInput, Task, question_inputs
from llava.eval.tasks.registry import register_task

register_task(Task(
    name="gqa", folder="gqa", answer_cli="llava.eval.answering.vqa",
    inputs=(*question_inputs("GQA", "llava_gqa_testdev_balanced.jsonl", "data/images"),
            DataInput("gqa_questions", "GQA testdev-balanced questions", "data/testdev_balanced_questions.json")),
    answer_flags=QUESTION_IMAGE_FLAGS,
    values=(("predictions", "{answer_dir}/testdev_balanced_predictions.json"),),
    scorer="llava.eval.scoring.gqa",
    score_flags=("--questions", "{gqa_questions}", "--result-file", "{answers}",
                 "--predictions", "{predictions}", "--scores-file", "{scores}"),
))
