"""ScienceQA-IMG (test): LLaVA-1.5's letter-only prompt, accuracy from problems.json."""

from llava.eval.tasks.base import QUESTION_IMAGE_FLAGS, DataInput, Task, question_inputs
from llava.eval.tasks.registry import register_task

register_task(Task(
    name="sqa", folder="scienceqa", answer_cli="llava.eval.answering.science",
    inputs=(*question_inputs("ScienceQA", "llava_test_CQM-A.json", "images/test"),
            DataInput("problems", "ScienceQA problems file", "{base}/problems.json"),
            DataInput("splits", "ScienceQA splits file", "{base}/pid_splits.json")),
    values=(("base", "{data}"),),  # LLaVA's --base-dir: problems.json and pid_splits.json
    answer_flags=(*QUESTION_IMAGE_FLAGS, "--single-pred-prompt"),
    scorer="llava.eval.scoring.science_qa",
    score_flags=("--base-dir", "{base}", "--result-file", "{answers}", "--output-file", "{answer_dir}/output.json",
                 "--output-result", "{answer_dir}/result.json", "--scores-file", "{scores}"),
))
