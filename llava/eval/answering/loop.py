"""The answering loop every benchmark CLI shares: LLaVA's flags, sharding, resume, progress, errors.

A benchmark CLI turns its own question format into a list of `Question`s and calls `run_questions`;
everything else (model loading, MustDrop switches, flushing each answer, resuming after a kill,
the run summary line) lives here once.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import shortuuid
import torch
from PIL import Image
from tqdm import tqdm

from llava.conversation import get_conv_template
from llava.drop.methods.mustdrop import (
    DEFAULT_GLOBAL_THR,
    DEFAULT_INDIVIDUAL_THR,
    DROP_AFTER,
    FLAT_LAYOUT,
    KEY_SHARE,
    MERGE_THRESHOLD,
    NEXT_LAYOUTS,
    DropConfig,
)
from llava.drop.generate import COMPILE_BACKEND, SamplingConfig
from llava.drop.methods import DropMethod, create_method, parse_method_args
from llava.drop.methods.registry import option_names
from llava.eval.answering.answerer import Answerer
from llava.eval.answering.answers_file import (
    ASKED_KEY,
    RUN_KEY,
    finished_lines,
    get_chunk,
    locked_answers_file,
    open_for_append,
    resume_position,
    write_line,
)
from llava.eval.cli_errors import (  # noqa: F401  (RunError, main_guard re-exported for the CLIs)
    Interrupted,
    RunError,
    interruptible,
    kept_note,
    main_guard,
    refuse_non_finite_flags,
    refuse_non_finite_options,
)
from llava.eval.jsonl import iter_jsonl, read_jsonl
from llava.eval.answering.sharding import Shard, launcher_shard, merged_answers, replace_if_changed, shard_path
from llava.eval.scoring.summary import summarize_answers, summary_line
from llava.mm_utils import ImageLoadError, check_image_header, load_image
from llava.model.builder import (
    check_device,
    check_quantization,
    default_device,
    load_pretrained_model,
    read_config,
    resolve_dtype,
    resolve_model_dir,
)
from llava.model.checkpoint_files import CheckpointError
from llava.model.conv_mode import AUTO_CONV_MODE, detect_conv_mode
from llava.model.geometry import read_geometry
from llava.model.qwen import QWEN_CONV_MODE, is_qwen_config


@dataclass
class Question:
    """One question, already in the text the model is asked (benchmark prompt rules applied)."""

    question_id: Any
    text: str
    image_path: Path | None = None
    image_loader: Callable[[], Image.Image] | None = None  # for images not stored as files (MMBench)
    record: dict = field(default_factory=dict)  # fields written to the answers line besides the answer

    def load_image(self) -> Image.Image | None:
        if self.image_loader is not None:
            return self.image_loader()
        if self.image_path is None:
            return None
        try:
            return load_image(self.image_path)
        except ValueError as error:
            raise RunError(f"question {self.question_id!r}: {error}") from None


def check_images_readable(questions: list[Question]) -> None:
    """Open the header of every image these questions read, before the model loads: a 7B load should not
    come before "image not found" on question 1. Names the first unreadable image and counts the rest."""
    problems = []
    for question in questions:
        if question.image_path is not None:
            try:
                check_image_header(question.image_path)
            except ImageLoadError as error:
                problems.append(f"question {question.question_id!r}: {error}")
    if problems:
        more = f" (and {len(problems) - 1} more of the {len(questions)} questions)" if len(problems) > 1 else ""
        raise RunError(f"{problems[0]}{more}")


def question_image(record: dict, image_folder: str, where: str) -> Path | None:
    """The image of a question line: its "image" under the image folder, None for a text-only question (no
    "image" field, or null). An empty name is refused: answering it text-only would silently change the task."""
    image = question_field(record, "image", (str,), where, required=False)
    if image is not None and not image.strip():
        raise RunError(f"{where}: 'image' is empty; name the image file, or leave the field out for a text-only "
                       "question")
    return Path(image_folder) / image if image is not None else None


def add_loading_args(parser: argparse.ArgumentParser, model_path_required: bool = False) -> None:
    """Where the checkpoint is and how to place it (LLaVA's flags plus device/dtype). `--model-path` has no
    default (LLaVA's, facebook/opt-350m, is no LLaVA checkpoint): argparse requires it, or `validate_args`
    does, for parsers the runner also reads without one."""
    parser.add_argument("--model-path", type=str, default=None, required=model_path_required)
    parser.add_argument("--model-base", type=str, default=None)
    parser.add_argument("--vision-tower", type=str, default=None, help="local CLIP tower dir (original layout)")
    parser.add_argument("--device", type=str, default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", type=str, default=None, help="fp32, fp16 or bf16 (default: fp16 on cuda, fp32 on cpu)")
    parser.add_argument("--device-map", type=str, default=None, help="'auto' spreads the model over all GPUs")
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--load-4bit", action="store_true")
    parser.add_argument("--min-pixels", type=int, default=None,
                        help="Qwen2-VL / Qwen2.5-VL: the fewest pixels an image is resized to (default: the checkpoint's)")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="Qwen2-VL / Qwen2.5-VL: the most pixels an image is resized to (default: the checkpoint's); "
                             "an image brings up to max_pixels / 784 vision tokens")


def add_stage_args(parser: argparse.ArgumentParser) -> None:
    """MustDrop's stage knobs other than the two thresholds."""
    parser.add_argument("--no_merge", action="store_true", help="with --sparse: skip stage 1's spatial merge")
    parser.add_argument("--merge_thr", type=float, default=MERGE_THRESHOLD, help="stage 1 window similarity threshold")
    parser.add_argument("--key_rate", type=float, default=KEY_SHARE,
                        help="share of patches in the key set (the option key_share)")
    parser.add_argument("--drop_layers", type=str, default=",".join(map(str, DROP_AFTER)),
                        help="comma-separated 0-based decoder layers after which stage 2 drops (the option drop_after)")
    parser.add_argument("--next_layout", choices=NEXT_LAYOUTS, default=FLAT_LAYOUT,
                        help="LLaVA-NeXT with --sparse: flat = the reference code's layout (base image, then each "
                             "crop), which produced the paper's NeXT numbers; spatial = the model's own layout with "
                             "its newline tokens (our extension)")


SEED_OPTION = "seed"  # a method option that --seed sets too
FINGERPRINT_CHARS = 16  # 64 bits of a question's SHA-256: a changed question is never taken for the old one


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """LLaVA's model, sampling and sharding flags, and the dropping switches."""
    add_loading_args(parser)
    parser.add_argument("--answers-file", type=str, default="answer.jsonl")
    parser.add_argument("--num-chunks", type=int, default=1)
    parser.add_argument("--chunk-idx", type=int, default=0)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1,
                        help="questions answered at once (each keeps its own prompt and vision tokens; greedy "
                             "answers equal batch size 1's)")
    add_generation_args(parser)
    add_drop_args(parser)


LLAVA_DEFAULT_CONV_MODE = "llava_v1"  # LLaVA's model_vqa default


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """How an answer is prompted and decoded: template, sampling, decode-step speed-ups (every CLI that answers)."""
    parser.add_argument("--conv-mode", type=str, default=None,
                        help="conversation template (llava/conversation.py), or auto: the checkpoint's own "
                             "(vicuna_v1, mistral_instruct, chatml_direct or qwen, from its config files); "
                             f"default: {LLAVA_DEFAULT_CONV_MODE} as LLaVA's CLIs, qwen for a Qwen checkpoint")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=128)
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step with torch.compile (pays a compilation per batch shape; "
                             "worth it on a GPU for long runs)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay the decode step as a CUDA graph (CUDA only): the same kernels, so the same "
                             "answers, without launching each layer's kernels from Python")
    parser.add_argument("--seed", type=int, default=None)


def add_drop_args(parser: argparse.ArgumentParser) -> None:
    """The dropping switches: --sparse (MustDrop and its knobs), or any registered --method."""
    parser.add_argument("--sparse", action="store_true", help="switch on MustDrop (all three stages)")
    parser.add_argument("--method", type=str, default=None,
                        help="token-dropping method: none, mustdrop (the default with --sparse), ... (see llava/drop/methods)")
    parser.add_argument("--method-args", type=str, default="", help="the method's options as key=value,key=value")
    parser.add_argument("--budget", type=float, default=None,
                        help="target layer-averaged vision tokens (e.g. 192/128/64); sets the method's budget option")
    parser.add_argument("--keep", type=float, default=None,
                        help="instead of --budget: the share in (0, 1] of each image's vision tokens to keep "
                             "(0.111 = 64/576); each prompt's budget is that share of its own vision tokens, "
                             "rounded half up; sets the method's keep_fraction option")
    parser.add_argument("--global_thr", type=float, default=DEFAULT_GLOBAL_THR)
    parser.add_argument("--individual_thr", type=float, default=DEFAULT_INDIVIDUAL_THR)
    add_stage_args(parser)


def drop_config_from_args(args: argparse.Namespace) -> DropConfig:
    """MustDrop's settings from its flags (validated even without --sparse, to catch typos)."""
    try:
        drop_layers = tuple(int(layer) for layer in args.drop_layers.split(",") if layer.strip())
    except ValueError:
        raise ValueError(f"--drop_layers must be comma-separated integers, got {args.drop_layers!r}") from None
    return DropConfig(
        vision_merge=not args.no_merge, merge_threshold=args.merge_thr, key_share=args.key_rate,
        drop_after=drop_layers, global_thr=args.global_thr, individual_thr=args.individual_thr,
        next_layout=args.next_layout,
    )


def method_from_args(args: argparse.Namespace) -> DropMethod:
    """--method/--method-args, with --sparse meaning MustDrop configured by its own flags."""
    mustdrop_options = drop_config_from_args(args)
    name = args.method or ("mustdrop" if args.sparse else "none")
    if args.sparse and name != "mustdrop":
        raise ValueError(f"--sparse switches on MustDrop; drop it to use --method {name}")
    base = mustdrop_options if name == "mustdrop" else None
    method_args = parse_method_args(args.method_args)
    refuse_non_finite_options(method_args)
    if args.budget is not None:
        if name == "none":
            raise ValueError("--budget needs a dropping method: add --sparse or --method NAME")
        method_args.setdefault("budget", str(args.budget))
    if args.keep is not None:
        if name == "none":
            raise ValueError("--keep needs a dropping method: add --sparse or --method NAME")
        if args.budget is not None:
            raise ValueError("--keep and --budget both set how many vision tokens to keep; give one")
        if not 0.0 < args.keep <= 1.0:
            raise ValueError(f"--keep is a share of each image's vision tokens in (0, 1], got {args.keep:g}")
        method_args.setdefault("keep_fraction", str(args.keep))
    if args.seed is not None and SEED_OPTION in option_names(name):  # e.g. random dropping's draw
        method_args.setdefault(SEED_OPTION, str(args.seed))
    return create_method(name, method_args, base_options=base)


def validate_args(args: argparse.Namespace) -> tuple[SamplingConfig, DropMethod]:
    """Check every option before the (slow) model load, so mistakes fail in a second (the flags' values
    first, then that a checkpoint was named at all)."""
    sampling, drop = validate_generation_args(args)
    try:
        get_chunk([], args.num_chunks, args.chunk_idx)
    except ValueError as error:
        raise RunError(str(error)) from None
    if args.num_beams != 1:
        raise RunError(f"--num_beams {args.num_beams}: beam search is not supported; use --num_beams 1")
    if args.batch_size < 1:
        raise RunError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.model_path is None:
        raise RunError("--model-path is required: a LLaVA checkpoint (a folder or a Hugging Face hub id)")
    return sampling, drop


def validate_generation_args(args: argparse.Namespace) -> tuple[SamplingConfig, DropMethod]:
    """The flags of `add_generation_args` and `add_drop_args`, checked before the model loads."""
    refuse_non_finite_flags(args)
    try:
        if args.conv_mode not in (None, AUTO_CONV_MODE):  # resolved from the checkpoint (resolve_conv_mode)
            get_conv_template(args.conv_mode)
        sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
        drop = method_from_args(args)
    except ValueError as error:
        raise RunError(str(error)) from None
    check_machine_args(args)
    check_decode_step_args(args)
    return sampling, drop


def check_machine_args(args: argparse.Namespace) -> None:
    """The device and quantisation asked for are ones this machine can run (before the load, not after)."""
    try:
        check_device(args.device or default_device())
        check_quantization(args.load_8bit, args.load_4bit)
    except ValueError as error:
        raise RunError(str(error)) from None


def check_decode_step_args(args: argparse.Namespace) -> None:
    if args.cuda_graph and args.compile:
        raise RunError("--cuda-graph and --compile both speed up the decode step; choose one")
    device = args.device or default_device()
    if args.cuda_graph and not str(device).startswith("cuda"):
        raise RunError(f"--cuda-graph needs a CUDA device; this run uses {device}")


def decode_step_args(args: argparse.Namespace) -> dict:
    """How the Answerer runs each decode step, from --compile and --cuda-graph."""
    return {"compile_backend": COMPILE_BACKEND if args.compile else None, "cuda_graph": args.cuda_graph}


def resolve_conv_mode(args: argparse.Namespace, llava_default: str = LLAVA_DEFAULT_CONV_MODE) -> None:
    """Replace --conv-mode auto by the checkpoint's own mode, from its config files before any weight
    loads, so that the prompts and the run identity (the resume check) both hold the real mode: resuming
    with auto or with the mode it picks is the same run. Said once per run (by its first shard). Without
    --conv-mode: LLaVA's default, or a Qwen checkpoint's own; a LLaVA template for a Qwen checkpoint is refused
    (its answers would be silently wrong)."""
    if args.conv_mode == AUTO_CONV_MODE:
        try:
            choice = detect_conv_mode(args.model_path, args.model_base)
        except CheckpointError as error:
            raise RunError(str(error)) from None
        shard = launcher_shard()
        if shard is None or shard.index == 0:
            print(f"conversation mode: {choice.mode} (from {choice.source})")
        args.conv_mode = choice.mode
        return
    qwen = is_qwen_checkpoint(args.model_path)
    if args.conv_mode is None:
        args.conv_mode = QWEN_CONV_MODE if qwen else llava_default
    elif qwen and args.conv_mode != QWEN_CONV_MODE:
        raise RunError(f"--conv-mode {args.conv_mode} is a LLaVA template; {args.model_path} is a Qwen checkpoint, "
                       f"prompted with its own chat template: --conv-mode {QWEN_CONV_MODE} (or auto)")


def is_qwen_checkpoint(model_path: str) -> bool:
    """From config.json alone; a checkpoint that cannot be read is left for the load to name."""
    try:
        return is_qwen_config(read_config(resolve_model_dir(model_path)))
    except CheckpointError:
        return False


def read_question_lines(path: str, what: str = "question file") -> list[tuple[int, dict]]:
    """Every question of a JSONL question file as (1-based line number, object); an empty file or a
    line that is not a JSON object stops the run, naming the file and line."""
    try:
        lines = list(iter_jsonl(path, what))
    except ValueError as error:
        raise RunError(str(error)) from None
    if not lines:
        raise RunError(f"{what} {path} holds no questions")
    for number, record in lines:
        if not isinstance(record, dict):
            raise RunError(f"{what} {path}, line {number}: expected a JSON object, got {type(record).__name__}")
    return lines


def question_field(record: dict, name: str, types: tuple[type, ...], where: str, required: bool = True) -> Any:
    """`record[name]` checked against `types` (bool is never accepted as an int); `where` names file and line."""
    if name not in record or record[name] is None:
        if required:
            raise RunError(f"{where}: lacks {name!r}")
        return None
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, types):
        expected = " or ".join(kind.__name__ for kind in types)
        raise RunError(f"{where}: {name!r} must be {expected}, got {type(value).__name__} {value!r}")
    return value


def load_model(args: argparse.Namespace):
    try:
        return load_pretrained_model(
            args.model_path, args.model_base, load_8bit=args.load_8bit, load_4bit=args.load_4bit,
            device_map=args.device_map, device=args.device, torch_dtype=args.dtype, vision_tower=args.vision_tower,
            min_pixels=args.min_pixels, max_pixels=args.max_pixels,
        )
    except (CheckpointError, ValueError) as error:
        raise RunError(str(error)) from None


def run_identity(args: argparse.Namespace, drop: DropMethod, extra_args: tuple[str, ...] = ()) -> dict:
    """The settings that decide what an answer is, recorded in every answers line so that a resumed
    file never mixes two runs; `extra_args` are a CLI's own prompt options (e.g. MMBench's --lang)."""
    options = getattr(drop, "options", None)
    try:
        dtype = resolve_dtype(args.dtype, args.device or default_device())
    except ValueError as error:
        raise RunError(str(error)) from None
    quantization = "8bit" if args.load_8bit else "4bit" if args.load_4bit else None
    identity = {
        "model_path": str(Path(args.model_path).expanduser()),
        "model_base": args.model_base,
        "method": drop.name,
        "method_options": recorded_options(options),
        "conv_mode": args.conv_mode,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": quantization,
        **{name: getattr(args, name) for name in ("min_pixels", "max_pixels") if getattr(args, name) is not None},
        **{name: getattr(args, name) for name in extra_args},
    }
    return json.loads(json.dumps(identity))  # tuples become lists, as they read back from the file


def recorded_options(options) -> dict:
    """A method's options as the run identity records them; an unset `keep_fraction` is left out, so that
    files answered before the option existed resume."""
    recorded = dataclasses.asdict(options) if options is not None else {}
    if recorded.get("keep_fraction", 0) is None:
        del recorded["keep_fraction"]
    return recorded


def check_model_fits(args: argparse.Namespace, drop: DropMethod) -> None:
    """Refuse layers and budgets the checkpoint cannot honour, from its config alone (before the load)."""
    try:
        geometry = read_geometry(args.model_path, args.vision_tower, args.max_pixels)
        drop.check_model(geometry)
    except CheckpointError as error:
        raise RunError(str(error)) from None
    except ValueError as error:
        raise RunError(f"--method {drop.name}: {error}") from None


def answer_id(model_id: str, question_id: Any, position: int) -> str:
    """A stable id per (model, question, position), so sharded and single runs write the same lines."""
    return shortuuid.uuid(name=f"{model_id}/{position}/{question_id}")


def run_questions(args: argparse.Namespace, questions: list[Question], identity_args: tuple[str, ...] = ()) -> Path:
    """Answer this chunk's questions into --answers-file, resuming after any finished lines.

    Under `torchrun` / `accelerate launch` (WORLD_SIZE > 1) each process takes the chunk of its
    RANK, writes a shard file and the last one to finish writes the merged --answers-file.
    """
    answers_path = Path(args.answers_file).expanduser()
    shard = launcher_shard()
    if shard is None:  # LLaVA's --num-chunks / --chunk-idx: this process's chunk is the answers file
        answer_shard(args, questions, Shard(args.chunk_idx, args.num_chunks, 0), answers_path, identity_args)
        print_summary_line(answers_path)
        return answers_path
    chunk_path = shard_path(answers_path, shard)
    answer_shard(args, questions, shard, chunk_path, identity_args)
    with locked_answers_file(answers_path, wait=True):
        merged = merged_answers(answers_path, questions, shard.count)
        if merged is not None:
            replace_if_changed(answers_path, merged)
            print(f"all {shard.count} shards complete: merged into {answers_path}")
    print_summary_line(chunk_path)
    return chunk_path


def print_summary_line(path: Path) -> None:
    """The run's one-line summary of the answers in `path` (a resumed file may hold another tool's lines)."""
    try:
        print(summary_line(summarize_answers(read_jsonl(path, "answers file"), f"answers file {path}")))
    except ValueError as error:
        raise RunError(str(error)) from None


def answer_shard(args: argparse.Namespace, questions: list[Question], shard: Shard, path: Path,
                 identity_args: tuple[str, ...] = ()) -> None:
    """Answer `shard`'s chunk of `questions` into `path`, resuming; a launched shard uses its own GPU."""
    sampling, drop = validate_args(args)
    resolve_conv_mode(args)
    if launcher_shard() is not None and args.device is None and torch.cuda.is_available():
        args.device = f"cuda:{shard.local_rank % torch.cuda.device_count()}"
    first_position = len(get_chunk(questions, shard.count, 0)) * shard.index
    chunk = get_chunk(questions, shard.count, shard.index)
    answer_chunk(args, chunk, path, first_position, sampling, drop, identity_args)


def answer_chunk(args: argparse.Namespace, chunk: list[Question], path: Path, first_position: int,
                 sampling: SamplingConfig, drop: DropMethod, identity_args: tuple[str, ...] = ()) -> None:
    """The loop proper: lock the file, skip finished lines, answer the rest, flush each line as written."""
    identity = run_identity(args, drop, identity_args)
    try:
        with locked_answers_file(path):
            fingerprints = [question_fingerprint(q, getattr(args, "image_folder", None)) for q in chunk]
            start = resume_position(path, [q.question_id for q in chunk], identity, fingerprints)
            if chunk and start == len(chunk):
                print(f"{path}: all {len(chunk)} questions already answered")
            elif chunk:
                check_images_readable(chunk[start:])
                check_model_fits(args, drop)
                answer_remaining(args, chunk, path, start, first_position, sampling, drop, identity, fingerprints)
        if not chunk:
            write_empty_chunk(path)
    except ValueError as error:  # answers-file problems (lock, resume); RunError passes through
        raise RunError(str(error)) from None
    except KeyboardInterrupt:  # after the lock's release: the file is whole, or gone if it held nothing
        raise Interrupted(kept_note(len(finished_lines(path)) if path.is_file() else 0, path)) from None


def question_fingerprint(question: Question, image_folder: str | None) -> str:
    """A short fingerprint of what a question asks (its prompt and its image's name in the question file),
    recorded with its answer so that a resumed run refuses a question file whose answered questions
    changed, not only their ids."""
    image = None if question.image_path is None else os.path.relpath(question.image_path, image_folder or os.curdir)
    content = json.dumps([question.text, image], ensure_ascii=False)
    return hashlib.sha256(content.encode()).hexdigest()[:FINGERPRINT_CHARS]


def write_empty_chunk(path: Path) -> None:
    """A shard left without questions (more shards than questions) still leaves its file, empty, so that
    the merge (ours, or LLaVA's `cat` of every chunk file) finds every chunk and goes ahead."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as error:
        raise RunError(f"cannot write the answers file {path}: {error.strerror or error}") from None
    print(f"{path}: this shard has no questions (more shards than questions); its file is empty")


def answer_remaining(args: argparse.Namespace, chunk: list[Question], path: Path, start: int, first_position: int,
                     sampling: SamplingConfig, drop: DropMethod, identity: dict, fingerprints: list[str]) -> None:
    tokenizer, model, image_processor, _ = load_model(args)
    answerer = Answerer(tokenizer, model, image_processor, args.conv_mode, sampling, drop, **decode_step_args(args))
    model_id = Path(args.model_path.rstrip("/")).name
    with open_for_append(path) as handle, tqdm(initial=start, total=len(chunk), desc="answering", unit="q") as progress:
        for group_start in range(start, len(chunk), args.batch_size):
            group = range(group_start, min(group_start + args.batch_size, len(chunk)))
            for offset, answer in zip(group, answer_group(answerer, chunk, group, first_position, path)):
                question = chunk[offset]
                write_line(handle, {
                    "question_id": question.question_id,
                    "prompt": question.text,
                    **question.record,
                    "text": answer.text,
                    "answer_id": answer_id(model_id, question.question_id, first_position + offset),
                    "model_id": model_id,
                    "metadata": {**answer.stats, RUN_KEY: identity, ASKED_KEY: fingerprints[offset]},
                })
                progress.update()


def answer_group(answerer: Answerer, chunk: list[Question], group: range, first_position: int, path: Path):
    """The answers of `chunk[group]`, in order. A question that cannot be answered (e.g. a prompt longer
    than the context) stops the run with its number; in a batch the group is answered again one by one
    so that the answers before it are kept. A batch that fails although every question answers alone is a
    batching bug, and is raised as one rather than hidden behind the one-by-one answers."""
    batch_error = None
    if len(group) > 1:
        try:
            yield from answerer.answer_batch([(chunk[offset].text, chunk[offset].load_image()) for offset in group])
            return
        except ValueError as error:
            batch_error = error
    answers = []
    for offset in group:
        question = chunk[offset]
        try:
            answers.append(answerer.answer(question.text, question.load_image()))
        except ValueError as error:
            yield from answers
            raise RunError(f"question {question.question_id!r} (question {first_position + offset + 1} of the "
                           f"question file): {error}; {answers_kept(offset, path)}") from None
    if batch_error is not None:
        raise RuntimeError(f"answering {len(group)} questions together failed ({batch_error}), yet each answers "
                           "alone: a bug in batched answering; run with --batch-size 1 meanwhile") from batch_error
    yield from answers


def answers_kept(count: int, path: Path) -> str:
    """What a stopped run leaves, naming the answers file only when it holds answers (else it is removed)."""
    return f"the {count} answers before it are kept in {path}" if count else "no answer was written"


@interruptible
def run_cli(parser: argparse.ArgumentParser, questions_from_args: Callable[[argparse.Namespace], list[Question]],
            argv: list[str] | None = None, identity_args: tuple[str, ...] = ()) -> None:
    """A benchmark CLI's whole main(): parse, check flags before reading questions, answer them.

    `identity_args` names the CLI's own flags that change its prompts; resuming checks them too.
    """
    args = parser.parse_args(argv)

    def run() -> None:
        validate_args(args)  # fail on bad flags before reading a large question file
        run_questions(args, questions_from_args(args), identity_args)

    main_guard(run)
