"""Answer MMBench (a TSV with base64 images) and write LLaVA's answers JSONL.

    python -m llava.eval.model_vqa_mmbench --model-path M --question-file mmbench_dev_20230712.tsv \
        --answers-file A --lang en --single-pred-prompt [--all-rounds] --temperature 0 --conv-mode vicuna_v1

The prompt is the hint (when there is one), the question, and one "X. option" line per option. With
`--all-rounds` every question is asked once per option, the options rotated by one more place each
round (MMBench's circular evaluation); each answers line records its round_id, the options in the
order shown, their letters, and the right letter for that order. `question_id` is the TSV index.
"""

from __future__ import annotations

import argparse
import base64
import binascii
from collections.abc import Callable
from io import BytesIO

from PIL import Image

from llava.eval.option_letters import option_letters
from llava.eval.answering.loop import (
    Question,
    RunError,
    add_model_args,
    run_cli,
)
from llava.eval.scoring.mmbench import (
    MMBenchError,
    MMBenchRow,
    read_mmbench,
    rotate,
    round_answer,
)
from llava.mm_utils import as_rgb

SINGLE_PRED_PROMPTS = {
    "en": "Answer with the option's letter from the given choices directly.",
    "cn": "请直接回答选项字母。",
}
IDENTITY_ARGS = ("lang", "single_pred_prompt", "all_rounds")  # prompt flags a resumed run must share


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--question-file", type=str, required=True, help="MMBench TSV")
    parser.add_argument("--lang", type=str, default="en", choices=sorted(SINGLE_PRED_PROMPTS))
    parser.add_argument("--single-pred-prompt", action=argparse.BooleanOptionalAction, default=True,
                        help="ask for the option letter only (LLaVA-1.5's evaluation prompt; on by default)")
    parser.add_argument("--all-rounds", action="store_true", help="ask every circular rotation of the options")
    add_model_args(parser)
    return parser


def base_prompt(row: MMBenchRow, options: list[str]) -> str:
    """Hint, question and the lettered options, one per line (the answers line's "prompt")."""
    lines = [row.hint, row.question] if row.hint is not None else [row.question]
    letters = option_letters(len(options))
    lines += [f"{letter}. {option}" for letter, option in zip(letters, options)]
    return "\n".join(lines)


def image_loader(row: MMBenchRow) -> Callable[[], Image.Image]:
    """Decode the row's base64 image only when its question is asked (the TSV holds thousands)."""

    def load() -> Image.Image:
        try:
            with Image.open(BytesIO(base64.b64decode(row.image))) as image:
                return as_rgb(image)
        except (binascii.Error, OSError, ValueError) as error:
            raise RunError(f"question {row.index}: cannot decode its base64 image ({error})") from None

    return load


def round_question(row: MMBenchRow, round_id: int, instruction: str | None) -> Question:
    """Question `row` with its options rotated for round `round_id`."""
    options = rotate(row.options, round_id)
    prompt = base_prompt(row, options)
    record = {"round_id": round_id, "prompt": prompt, "options": options,
              "option_char": option_letters(len(options))}
    if row.answer is not None:
        record["answer"] = round_answer(row, round_id)
    return Question(
        question_id=row.index,
        text=f"{prompt}\n{instruction}" if instruction else prompt,
        image_loader=image_loader(row),
        record=record,
    )


def questions_from_file(args: argparse.Namespace) -> list[Question]:
    try:
        _, rows = read_mmbench(args.question_file)
    except MMBenchError as error:
        raise RunError(str(error)) from None
    instruction = SINGLE_PRED_PROMPTS[args.lang] if args.single_pred_prompt else None
    return [
        round_question(row, round_id, instruction)
        for row in rows
        for round_id in range(len(row.options) if args.all_rounds else 1)
    ]


def main(argv: list[str] | None = None) -> None:
    run_cli(build_parser(), questions_from_file, argv, identity_args=IDENTITY_ARGS)


if __name__ == "__main__":
    main()
