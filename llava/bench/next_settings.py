"""MustDrop's settings for the LLaVA-NeXT benchmark: thresholds that reach 640 / 320 / 160 vision tokens.

The paper names its LLaVA-NeXT settings by layer-averaged vision tokens over the whole 2880-token
image (base image + 4 crops). `DropConfig(budget=...)` is refused on NeXT, and no thresholds were
published for it, so the pairs are found on the benchmark's own prompt with calibrate's search:
bisection of log(global_thr) along individual_thr = global_thr, stage 1 run once, prefill only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from llava.bench.workload import Workload
from llava.drop.generate import encode_vision
from llava.drop.prefill import MultimodalPrompt, build_prompt
from llava.drop.methods import DropConfig, as_method
from llava.eval.calibrate import (
    DEFAULT_RATIO,
    HIGHEST_GLOBAL_THR,
    LOWEST_GLOBAL_THR,
    Probe,
    bisect_path,
    mean_tokens,
    path_point,
)

NEXT_TARGETS = (640, 320, 160)  # the paper's LLaVA-NeXT settings, total layer-averaged vision tokens
TARGET_TOLERANCE = 0.02  # a pair within 2 % of its target ends the search (calibrate's default is 1 token)
SEARCH_STEPS = 12  # bisection steps per target at most


@dataclass(frozen=True)
class FoundPair:
    """The pair the search settled on for one target, and the tokens it gives on the prompt."""

    target: int
    global_thr: float
    individual_thr: float
    tokens: float
    reachable: bool  # the target lies between what the highest and the lowest thresholds give

    def config(self) -> DropConfig:
        return DropConfig(global_thr=self.global_thr, individual_thr=self.individual_thr)

    def describe(self) -> str:
        note = "" if self.reachable else " (out of reach: closest end of the path)"
        return (f"{self.target}: global_thr {self.global_thr:g}, individual_thr {self.individual_thr:g} "
                f"-> {self.tokens:.1f} tokens{note}")


@torch.inference_mode()
def stage1_prompt(work: Workload) -> MultimodalPrompt:
    """The prompt after MustDrop's stage 1, which the thresholds do not change: built once."""
    device = work.model.lm_head.weight.device
    vision = encode_vision(work.model, as_method(DropConfig()), work.pixel_values.to(device), work.image_sizes)
    return build_prompt(work.model, work.input_ids.to(device), vision)


def find_pairs(work: Workload, targets: tuple[int, ...] = NEXT_TARGETS) -> list[FoundPair]:
    """For each target, the threshold pair on calibrate's path closest to it on this prompt."""
    prompts = [stage1_prompt(work)]
    measured: dict[tuple[float, float], Probe] = {}

    def measure(log_global_thr: float) -> Probe:
        pair = path_point(log_global_thr, DEFAULT_RATIO)
        if pair not in measured:
            measured[pair] = Probe(*pair, mean_tokens(work.model, prompts, *pair))
        return measured[pair]

    most, fewest = measure(math.log(LOWEST_GLOBAL_THR)), measure(math.log(HIGHEST_GLOBAL_THR))
    found = []
    for target in targets:
        tolerance = TARGET_TOLERANCE * target
        reachable = fewest.tokens - tolerance <= target <= most.tokens + tolerance
        best = bisect_path(measure, target, tolerance, SEARCH_STEPS if reachable else 0, (most, fewest))
        found.append(FoundPair(target, best.global_thr, best.individual_thr, best.tokens, reachable))
    return found


def pairs_record(pairs: list[FoundPair]) -> list[dict]:
    """The pairs as JSON-ready dicts, for the results file."""
    return [asdict(pair) for pair in pairs]
