"""Answer a LLaVA question file (one JSON object per line) and write LLaVA's answers JSONL.

    python -m llava.eval.model_vqa_loader --model-path M --question-file Q --image-folder I \
        --answers-file A --temperature 0 --conv-mode vicuna_v1 [--sparse --global_thr G --individual_thr T]

Each answer is on disk as soon as it is written; running the same command again continues after the
last answered question. `--num-chunks/--chunk-idx` split the questions as LLaVA does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import shortuuid
from tqdm import tqdm

from llava.conversation import get_conv_template
from llava.drop.config import (
    DEFAULT_GLOBAL_THR,
    DEFAULT_INDIVIDUAL_THR,
    DROP_LAYERS,
    KEY_TOKEN_RATE,
    MERGE_THRESHOLD,
    DropConfig,
)
from llava.drop.generate import SamplingConfig
from llava.eval.answering import Answerer
from llava.eval.summary import summarize_answers, summary_line
from llava.eval.answers_file import get_chunk, open_for_append, read_jsonl, resume_position, write_line
from llava.mm_utils import load_image
from llava.model.builder import load_pretrained_model
from llava.model.checkpoint_files import CheckpointError


class RunError(Exception):
    """A problem with the run's inputs; main() prints it and exits without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", type=str, default="facebook/opt-350m")
    parser.add_argument("--model-base", type=str, default=None)
    parser.add_argument("--vision-tower", type=str, default=None, help="local CLIP tower dir (original layout)")
    parser.add_argument("--image-folder", type=str, default="")
    parser.add_argument("--question-file", type=str, default="tables/question.jsonl")
    parser.add_argument("--answers-file", type=str, default="answer.jsonl")
    parser.add_argument("--conv-mode", type=str, default="llava_v1")
    parser.add_argument("--num-chunks", type=int, default=1)
    parser.add_argument("--chunk-idx", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", type=str, default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", type=str, default=None, help="fp32, fp16 or bf16 (default: fp16 on cuda, fp32 on cpu)")
    parser.add_argument("--device-map", type=str, default=None, help="'auto' spreads the model over all GPUs")
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--load-4bit", action="store_true")
    parser.add_argument("--sparse", action="store_true", help="switch on MustDrop (all three stages)")
    parser.add_argument("--global_thr", type=float, default=DEFAULT_GLOBAL_THR)
    parser.add_argument("--individual_thr", type=float, default=DEFAULT_INDIVIDUAL_THR)
    parser.add_argument("--no_merge", action="store_true", help="with --sparse: skip stage 1's spatial merge")
    parser.add_argument("--merge_thr", type=float, default=MERGE_THRESHOLD, help="stage 1 window similarity threshold")
    parser.add_argument("--key_rate", type=float, default=KEY_TOKEN_RATE, help="share of patches in the key set")
    parser.add_argument("--drop_layers", type=str, default=",".join(map(str, DROP_LAYERS)),
                        help="comma-separated 0-based decoder layers where stage 2 drops")
    return parser


def drop_config_from_args(args: argparse.Namespace) -> DropConfig:
    """The MustDrop settings the flags ask for (validated even without --sparse, to catch typos)."""
    try:
        drop_layers = tuple(int(layer) for layer in args.drop_layers.split(",") if layer.strip())
    except ValueError:
        raise ValueError(f"--drop_layers must be comma-separated integers, got {args.drop_layers!r}") from None
    config = DropConfig(
        vision_merge=not args.no_merge, merge_threshold=args.merge_thr, key_token_rate=args.key_rate,
        drop_layers=drop_layers, global_thr=args.global_thr, individual_thr=args.individual_thr,
    )
    return config if args.sparse else DropConfig.disabled()


def validate_args(args: argparse.Namespace) -> tuple[SamplingConfig, DropConfig]:
    """Check every option before the (slow) model load, so mistakes fail in a second."""
    try:
        get_conv_template(args.conv_mode)
        sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
        drop = drop_config_from_args(args)
    except ValueError as error:
        raise RunError(str(error)) from None
    if args.num_beams != 1:
        raise RunError(f"--num_beams {args.num_beams}: beam search is not supported; use --num_beams 1")
    return sampling, drop


def run(args: argparse.Namespace) -> Path:
    sampling, drop = validate_args(args)
    try:
        questions = get_chunk(read_jsonl(args.question_file, "question file"), args.num_chunks, args.chunk_idx)
    except (OSError, ValueError) as error:
        raise RunError(str(error)) from None
    answers_path = Path(args.answers_file).expanduser()
    try:
        start = resume_position(answers_path, [q.get("question_id") for q in questions])
    except ValueError as error:
        raise RunError(str(error)) from None
    if start == len(questions):
        print(f"{answers_path}: all {len(questions)} questions already answered")
        print(summary_line(summarize_answers(read_jsonl(answers_path))))
        return answers_path
    try:
        tokenizer, model, image_processor, _ = load_pretrained_model(
            args.model_path, args.model_base, load_8bit=args.load_8bit, load_4bit=args.load_4bit,
            device_map=args.device_map, device=args.device, torch_dtype=args.dtype, vision_tower=args.vision_tower,
        )
    except (CheckpointError, ValueError) as error:
        raise RunError(str(error)) from None
    answerer = Answerer(tokenizer, model, image_processor, args.conv_mode, sampling, drop)
    model_id = Path(args.model_path.rstrip("/")).name
    with open_for_append(answers_path) as handle:
        for question in tqdm(questions[start:], initial=start, total=len(questions), desc="answering", unit="q"):
            image = None
            if question.get("image"):
                image_path = Path(args.image_folder) / question["image"]
                try:
                    image = load_image(image_path)
                except ValueError as error:
                    raise RunError(f"question {question.get('question_id')!r}: {error}") from None
            answer = answerer.answer(question["text"], image)
            write_line(handle, {
                "question_id": question.get("question_id"),
                "prompt": question["text"],
                "text": answer.text,
                "answer_id": shortuuid.uuid(),
                "model_id": model_id,
                "metadata": answer.stats,
            })
    print(summary_line(summarize_answers(read_jsonl(answers_path))))
    return answers_path


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except RunError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
