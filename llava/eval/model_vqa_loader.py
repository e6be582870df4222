"""Answer a LLaVA question file (one JSON object per line) and write LLaVA's answers JSONL.

    python -m llava.eval.model_vqa_loader --model-path M --question-file Q --image-folder I \
        --answers-file A --temperature 0 --conv-mode vicuna_v1 [--sparse --global_thr G --individual_thr T]

Each answer is on disk as soon as it is written; running the same command again continues after the
last answered question. `--num-chunks/--chunk-idx` split the questions as LLaVA does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llava.eval.question_loop import (
    Question,
    add_model_args,
    read_question_file,
    run_cli,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-folder", type=str, default="")
    parser.add_argument("--question-file", type=str, default="tables/question.jsonl")
    add_model_args(parser)
    return parser


def questions_from_file(args: argparse.Namespace) -> list[Question]:
    """LLaVA's question lines: {"question_id", "image", "text", ...}; the prompt is the text as is."""
    questions = []
    for line in read_question_file(args.question_file):
        image = Path(args.image_folder) / line["image"] if line.get("image") else None
        questions.append(Question(question_id=line.get("question_id"), text=line["text"], image_path=image))
    return questions


def main(argv: list[str] | None = None) -> None:
    run_cli(build_parser(), questions_from_file, argv)


if __name__ == "__main__":
    main()
