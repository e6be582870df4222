"""lmms-eval's `model_args` for our model `mustdrop`, turned into the answering CLIs' validated settings.

Kept apart from llava/eval/lmms_eval_model.py (which subclasses lmms-eval's model class) so that these
rules are tested without lmms-eval installed. `model_args` are the CLIs' flags by their underscore
names (`pretrained` is --model-path); the CLIs' own parser validates them, so a value is refused here
exactly as `model_vqa_loader` refuses it. Any other key is an option of the method (what
`--method-args` takes, e.g. `method=pdrop,drop_after=1;5;11`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
from dataclasses import dataclass

from llava.drop.generate import SamplingConfig
from llava.drop.methods import DropMethod
from llava.eval.answering.loop import (
    add_model_args,
    check_model_fits,
    load_model,
    resolve_conv_mode,
    validate_args,
)
from llava.eval.cli_errors import RunError
from llava.eval.lmms_plugin import MODEL_NAME

# model_args that are the CLIs' flags (the rest are the method's options); the CLIs' defaults hold
# where a key is absent, except conv_mode, which is the checkpoint's own (auto) here.
FLAGS = {"pretrained": "--model-path", "model_base": "--model-base", "vision_tower": "--vision-tower",
         "device": "--device", "dtype": "--dtype", "device_map": "--device-map", "conv_mode": "--conv-mode",
         "method": "--method", "budget": "--budget", "keep": "--keep", "seed": "--seed", "global_thr": "--global_thr",
         "individual_thr": "--individual_thr", "merge_thr": "--merge_thr", "key_rate": "--key_rate",
         "drop_layers": "--drop_layers", "next_layout": "--next_layout", "max_new_tokens": "--max_new_tokens"}
SWITCHES = {"sparse": "--sparse", "no_merge": "--no_merge", "compile": "--compile", "cuda_graph": "--cuda-graph",
            "load_8bit": "--load-8bit", "load_4bit": "--load-4bit"}
DEFAULT_CONV_MODE = "auto"
GREEDY = 0.0  # lmms-eval tasks decode greedily unless their generation kwargs say otherwise


def cli_flags(model_args: dict) -> list[str]:
    """model_args (as lmms-eval parsed them: strings, numbers, booleans) as the answering CLIs' argv."""
    argv, method_options = ["--conv-mode", DEFAULT_CONV_MODE], []
    for key, value in model_args.items():
        if key in SWITCHES:
            if value not in (True, False):
                raise ValueError(f"model_args {key}={value!r}: expected true or false")
            argv += [SWITCHES[key]] if value else []
        elif key in FLAGS:
            argv += [FLAGS[key], str(value)]
        else:
            method_options.append(f"{key}={value}")
    if "pretrained" not in model_args:
        raise ValueError("model_args needs pretrained=<checkpoint path>")
    return argv + (["--method-args", ",".join(method_options)] if method_options else [])


def parse_model_args(model_args: dict) -> argparse.Namespace:
    """The CLIs' parsed and validated flags for these model_args; a bad one is one ValueError line."""
    parser = argparse.ArgumentParser(prog=f"lmms-eval --model {MODEL_NAME}", add_help=False, exit_on_error=False)
    add_model_args(parser)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parser.parse_args(cli_flags(model_args))
    except (argparse.ArgumentError, SystemExit) as error:
        message = str(error) if isinstance(error, argparse.ArgumentError) else errors.getvalue().strip().splitlines()[-1]
        raise ValueError(f"model_args: {message}") from None


def sampling_from(gen_kwargs: dict, max_new_tokens: int, seed: int | None) -> tuple[SamplingConfig, tuple[str, ...]]:
    """The task's generation kwargs as our sampling settings and its `until` stop strings."""
    until = gen_kwargs.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    if int(gen_kwargs.get("num_beams", 1)) != 1:
        raise ValueError(f"num_beams={gen_kwargs['num_beams']}: beam search is not supported; use num_beams=1")
    temperature = float(gen_kwargs.get("temperature", GREEDY)) if gen_kwargs.get("do_sample", True) else GREEDY
    sampling = SamplingConfig(int(gen_kwargs.get("max_new_tokens", max_new_tokens)), temperature,
                              gen_kwargs.get("top_p"), seed)
    return sampling, until


@dataclass
class LoadedRun:
    """What one lmms-eval run of `mustdrop` holds: its settings, method and loaded checkpoint."""

    args: argparse.Namespace
    drop: DropMethod
    tokenizer: object
    model: object
    image_processor: object


def load_run(model_args: dict, batch_size: int) -> LoadedRun:
    """Validate `model_args` as the CLIs do (before any weight loads), then load the checkpoint; any
    problem is one ValueError line."""
    try:
        args = parse_model_args(model_args)
        args.batch_size = batch_size
        if batch_size < 1:
            raise RunError(f"--batch_size must be at least 1, got {batch_size}")
        _, drop = validate_args(args)
        resolve_conv_mode(args)
        check_model_fits(args, drop)
        tokenizer, model, image_processor, _ = load_model(args)
    except RunError as error:
        raise ValueError(str(error)) from None
    return LoadedRun(args, drop, tokenizer, model, image_processor)
