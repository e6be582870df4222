"""VQAv2 (test-dev): answers converted into EvalAI's upload file (answers_upload/<split>/<run>.json)."""

from llava.eval.tasks.base import QUESTION_IMAGE_FLAGS, DataInput, Task, question_inputs
from llava.eval.tasks.registry import register_task

SPLIT = "llava_vqav2_mscoco_test-dev2015"

register_task(Task(
    name="vqav2", folder="vqav2", answer_cli="llava.eval.answering.vqa",
    values=(("split", SPLIT),),
    inputs=(*question_inputs("VQAv2", "{data}/{split}.jsonl", "test2015"),
            DataInput("test_split", "VQAv2 test split file", "llava_vqav2_mscoco_test2015.jsonl")),
    answer_flags=QUESTION_IMAGE_FLAGS,
    scorer="llava.eval.scoring.vqav2",
    score_flags=("--dir", "{data}", "--split", "{split}", "--ckpt", "{run}", "--result-file", "{answers}",
                 "--scores-file", "{scores}"),
))
