"""Find MustDrop thresholds that give a wanted number of vision tokens (the paper's 192 / 128 / 64).

    python -m llava.eval.calibrate --model-path M --question-file Q --image-folder I \
        [--num-questions 32] [--targets 192,128,64 | --keep-targets 0.333,0.222,0.111] [--ratio 1.0]
        [--out thresholds.json]

The paper names its settings by "tokens": vision tokens present at each of the 32 decoder layers,
averaged over the layers and the questions. The authors published thresholds only for LLaVA-1.5-7B
on TextVQA (and VizWiz-64); for another model or benchmark this tool finds a pair that reaches a
target on a sample of the questions.

Two thresholds are one too many to search, so we walk the path `individual_thr = ratio * global_thr`.
The default ratio 1.0 follows the published pairs (llava/eval/thresholds.py), whose two thresholds
are close. Along the path the token count falls (in practice; nothing guarantees it) as the
thresholds rise, so we bisect on log(global_thr) in [1e-6, 1] with a fixed number of steps and
report the closest pair seen. Only the prefill runs (no decoding), and stage 1 (which does
not depend on the thresholds) runs once per question.

What the path can reach is bounded: at the top end every vision token outside the key set goes at
the first dropping layer, and at the bottom end nothing does, leaving stage 1's output. Both bounds
are measured and reported; a target outside them is reported as unreachable.

`--keep-targets` asks for kept shares of each image's vision tokens instead (0.111 is 64 of LLaVA-1.5's
576): each prompt's layer-averaged count over its image's count, averaged over the prompts. That is the
setting where images bring different counts (Qwen2.5-VL at its own resolution, LLaVA-NeXT's crops); the
pairs print as THR_keep0_111="g i" for the benchmark scripts' keep0.111 setting.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from llava.conversation import get_conv_template
from llava.drop.generate import encode_vision
from llava.drop.prefill import MultimodalPrompt, build_prompt, prefill_prompt
from llava.drop.methods import as_method
from llava.drop.methods.mustdrop import DEFAULT_GLOBAL_THR, DEFAULT_INDIVIDUAL_THR, DropConfig
from llava.eval.answering.vqa import questions_from_file
from llava.eval.answering.loop import (
    Question,
    RunError,
    add_loading_args,
    add_stage_args,
    check_machine_args,
    drop_config_from_args,
    load_model,
    main_guard,
    resolve_conv_mode,
)
from llava.eval.cli_errors import interruptible, refuse_non_finite_flags
from llava.eval.thresholds import TOKEN_SETTINGS
from llava.output_paths import check_output_file
from llava.model.conv_mode import AUTO_CONV_MODE
from llava.model.geometry import geometry_of_model
from llava.model.inputs import ModelInputs, encode_question

LOWEST_GLOBAL_THR = 1e-6
HIGHEST_GLOBAL_THR = 1.0
SIGNIFICANT_DIGITS = 3  # thresholds are probed already rounded, so the reported pair is the one measured
DEFAULT_TARGETS = TOKEN_SETTINGS
DEFAULT_NUM_QUESTIONS = 32
DEFAULT_RATIO = 1.0
DEFAULT_TOLERANCE = 1.0
DEFAULT_STEPS = 16  # log range 13.8 / 2**16 is finer than the 3-significant-digit rounding
DEFAULT_CONV_MODE = "vicuna_v1"  # LLaVA-1.5's evaluation mode; the CLI defaults to the checkpoint's own (auto)


@dataclass(frozen=True)
class Probe:
    """One point of the path and the mean vision-token count it gives."""

    global_thr: float
    individual_thr: float
    tokens: float


@dataclass
class CalibrationResult:
    """The closest pair found for one target, and the bounds of what the path can reach."""

    target: float
    global_thr: float
    individual_thr: float
    mean_tokens: float
    reachable: bool  # the target lies within [fewest_tokens, most_tokens] (give or take the tolerance)
    within_tolerance: bool  # the pair's mean is within the tolerance of the target
    fewest_tokens: float  # at the path's top end: only the key set survives the first dropping layer
    most_tokens: float  # at the path's bottom end: about stage 1's output
    stage1_tokens: float  # mean vision tokens out of stage 1, an upper bound for any thresholds
    questions_below_target: int  # questions whose stage 1 alone already leaves fewer tokens than the target
    num_questions: int
    share: bool = False  # the target and every count above are kept shares of each image's vision tokens

    @property
    def setting(self) -> str:
        """The benchmark scripts' name of the setting: 64, or keep0.111 for a share."""
        return f"keep{self.target:g}" if self.share else f"{self.target:g}"


def round_significant(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def path_point(log_global_thr: float, ratio: float) -> tuple[float, float]:
    """(global_thr, individual_thr) on the path, rounded; both stay within DropConfig's [0, 1]."""
    global_thr = min(HIGHEST_GLOBAL_THR, round_significant(math.exp(log_global_thr)))
    return global_thr, min(1.0, round_significant(ratio * global_thr))


def question_inputs(model, tokenizer, image_processor, question: Question, conv_mode: str) -> ModelInputs:
    """Token ids and pixel values exactly as the answering CLIs build them."""
    image = question.load_image()
    if image is None:
        raise ValueError(f"question {question.question_id!r} has no image; calibration needs vision tokens")
    return encode_question(question.text, image, model, tokenizer, image_processor, conv_mode)


def prepare_prompts(
    model, tokenizer, image_processor, questions: Sequence[Question], conv_mode: str, drop: DropConfig
) -> list[MultimodalPrompt]:
    """Stage 1 once per question: the spliced prompts every threshold pair then prefills."""
    return prompts_and_counts(model, tokenizer, image_processor, questions, conv_mode, drop)[0]


@torch.inference_mode()
def prompts_and_counts(
    model, tokenizer, image_processor, questions: Sequence[Question], conv_mode: str, drop: DropConfig
) -> tuple[list[MultimodalPrompt], list[int]]:
    """The spliced prompts, and the vision tokens each image brought before stage 1 (what a share is of)."""
    prompts, counts = [], []
    for question in questions:
        inputs = question_inputs(model, tokenizer, image_processor, question, conv_mode)
        vision = encode_vision(model, as_method(drop), inputs.pixel_values, inputs.image_sizes)
        prompts.append(build_prompt(model, inputs.input_ids, vision))
        counts.append(vision.stats.get("vision_tokens_in", vision.features.shape[0]))
    return prompts, counts


@torch.inference_mode()
def mean_tokens(model, prompts: Sequence[MultimodalPrompt], global_thr: float, individual_thr: float,
                drop: DropConfig | None = None, tokens_in: Sequence[int] | None = None) -> float:
    """The paper's "tokens": vision tokens per decoder layer in prefill, averaged over layers and prompts; with
    `tokens_in`, each prompt's as a share of its image's vision tokens, averaged over the prompts."""
    drop = replace(drop or DropConfig(), enabled=True, global_thr=global_thr, individual_thr=individual_thr)
    per_prompt = []
    for n, prompt in enumerate(prompts):
        counts = prefill_prompt(model, prompt, as_method(drop)).vision_tokens_per_layer
        per_prompt.append(sum(counts) / len(counts) / (tokens_in[n] if tokens_in is not None else 1))
    return sum(per_prompt) / len(per_prompt)


def bisect_path(measure: Callable[[float], Probe], target: float, tolerance: float, steps: int,
                ends: tuple[Probe, Probe]) -> Probe:
    """Closest probe to `target`, bisecting log(global_thr) for at most `steps` steps.

    The count is assumed non-increasing along the path; where it is not, bisection still ends after
    `steps` and the closest probe seen is returned.
    """
    probes = list(ends)
    low, high = math.log(LOWEST_GLOBAL_THR), math.log(HIGHEST_GLOBAL_THR)
    for _ in range(steps):
        if min(abs(p.tokens - target) for p in probes) <= tolerance:
            break
        middle = (low + high) / 2
        probe = measure(middle)
        probes.append(probe)
        if probe.tokens > target:
            low = middle
        else:
            high = middle
    return min(probes, key=lambda p: abs(p.tokens - target))


def check_settings(targets: Sequence[float], ratio: float, tolerance: float, steps: int) -> None:
    if not targets or any(not math.isfinite(target) or target <= 0 for target in targets):
        raise ValueError(f"targets must be positive token counts, got {list(targets)}")
    if ratio <= 0:
        raise ValueError(f"ratio must be > 0 (individual_thr = ratio * global_thr), got {ratio}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")


def calibrate(
    model,
    tokenizer,
    image_processor,
    questions: Sequence[Question],
    targets: Sequence[float],
    conv_mode: str = DEFAULT_CONV_MODE,
    ratio: float = DEFAULT_RATIO,
    tolerance: float = DEFAULT_TOLERANCE,
    steps: int = DEFAULT_STEPS,
    drop: DropConfig | None = None,
    shares: bool = False,
) -> list[CalibrationResult]:
    """For each target mean vision-token count, the closest (global_thr, individual_thr) on the path. With
    `shares` the targets are kept shares of each image's vision tokens (0.111: 64 of 576), every count is
    each prompt's share averaged over the prompts, and `tolerance` (tokens) becomes a share of the sample's
    mean image."""
    check_settings(targets, ratio, tolerance, steps)
    if shares and any(target > 1 for target in targets):
        raise ValueError(f"kept shares must be in (0, 1], got {list(targets)}")
    if not questions:
        raise ValueError("no questions to calibrate on")
    drop = replace(drop or DropConfig(), enabled=True)
    as_method(drop).check_model(geometry_of_model(model))
    prompts, tokens_in = prompts_and_counts(model, tokenizer, image_processor, questions, conv_mode, drop)
    scale = tokens_in if shares else [1] * len(prompts)
    if shares:
        tolerance = tolerance / (sum(tokens_in) / len(tokens_in))
    measured: dict[tuple[float, float], Probe] = {}

    def measure(log_global_thr: float) -> Probe:
        pair = path_point(log_global_thr, ratio)
        if pair not in measured:
            measured[pair] = Probe(*pair, mean_tokens(model, prompts, *pair, drop, scale))
        return measured[pair]

    most, fewest = measure(math.log(LOWEST_GLOBAL_THR)), measure(math.log(HIGHEST_GLOBAL_THR))
    stage1_counts = [prompt.vision_count / each for prompt, each in zip(prompts, scale)]
    results = []
    for target in targets:
        reachable = fewest.tokens - tolerance <= target <= most.tokens + tolerance
        best = bisect_path(measure, target, tolerance, steps if reachable else 0, (most, fewest))
        results.append(CalibrationResult(
            target=target, global_thr=best.global_thr, individual_thr=best.individual_thr, mean_tokens=best.tokens,
            reachable=reachable, within_tolerance=abs(best.tokens - target) <= tolerance,
            fewest_tokens=fewest.tokens, most_tokens=most.tokens,
            stage1_tokens=sum(stage1_counts) / len(stage1_counts),
            questions_below_target=sum(count < target for count in stage1_counts), num_questions=len(prompts),
            share=shares,
        ))
    return results


def result_note(result: CalibrationResult) -> str:
    """Why a result needs a second look, in a few words (empty when it does not)."""
    notes = []
    if not result.reachable:
        side = "above the most" if result.target > result.most_tokens else "below the fewest"
        notes.append(f"unreachable: {side} tokens the path gives on this sample")
    elif not result.within_tolerance:
        notes.append("closest pair found is outside the tolerance")
    if result.questions_below_target:
        notes.append(f"stage 1 alone is below the target on {result.questions_below_target}/"
                     f"{result.num_questions} questions")
    return "; ".join(notes)


def markdown_table(results: Sequence[CalibrationResult]) -> str:
    lines = ["| target | global_thr | individual_thr | mean tokens | reachable | note |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        mean = f"{r.mean_tokens:.3f}" if r.share else f"{r.mean_tokens:.1f}"
        lines.append(f"| {r.setting} | {r.global_thr:g} | {r.individual_thr:g} | {mean} | "
                     f"{'yes' if r.reachable else 'no'} | {result_note(r)} |")
    return "\n".join(lines)


def bounds_line(result: CalibrationResult) -> str:
    value, unit = ("{:.3f}", " of each image's tokens") if result.share else ("{:.1f}", " tokens")
    return (f"Bounds on {result.num_questions} questions: fewest {value.format(result.fewest_tokens)}{unit} "
            f"(global_thr {HIGHEST_GLOBAL_THR:g}), most {value.format(result.most_tokens)} (global_thr "
            f"{LOWEST_GLOBAL_THR:g}); stage 1 output {value.format(result.stage1_tokens)}.")


def script_lines(results: Sequence[CalibrationResult]) -> list[str]:
    """Overrides for scripts/v1_5/eval/common.sh; unreachable targets come out commented."""
    lines = []
    for r in results:
        line = f'THR_{r.setting.replace(".", "_")}="{r.global_thr:g} {r.individual_thr:g}"'
        lines.append(line if r.reachable else f"# {line}  # unreachable on this sample")
    return lines


def report(results: Sequence[CalibrationResult]) -> str:
    return "\n".join([markdown_table(results), "", bounds_line(results[0]), "", *script_lines(results)])


def parse_targets(text: str | None, keep_text: str | None = None) -> list[float]:
    """Whole token counts, as the paper names its settings (and common.sh its THR_<count> variables), or with
    `keep_text` kept shares in (0, 1] (common.sh's keep<F> settings)."""
    if keep_text is not None:
        if text is not None:
            raise ValueError("--targets and --keep-targets: give one (token counts or kept shares)")
        try:
            shares = [float(part) for part in keep_text.split(",") if part.strip()]
        except ValueError:
            shares = []
        if not shares or any(not 0 < share <= 1 for share in shares):
            raise ValueError(f"--keep-targets must be comma-separated shares in (0, 1], got {keep_text!r}")
        return shares
    if text is None:
        return list(DEFAULT_TARGETS)
    try:
        targets = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        targets = []
    if not targets or any(target <= 0 for target in targets):
        raise ValueError(f"--targets must be comma-separated positive whole token counts, got {text!r}")
    return targets


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loading_args(parser, model_path_required=True)
    parser.add_argument("--question-file", type=str, required=True, help="LLaVA question JSONL")
    parser.add_argument("--image-folder", type=str, default="")
    parser.add_argument("--num-questions", type=int, default=DEFAULT_NUM_QUESTIONS)
    parser.add_argument("--seed", type=int, default=None, help="sample questions at random (default: the first N)")
    parser.add_argument("--targets", type=str, default=None,
                        help=f"comma-separated token counts (default {','.join(map(str, DEFAULT_TARGETS))})")
    parser.add_argument("--keep-targets", type=str, default=None,
                        help="instead of --targets: comma-separated kept shares of each image's vision tokens, e.g. "
                             "0.333,0.222,0.111 (the setting for Qwen, whose images bring different counts)")
    parser.add_argument("--conv-mode", type=str, default=AUTO_CONV_MODE,
                        help="conversation template; auto (default) picks the checkpoint's own from its config files")
    parser.add_argument("--ratio", type=float, default=DEFAULT_RATIO, help="individual_thr = ratio * global_thr")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="in tokens")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="bisection steps per target")
    parser.add_argument("--out", type=str, default=None, help="write the results as JSON here")
    add_stage_args(parser)
    return parser


def stage_config(args: argparse.Namespace) -> DropConfig:
    """MustDrop's stage settings from the flags; the thresholds are what calibration searches."""
    as_sparse_run = argparse.Namespace(**vars(args), sparse=True, global_thr=DEFAULT_GLOBAL_THR,
                                       individual_thr=DEFAULT_INDIVIDUAL_THR)
    return drop_config_from_args(as_sparse_run)


def sample_questions(questions: list[Question], count: int, seed: int | None) -> list[Question]:
    if count >= len(questions):
        return questions
    return random.Random(seed).sample(questions, count) if seed is not None else questions[:count]


def run(args: argparse.Namespace) -> list[CalibrationResult]:
    """Validate every flag, then load the model and calibrate; input problems become RunError."""
    refuse_non_finite_flags(args)
    check_machine_args(args)
    try:
        if args.out:
            check_output_file(args.out, "--out")
        targets = parse_targets(args.targets, args.keep_targets)
        check_settings(targets, args.ratio, args.tolerance, args.steps)
        if args.num_questions < 1:
            raise ValueError(f"--num-questions must be >= 1, got {args.num_questions}")
        drop = stage_config(args)
    except ValueError as error:
        raise RunError(str(error)) from None
    resolve_conv_mode(args)
    try:
        get_conv_template(args.conv_mode)
    except ValueError as error:
        raise RunError(str(error)) from None
    questions = sample_questions(questions_from_file(args), args.num_questions, args.seed)
    tokenizer, model, image_processor, _ = load_model(args)
    try:
        results = calibrate(model, tokenizer, image_processor, questions, targets, args.conv_mode,
                            args.ratio, args.tolerance, args.steps, drop, shares=args.keep_targets is not None)
    except ValueError as error:
        raise RunError(str(error)) from None
    print(report(results))
    if args.out:
        write_json(Path(args.out), args, results)
    return results


def write_json(path: Path, args: argparse.Namespace, results: Sequence[CalibrationResult]) -> None:
    settings = {key: getattr(args, key) for key in ("model_path", "question_file", "conv_mode", "ratio", "tolerance",
                                                     "steps", "seed")}
    payload = {"settings": settings, "results": [asdict(r) for r in results], "common_sh": script_lines(results)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
    except OSError as error:
        raise RunError(f"cannot write {path}: {error.strerror}") from None
    print(f"wrote {path}")


@interruptible
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    main_guard(lambda: run(args))


if __name__ == "__main__":
    main()
