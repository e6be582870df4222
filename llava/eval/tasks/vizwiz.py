"""VizWiz (test-dev): answers converted into the evaluation server's upload file (answers_upload/)."""

from llava.eval.tasks.base import QUESTION_IMAGE_FLAGS, Task, question_inputs
from llava.eval.tasks.registry import register_task

register_task(Task(
    name="vizwiz", folder="vizwiz", answer_cli="llava.eval.answering.vqa",
    inputs=question_inputs("VizWiz", "llava_test.jsonl", "test"),
    answer_flags=QUESTION_IMAGE_FLAGS,
    values=(("upload_file", "{data}/answers_upload/{run}.json"),),
    scorer="llava.eval.scoring.vizwiz",
    score_flags=("--annotation-file", "{questions}", "--result-file", "{answers}",
                 "--result-upload-file", "{upload_file}", "--scores-file", "{scores}"),
))
