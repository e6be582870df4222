"""ScienceQA-IMG (test): LLaVA-1.5's letter-only prompt, accuracy from problems.json."""

from llava.eval.tasks.base import QUESTION_IMAGE_FLAGS, DataInput, Task, question_inputs
from llava.eval.tasks.registry import register_task

register_task(Task(
    name="sqa", folder="scienceqa", answer_cli="llava.eval.model_vqa_science",
    inputs=(*question_inputs("ScienceQA", "llava_test_CQM-A.json", "images/test"),
            DataInput("problems", "ScienceQA problems file", "problems.json"),
            DataInput("splits", "ScienceQA splits file", "pid_splits.json")),
    answer_flags=(*QUESTION_IMAGE_FLAGS, "--single-pred-prompt"),
    scorer="llava.eval.eval_science_qa",
    score_flags=("--base-dir", "{data}", "--result-file", "{answers}", "--output-file", "{answer_dir}/output.json",
                 "--output-result", "{answer_dir}/result.json", "--scores-file", "{scores}"),
))
