"""POPE (COCO adversarial / popular / random): accuracy, precision, recall and F1 per category."""

from llava.eval.tasks.base import QUESTION_IMAGE_FLAGS, DataInput, Task, question_inputs
from llava.eval.tasks.registry import register_task

register_task(Task(
    name="pope", folder="pope", answer_cli="llava.eval.answering.vqa",
    inputs=(*question_inputs("POPE", "llava_pope_test.jsonl", "val2014"),
            DataInput("annotations", "POPE annotation folder", "coco", kind="dir", match="coco_pope_*.json")),
    answer_flags=QUESTION_IMAGE_FLAGS,
    scorer="llava.eval.scoring.pope",
    score_flags=("--annotation-dir", "{annotations}", "--question-file", "{questions}",
                 "--result-file", "{answers}", "--scores-file", "{scores}"),
))
