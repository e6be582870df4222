"""Generate the small bundled TextVQA-style demo set (images, LLaVA question file, annotations).

    python -m llava.eval.make_demo_data --out playground/data/eval/demo

The output is deterministic (fixed seed), so the committed files can be regenerated and compared.
Images come in varied sizes and aspect ratios so that pad-to-square preprocessing is exercised.
A second question file holds the one question the demo asks LLaVA-NeXT: that of the widest image,
which anyres tiles into a base image and two crops (no extra image, so the set stays twelve).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features

from llava.eval.cli_errors import interruptible
from llava.eval.scoring.vqa_accuracy import HUMAN_ANSWERS_PER_QUESTION

SEED = 1234
QUESTION_FILE = "llava_textvqa_demo.jsonl"
ANNOTATION_FILE = "TextVQA_demo_annotations.json"
IMAGE_DIR = "images"
IMAGE_ID_BITS = 64  # 16 hex characters, like TextVQA image ids
FIRST_QUESTION_ID = 34602  # where TextVQA val question ids start
ANSWER_SUFFIX = "Answer the question using a single word or phrase."
TEXT_FRACTION = 0.8  # the drawn text spans at most this share of the image width and height
LARGEST_FONT_SIZE = 120
SMALLEST_FONT_SIZE = 10
DARK_TEXT_LUMINANCE = 140  # backgrounds brighter than this get black text, others white
ODD_ANSWER_COUNT = 1
NEXT_QUESTION_FILE = "llava_next_demo.jsonl"
NEXT_ITEM_TEXT = "ONE WAY"  # 500x160: a 672x336 grid, so a base image and two crops


@dataclass(frozen=True)
class DemoItem:
    """One image and its question; every variant normalises to the same answer, `odd` does not."""

    text: str
    size: tuple[int, int]
    question: str
    ocr_tokens: tuple[str, ...]
    variants: tuple[str, ...]
    odd: str


ITEMS = (
    DemoItem("STOP", (320, 200), "what does the sign say?", ("STOP", "ahead"),
             ("stop", "STOP", "Stop", "stop."), "stop sign"),
    DemoItem("7", (180, 300), "what number is shown?", ("7",),
             ("7", "seven", "Seven", "7."), "17"),
    DemoItem("COFFEE", (400, 400), "what drink is advertised?", ("COFFEE", "fresh"),
             ("coffee", "Coffee", "COFFEE"), "cafe"),
    DemoItem("EXIT", (300, 120), "what does the banner say?", ("EXIT",),
             ("exit", "Exit", "EXIT!"), "exit sign"),
    DemoItem("2.5", (150, 260), "what price is shown?", ("2.5",),
             ("2.5", "2.5.", " 2.5"), "2.50"),
    DemoItem("1,000", (256, 256), "how many points are shown?", ("1,000", "pts"),
             ("1,000", "1000", "1,000."), "100"),
    DemoItem("OPEN", (420, 180), "is the shop open or closed?", ("OPEN",),
             ("open", "Open", "OPEN"), "closed"),
    DemoItem("COCA-COLA", (260, 340), "what brand is shown?", ("COCA-COLA",),
             ("coca-cola", "Coca-Cola", "the coca-cola.", "coca cola"), "coke"),
    DemoItem("TAXI", (360, 240), "what is written on the roof sign?", ("TAXI",),
             ("taxi", "Taxi", "a taxi"), "cab"),
    DemoItem("42", (120, 200), "what is the jersey number?", ("42",),
             ("42", "42.", "42!"), "24"),
    DemoItem("DON'T", (336, 336), "what word is written in the box?", ("DON'T", "walk"),
             ("don't", "dont", "Don't"), "do not"),
    DemoItem("ONE WAY", (500, 160), "what does the street sign say?", ("ONE", "WAY"),
             ("one way", "One Way", "one-way", "1 way"), "oneway"),
)


def _fits(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, size: tuple[int, int]) -> bool:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left <= size[0] * TEXT_FRACTION and bottom - top <= size[1] * TEXT_FRACTION


def _largest_font(draw: ImageDraw.ImageDraw, text: str, size: tuple[int, int]) -> ImageFont.ImageFont:
    """PIL's bundled scalable font at the largest size that fits; its fixed bitmap font without FreeType."""
    if not features.check_module("freetype2"):
        return ImageFont.load_default()
    for font_size in range(LARGEST_FONT_SIZE, SMALLEST_FONT_SIZE, -1):
        font = ImageFont.load_default(size=font_size)
        if _fits(draw, text, font, size):
            return font
    return ImageFont.load_default(size=SMALLEST_FONT_SIZE)


def render_image(item: DemoItem, rng: random.Random) -> Image.Image:
    """A flat random background with the item's text centred in a contrasting colour."""
    background = tuple(rng.randrange(256) for _ in range(3))
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    ink = (0, 0, 0) if luminance > DARK_TEXT_LUMINANCE else (255, 255, 255)
    image = Image.new("RGB", item.size, background)
    draw = ImageDraw.Draw(image)
    font = _largest_font(draw, item.text, item.size)
    center = (item.size[0] / 2, item.size[1] / 2)
    draw.text(center, item.text, fill=ink, font=font, anchor="mm")
    return image


def human_answers(item: DemoItem, rng: random.Random) -> list[str]:
    """Ten answers: nine drawn from the variants (each variant at least once) plus the odd one."""
    count = HUMAN_ANSWERS_PER_QUESTION - ODD_ANSWER_COUNT
    answers = list(item.variants) + [rng.choice(item.variants) for _ in range(count - len(item.variants))]
    answers.append(item.odd)
    rng.shuffle(answers)
    return answers


def question_prompt(item: DemoItem) -> str:
    """The prompt in LLaVA's TextVQA question-file layout (question, OCR tokens, instruction)."""
    return f"{item.question}\nReference OCR token: {', '.join(item.ocr_tokens)}\n{ANSWER_SUFFIX}"


def write_questions(path: Path, questions: list[dict]) -> None:
    """A LLaVA question file: one JSON object a line."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(question) + "\n" for question in questions)


def make_demo_data(out_dir: Path, seed: int = SEED) -> None:
    """Write images/, the question files and the annotation file under `out_dir`."""
    rng = random.Random(seed)
    (out_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    questions, annotations = [], []
    for index, item in enumerate(ITEMS):
        image_id = f"{rng.getrandbits(IMAGE_ID_BITS):016x}"
        render_image(item, rng).save(out_dir / IMAGE_DIR / f"{image_id}.png", optimize=True)
        questions.append(
            {"question_id": image_id, "image": f"{image_id}.png", "text": question_prompt(item), "category": "default"}
        )
        annotations.append(
            {
                "question": item.question,
                "image_id": image_id,
                "image_classes": [],
                "flickr_original_url": "",
                "flickr_300k_url": "",
                "image_width": item.size[0],
                "image_height": item.size[1],
                "answers": human_answers(item, rng),
                "question_tokens": item.question.rstrip("?").split(),
                "question_id": FIRST_QUESTION_ID + index,
                "set_name": "val",
            }
        )
    write_questions(out_dir / QUESTION_FILE, questions)
    write_questions(out_dir / NEXT_QUESTION_FILE,
                    [question for item, question in zip(ITEMS, questions) if item.text == NEXT_ITEM_TEXT])
    dataset = {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": annotations}
    (out_dir / ANNOTATION_FILE).write_text(json.dumps(dataset, indent=1) + "\n", encoding="utf-8")


@interruptible
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory, e.g. playground/data/eval/demo")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    make_demo_data(args.out, args.seed)


if __name__ == "__main__":
    main()
