"""SEED-Bench (image questions): accuracy per question type and the leaderboard upload file. The question
file names images as SEED-Bench-image/..., so the image folder given to the CLI is the task's own."""

from llava.eval.tasks.base import DataInput, Task, question_inputs
from llava.eval.tasks.registry import register_task

register_task(Task(
    name="seed", folder="seed_bench", answer_cli="llava.eval.answering.vqa",
    values=(("image_root", "{data}"),),  # LLaVA's image paths start with SEED-Bench-image/
    inputs=(*question_inputs("SEED-Bench", "llava-seed-bench.jsonl", "{image_root}/SEED-Bench-image"),
            DataInput("annotations", "SEED-Bench annotation file", "SEED-Bench.json")),
    answer_flags=("--question-file", "{questions}", "--image-folder", "{image_root}"),
    scorer="llava.eval.scoring.seed",
    score_flags=("--annotation-file", "{annotations}", "--result-file", "{answers}",
                 "--result-upload-file", "{data}/answers_upload/{run}.jsonl", "--scores-file", "{scores}"),
))
