"""Answer a LLaVA question file (one JSON object per line) and write LLaVA's answers JSONL.

    python -m llava.eval.model_vqa_loader --model-path M --question-file Q --image-folder I \
        --answers-file A --temperature 0 --conv-mode vicuna_v1 [--sparse --global_thr G --individual_thr T]

Each answer is on disk as soon as it is written; running the same command again continues after the
last answered question. `--num-chunks/--chunk-idx` split the questions as LLaVA does.
"""

from __future__ import annotations

import argparse

from llava.eval.answering.loop import (
    Question,
    add_model_args,
    question_field,
    question_image,
    read_question_lines,
    run_cli,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-folder", type=str, default="")
    parser.add_argument("--question-file", type=str, default="tables/question.jsonl")
    add_model_args(parser)
    return parser


def questions_from_file(args: argparse.Namespace) -> list[Question]:
    """LLaVA's question lines: {"question_id", "image", "text", ...}; the prompt is the text as is.

    `question_id` (string or integer) and `text` are required; `image` is optional (text-only question).
    """
    questions = []
    for number, line in read_question_lines(args.question_file):
        where = f"question file {args.question_file}, line {number}"
        question_id = question_field(line, "question_id", (str, int), where)
        text = question_field(line, "text", (str,), where)
        image_path = question_image(line, args.image_folder, where)
        questions.append(Question(question_id=question_id, text=text, image_path=image_path))
    return questions


def main(argv: list[str] | None = None) -> None:
    run_cli(build_parser(), questions_from_file, argv)


if __name__ == "__main__":
    main()
