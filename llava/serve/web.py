"""Try methods side by side in the browser: one image, one question, each chosen method's answer next to
the unpruned model's, with what it kept at each stage, its vision tokens per layer, FLOPs and times.

    python -m llava.serve.web --model-path M [--host 127.0.0.1] [--port 7860] [--conv-mode auto] \
        [--temperature 0] [--max-new-tokens 512] [--device cuda] [--dtype fp16] [--load-4bit ...]

Needs the `web` extra (`pip install -e ".[web]"`: Gradio). The model is loaded once and shared; requests
wait in a queue and run one at a time. It listens on 127.0.0.1 only unless --host says otherwise (e.g.
0.0.0.0 to reach it from other machines). Every flag, the checkpoint's config and the port are checked
before the model loads; a bad one ends the command with one `error:` line.
"""

from __future__ import annotations

import argparse
import socket

from llava.conversation import get_conv_template
from llava.drop.generate import SamplingConfig
from llava.drop.methods import DropMethod
from llava.eval.answering.loop import (
    add_generation_args,
    add_loading_args,
    check_decode_step_args,
    check_model_fits,
    decode_step_args,
    load_model,
    resolve_conv_mode,
)
from llava.eval.cli_errors import RunError, main_guard
from llava.model.conv_mode import AUTO_CONV_MODE

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860  # Gradio's and LLaVA's web demo's
# Greedy, so that a method's answer differs from the unpruned model's only by what it dropped
WEB_DEFAULTS = {"temperature": 0.0, "max_new_tokens": 512, "conv_mode": AUTO_CONV_MODE}
WEB_EXTRA = 'pip install -e ".[web]"'
WEB_LIBRARIES = ("gradio", "matplotlib")  # the `web` extra's


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loading_args(parser, model_path_required=True)
    parser.add_argument("--host", type=str, default=DEFAULT_HOST, help="the address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    add_generation_args(parser)
    parser.set_defaults(**WEB_DEFAULTS)
    return parser


def check_can_listen(host: str, port: int) -> None:
    """Bind the address for a moment, so that a port in use or a wrong host fails before the model loads."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
            probe.bind((host, port))
    except OSError as error:  # in use, not this machine's address, a name that does not resolve
        raise RunError(f"cannot listen on {host}:{port}: {error}") from None


def import_page():
    """llava.serve.page, or a RunError that says how to install what it needs."""
    try:
        from llava.serve import page
    except ModuleNotFoundError as error:
        if error.name not in WEB_LIBRARIES:
            raise
        raise RunError(f"the web page needs {error.name}: {WEB_EXTRA}") from None
    return page


def validate(args: argparse.Namespace):
    """Every check that needs no weights: sampling, template, decode-step flags, the address, the libraries,
    the checkpoint's config. Returns the sampling settings and the page's module."""
    try:
        sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
        if args.conv_mode != AUTO_CONV_MODE:
            get_conv_template(args.conv_mode)
    except ValueError as error:
        raise RunError(str(error)) from None
    check_decode_step_args(args)
    if not 1 <= args.port <= 65535:
        raise RunError(f"--port must be between 1 and 65535, got {args.port}")
    check_can_listen(args.host, args.port)
    page = import_page()
    resolve_conv_mode(args)
    check_model_fits(args, DropMethod())  # a missing or broken checkpoint, before any weight loads
    return sampling, page


def run(args: argparse.Namespace) -> None:
    """Check everything, load the model once, warm it up, serve the page until Ctrl-C."""
    sampling, page = validate(args)
    from llava.serve.side_by_side import SideBySide  # needs matplotlib, which `validate` found

    tokenizer, model, image_processor, _ = load_model(args)
    side_by_side = SideBySide(tokenizer, model, image_processor, args.conv_mode, sampling, decode_step_args(args))
    side_by_side.warm_up()
    page.build_page(side_by_side).launch(server_name=args.host, server_port=args.port, theme=page.theme(),
                                         show_error=True)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    main_guard(lambda: run(args))


if __name__ == "__main__":
    main()
