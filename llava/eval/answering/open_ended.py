"""LLaVA's `model_vqa` CLI (used for MM-Vet): the same flags, question lines and answers file as
`model_vqa_loader`, which it reuses; LLaVA kept two entry points, so scripts written for either work.

    python -m llava.eval.model_vqa --model-path M --question-file Q --image-folder I \
        --answers-file A --temperature 0 --conv-mode vicuna_v1 [--sparse --global_thr G --individual_thr T]
"""

from __future__ import annotations

import argparse

from llava.eval.answering import vqa
from llava.eval.answering.vqa import questions_from_file
from llava.eval.answering.loop import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = vqa.build_parser()
    parser.description = __doc__
    return parser


def main(argv: list[str] | None = None) -> None:
    run_cli(build_parser(), questions_from_file, argv)


if __name__ == "__main__":
    main()
