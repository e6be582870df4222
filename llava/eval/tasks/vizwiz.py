"""VizWiz (test-dev): answers converted into the evaluation server's upload file (answers_upload/)."""

from llava.eval.tasks.base import QUESTION_IMAGE_FLAGS, Task, question_inputs
from llava.eval.tasks.registry import register_task

register_task(Task(
    name="vizwiz", folder="vizwiz", answer_cli="llava.eval.model_vqa_loader",
    inputs=question_inputs("VizWiz", "llava_test.jsonl", "test"),
    answer_flags=QUESTION_IMAGE_FLAGS,
    scorer="llava.eval.convert_vizwiz_for_submission",
    score_flags=("--annotation-file", "{questions}", "--result-file", "{answers}",
                 "--result-upload-file", "{data}/answers_upload/{run}.json", "--scores-file", "{scores}"),
))
