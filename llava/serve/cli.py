"""Chat about one image in the terminal, with token dropping: LLaVA's `llava.serve.cli`.

    python -m llava.serve.cli --model-path M --image-file IMAGE_OR_URL [--temperature 0] \
        [--sparse --global_thr G --individual_thr I | --method NAME --budget B --method-args K=V,...]

Type a message after `USER:`; the answer is printed token by token as it is decoded, then one line of
statistics (vision tokens after each stage, KV-cache size, prefill time, decode tokens/s). Every turn
is prompted with the whole conversation so far. An empty line, the end of input (so it can be scripted:
`printf 'Describe it.\\nAnd the colours?\\n' | python -m llava.serve.cli ...`) or Ctrl-C ends the chat.
The conversation template is the checkpoint's own unless --conv-mode says otherwise.
"""

from __future__ import annotations

import argparse
import signal
import sys

import torch
from transformers import TextStreamer

from llava.drop.generate import ContextLengthError
from llava.eval.answering.answerer import Answerer
from llava.eval.answering.loop import (
    add_drop_args,
    add_generation_args,
    add_loading_args,
    check_model_fits,
    decode_step_args,
    load_model,
    resolve_conv_mode,
    validate_generation_args,
)
from llava.eval.cli_errors import RunError, main_guard
from llava.mm_utils import ImageLoadError
from llava.model.conv_mode import AUTO_CONV_MODE
from llava.serve.chat import Chat
from llava.serve.image_source import open_image
from llava.serve.stats_line import stats_line

# LLaVA's chat defaults: sample at 0.2, answers up to 512 tokens, the checkpoint's own template
CHAT_DEFAULTS = {"temperature": 0.2, "max_new_tokens": 512, "conv_mode": AUTO_CONV_MODE}
USER_PROMPT, ASSISTANT_PROMPT = "USER: ", "ASSISTANT: "  # shown for every template (ChatML's roles are markup)
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT  # 130, what a shell reports for a Ctrl-C'd command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loading_args(parser, model_path_required=True)
    parser.add_argument("--image-file", type=str, required=True, help="the image to talk about: a path or an http(s) URL")
    add_generation_args(parser)
    add_drop_args(parser)
    parser.set_defaults(**CHAT_DEFAULTS)
    return parser


def talk(chat: Chat, tokenizer) -> None:
    """Read a message, stream its answer, print the answer's statistics; until an empty line or the end of input."""
    while True:
        try:
            message = input(USER_PROMPT)
        except EOFError:
            print()  # end the prompt's line
            return
        if not message.strip():
            return
        print(ASSISTANT_PROMPT, end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_special_tokens=True)
        try:
            answer = chat.ask(message, on_token=lambda token: streamer.put(torch.tensor([token])))
        except ContextLengthError as error:
            print()  # end the assistant's line
            raise RunError(f"{error}: the conversation no longer fits; start a new chat") from None
        streamer.end()
        print(stats_line(answer.stats), flush=True)


def run(args: argparse.Namespace) -> None:
    """Check every flag and the image, then load the model and chat."""
    sampling, drop = validate_generation_args(args)
    try:
        image = open_image(args.image_file)
    except ImageLoadError as error:
        raise RunError(str(error)) from None
    resolve_conv_mode(args)
    check_model_fits(args, drop)
    tokenizer, model, image_processor, _ = load_model(args)
    answerer = Answerer(tokenizer, model, image_processor, args.conv_mode, sampling, drop, **decode_step_args(args))
    talk(Chat(answerer, image), tokenizer)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        main_guard(lambda: run(args))
    except KeyboardInterrupt:
        print("\nchat ended (Ctrl-C)", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
