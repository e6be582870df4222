"""The floor any dropping method can reach at a token count: the model fed only that many vision tokens.

A method that keeps K vision tokens on average still pays for scoring, merging and its first layers on
every token. The same model given a prompt that holds K vision tokens from the start (the unpruned vision
stage's first K, nothing scored or merged) shows how close to the ideal a method gets: ours / limit.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from llava.drop.method import DropMethod
from llava.drop.vision import VisionOutput, encode_images_together

LIMIT_PREFIX = "limit@"  # a limit row's label: limit@<the setting it bounds>


class VisionPrefix(DropMethod):
    """The unpruned vision stage, then only its first `count` vision tokens enter the decoder."""

    name = "limit"
    supports_next = True

    def __init__(self, count: int):
        super().__init__()
        self.count = count

    def encode_image(self, model, pixel_values: torch.Tensor) -> VisionOutput:
        return self.first(super().encode_image(model, pixel_values))

    def encode_next(self, model, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> VisionOutput:
        return self.first(super().encode_next(model, pixel_values, image_sizes))

    def encode_images(self, model, pixel_values: list[torch.Tensor],
                      image_sizes: list[torch.Tensor | None]) -> list[VisionOutput]:
        """All prompts' images through the tower together, as the unpruned model runs them."""
        return [self.first(vision) for vision in encode_images_together(model, pixel_values, image_sizes)]

    @property
    def runs_on_qwen(self) -> bool:
        return True  # the first tokens keep their own 3-D positions

    def first(self, vision: VisionOutput) -> VisionOutput:
        features = vision.features[: self.count]
        positions = None if vision.positions is None else vision.positions[:, : self.count]
        return replace(vision, features=features, stats={**vision.stats, "vision_tokens": features.shape[0]},
                       patch_groups=None, positions=positions)


def limit_settings(reached: dict[str, float]) -> dict[str, VisionPrefix]:
    """A limit per dropping setting, at the layer-averaged vision tokens it reached (rounded)."""
    return {f"{LIMIT_PREFIX}{label}": VisionPrefix(max(1, round(tokens))) for label, tokens in reached.items()}


def add_limit_ratios(rows: list[dict]) -> None:
    """Each dropping row's prefill time over its limit's: 1.0 is the floor, above it is the method's overhead."""
    by_setting = {row["setting"]: row for row in rows}
    for row in rows:
        limit = by_setting.get(f"{LIMIT_PREFIX}{row['setting']}")
        row["prefill_vs_limit"] = row["prefill_total_s"] / limit["prefill_total_s"] if limit else None
        row["llm_prefill_vs_limit"] = row["llm_prefill_s"] / limit["llm_prefill_s"] if limit else None
