"""Answer MMBench (a TSV with base64 images) and write LLaVA's answers JSONL.

    python -m llava.eval.model_vqa_mmbench --model-path M --question-file mmbench_dev_20230712.tsv \
        --answers-file A --lang en --single-pred-prompt [--all-rounds] --temperature 0 --conv-mode vicuna_v1

The prompt is the hint (when there is one), the question, and one "X. option" line per option. With
`--all-rounds` every question is asked once per option, the options rotated by one more place each
round (MMBench's circular evaluation); each answers line records its round_id, the options in the
order shown, their letters, and the right letter for that order. `question_id` is the TSV index.
Every row's image cell is checked before the model loads (valid base64, an image PIL can identify), and
the first bad one is named by its line and index.
"""

from __future__ import annotations

import argparse
import base64
import binascii
from collections.abc import Callable
from io import BytesIO

from PIL import Image, UnidentifiedImageError

from llava.eval.option_letters import option_letters
from llava.eval.answering.loop import (
    Question,
    RunError,
    add_model_args,
    run_cli,
)
from llava.eval.scoring.mmbench import (
    IMAGE_COLUMN,
    MMBenchError,
    MMBenchRow,
    is_missing,
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


def image_bytes(row: MMBenchRow) -> bytes:
    """The row's image cell decoded from base64 (as LLaVA decodes it: characters outside the alphabet
    are skipped); ValueError names what is wrong with the cell."""
    if is_missing(row.image):  # "nan" too: how pandas writes a missing value
        raise ValueError("its image cell is empty")
    try:
        return base64.b64decode(row.image)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"its image cell is not valid base64 ({error})") from None


def open_image(data: bytes) -> Image.Image:
    """PIL's image of the decoded cell (header read only); ValueError says why not."""
    try:
        return Image.open(BytesIO(data))
    except UnidentifiedImageError:  # its message names only a BytesIO object
        raise ValueError(f"its image cell is base64 but not an image ({len(data)} bytes in no format PIL "
                         "knows)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"its image cell is base64 but not a readable image ({error})") from None


def image_problem(row: MMBenchRow) -> str | None:
    """What keeps the row's image from being read, or None: the base64 decodes and PIL knows the format
    from its header (cheap: the pixels are decoded when the question is asked)."""
    try:
        open_image(image_bytes(row)).close()
    except ValueError as error:
        return str(error)
    return None


def check_images(header: list[str], rows: list[MMBenchRow], path: str) -> None:
    """Every row's image decodes, checked before the model loads (as image files are): names the first bad
    cell by its file, line and index, and counts the rest."""
    if IMAGE_COLUMN not in header:
        raise RunError(f"question file {path!r} has no {IMAGE_COLUMN!r} column (MMBench's base64 images); "
                       f"it has {header}")
    problems = [(row, problem) for row in rows if (problem := image_problem(row)) is not None]
    if problems:
        row, problem = problems[0]
        more = f" (and {len(problems) - 1} more of the {len(rows)} rows)" if len(problems) > 1 else ""
        raise RunError(f"question file {path!r}, line {row.line} (index {row.index}): {problem}{more}")


def image_loader(row: MMBenchRow) -> Callable[[], Image.Image]:
    """Decode the row's base64 image only when its question is asked (the TSV holds thousands)."""

    def load() -> Image.Image:
        try:
            with open_image(image_bytes(row)) as image:
                return as_rgb(image)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
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
        header, rows = read_mmbench(args.question_file)
    except MMBenchError as error:
        raise RunError(str(error)) from None
    check_images(header, rows, args.question_file)
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
