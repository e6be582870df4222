"""MM-Vet: answers converted into the results JSON the official GPT-4 evaluator grades (results/)."""

from llava.eval.tasks.base import QUESTION_IMAGE_FLAGS, Task, question_inputs
from llava.eval.tasks.registry import register_task

register_task(Task(
    name="mmvet", folder="mm-vet", answer_cli="llava.eval.answering.open_ended",
    inputs=question_inputs("MM-Vet", "llava-mm-vet.jsonl", "images"),
    answer_flags=QUESTION_IMAGE_FLAGS,
    scorer="llava.eval.scoring.mmvet",
    score_flags=("--src", "{answers}", "--dst", "{data}/results/{run}.json", "--question-file", "{questions}"),
))
