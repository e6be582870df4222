"""Answer ScienceQA (LLaVA's llava_test_CQM-A.json) and write LLaVA's answers JSONL.

    python -m llava.eval.model_vqa_science --model-path M --question-file llava_test_CQM-A.json \
        --image-folder images/test --answers-file A --single-pred-prompt --temperature 0 --conv-mode vicuna_v1

The question file is a JSON list of {"id", "image" (optional), "conversations": [human, gpt]}; the
human turn is the question. Questions without an image are asked text-only. The answers line's
"prompt" is LLaVA's: "<image>\\n" first for image questions, which LLaVA's scorer uses to find them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.eval.answering.loop import (
    Question,
    RunError,
    add_model_args,
    question_field,
    question_image,
    run_cli,
)

SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."
IDENTITY_ARGS = ("single_pred_prompt",)  # prompt flags a resumed run must share


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-folder", type=str, default="")
    parser.add_argument("--question-file", type=str, default="tables/question.json")
    parser.add_argument("--single-pred-prompt", action=argparse.BooleanOptionalAction, default=True,
                        help="ask for the option letter only (LLaVA-1.5's evaluation prompt; on by default)")
    add_model_args(parser)
    return parser


def read_problem_list(path: str) -> list[dict]:
    """The question file: a JSON list (not JSONL) of conversation records."""
    try:
        problems = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"question file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunError(f"question file {path}: not readable JSON ({error})") from None
    if not isinstance(problems, list):
        raise RunError(f"question file {path}: expected a JSON list of questions, got {type(problems).__name__}")
    return problems


def question_text(problem: dict, single_pred_prompt: bool) -> str:
    """The human turn without its image tag, plus the letter-only instruction when asked for."""
    text = problem["conversations"][0]["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
    return f"{text}\n{SINGLE_PRED_PROMPT}" if single_pred_prompt else text


def to_question(problem: dict, image_folder: str, single_pred_prompt: bool, where: str) -> Question:
    if not isinstance(problem, dict):
        raise RunError(f"{where}: expected a JSON object, got {type(problem).__name__}")
    question_id = question_field(problem, "id", (str, int), where)
    image_path = question_image(problem, image_folder, where)
    text = question_text(problem, single_pred_prompt)
    return Question(
        question_id=question_id,
        text=text,
        image_path=image_path,
        record={"prompt": f"{DEFAULT_IMAGE_TOKEN}\n{text}" if image_path else text},
    )


def questions_from_file(args: argparse.Namespace) -> list[Question]:
    problems = read_problem_list(args.question_file)
    if not problems:
        raise RunError(f"question file {args.question_file} holds no questions")
    questions = []
    for number, problem in enumerate(problems, start=1):
        where = f"question file {args.question_file}, question {number}"
        try:
            questions.append(to_question(problem, args.image_folder, args.single_pred_prompt, where))
        except (KeyError, IndexError, TypeError, AttributeError) as error:
            raise RunError(
                f"question file {args.question_file}, question {number}: needs 'id' and 'conversations' "
                f"with a human turn 'value' ({error!r})"
            ) from None
    return questions


def main(argv: list[str] | None = None) -> None:
    run_cli(build_parser(), questions_from_file, argv, identity_args=IDENTITY_ARGS)


if __name__ == "__main__":
    main()
