"""TextVQA (val, with LLaVA's OCR-token prompts), scored by VQA accuracy."""

from llava.eval.tasks.base import QUESTION_IMAGE_FLAGS, DataInput, Task, question_inputs
from llava.eval.tasks.registry import register_task

register_task(Task(
    name="textvqa", folder="textvqa", answer_cli="llava.eval.answering.vqa",
    inputs=(*question_inputs("TextVQA", "llava_textvqa_val_v051_ocr.jsonl", "train_images"),
            DataInput("annotations", "TextVQA annotation file", "TextVQA_0.5.1_val.json")),
    answer_flags=QUESTION_IMAGE_FLAGS,
    scorer="llava.eval.scoring.textvqa",
    score_flags=("--annotation-file", "{annotations}", "--result-file", "{answers}", "--scores-file", "{scores}"),
))
