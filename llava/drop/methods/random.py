"""Random dropping: keep a uniformly random subset of each image's patch tokens before the projector.

The honest floor of any comparison. Independent evaluations of vision-token pruning (UniPruneBench,
arXiv 2511.02650; VTC-Bench, arXiv 2510.07143) found that random subsets beat many published methods
on several benchmarks, so a table without this row can mislead.

- `budget` patch tokens are kept per image (default 64, the paper's smallest LLaVA-1.5 setting), in
  their grid order; CLS stays when LLaVA's select strategy keeps it. On LLaVA-NeXT the budget is the
  image's total, shared over the base image and its crops (llava/drop/image_reduction.py).
- Runs repeat: each image's subset is drawn from a generator seeded by `seed` (the answering CLIs'
  `--seed`) and a digest of the image's pixel values, so the same image at the same precision keeps the
  same tokens whatever the question order, batch size, shard or resume point, while different images
  get independent subsets.
- Qwen2-VL / Qwen2.5-VL: the subset is drawn among the image's decoder tokens, after the model's own tower
  and merger (each token one 2 x 2 block of patches): `budget` of them (or round(F * V) under `keep_fraction`
  F, V the image's own token count), drawn as above from the digest of the image's patches, kept in their
  row-major order, and each keeps its own (t, row, column) position; the text after the image keeps its
  positions. An image with no more tokens than the budget keeps them all.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from llava.drop.blocks import check_budget, check_keep_fraction
from llava.drop.image_reduction import (
    ImageReduction,
    QwenTokens,
    ReducedImage,
    keep_patches,
    kept_qwen_tokens,
    run_to_select_layer,
)
from llava.drop.method import BASELINE
from llava.drop.methods.registry import register
from llava.drop.timing import Stopwatch
from llava.drop.vision import PATCHES_START, VisionOutput
from llava.model.qwen import merged_grid

DEFAULT_BUDGET = 64
SEED_BYTES = 8  # of the digest, read as the generator's 64-bit seed


@dataclass(frozen=True)
class RandomOptions:
    """How many patch tokens to keep (the image's total on LLaVA-NeXT), or which share of each prompt's
    vision tokens (`keep_fraction`, with budget None), and the seed of the draw."""

    budget: float | None = DEFAULT_BUDGET
    seed: int = 0
    keep_fraction: float | None = None

    def __post_init__(self):
        if self.budget is None and self.keep_fraction is None:
            raise ValueError("random dropping needs a budget (the tokens to keep) or a keep_fraction")
        check_budget(self.budget, whole=True)
        check_keep_fraction(self.keep_fraction, self.budget)


def image_seed(image: torch.Tensor, seed: int) -> int:
    """A 63-bit generator seed from `seed` and the image's pixel values."""
    digest = hashlib.sha256(str(seed).encode())
    digest.update(image.detach().float().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest()[:SEED_BYTES], "little") >> 1


def random_subset(patches: int, count: int, seed: int) -> torch.Tensor:
    """`count` distinct positions among `patches`, uniformly at random from `seed`, ascending."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(patches, generator=generator)[:count].sort().values


@register
class RandomDrop(ImageReduction):
    """A seeded uniformly random subset of every image's patches; the decoder runs unchanged."""

    name = "random"
    family = BASELINE
    options_class = RandomOptions

    def reduce(self, model, images: torch.Tensor, counts: list[int | None], selecting: Stopwatch) -> list[ReducedImage]:
        _, _, hidden = run_to_select_layer(model, images)
        patches = hidden.shape[1] - PATCHES_START
        reduced = []
        with selecting:
            for image, states, count in zip(images, hidden, counts):
                kept = random_subset(patches, count, image_seed(image, self.options.seed)).to(states.device)
                reduced.append(keep_patches(states, kept))
        return reduced

    def reduce_qwen(self, model, vision: VisionOutput, pixel_values: torch.Tensor, grid: torch.Tensor,
                    count: int | None) -> QwenTokens:
        """A seeded random subset of the image's decoder tokens, in their order, each at its own position (the seed
        digests the patches at the tower's precision, as on LLaVA)."""
        frames, _, columns = merged_grid(model, grid)
        tokens = vision.features.shape[0]
        patches = pixel_values.to(model.model.visual.patch_embed.proj.weight.dtype)
        kept = random_subset(tokens, min(count, tokens), image_seed(patches, self.options.seed))
        return kept_qwen_tokens(vision, kept, columns, frames)
