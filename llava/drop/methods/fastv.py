"""FastV (Chen et al., ECCV 2024, "An Image is Worth 1/2 Tokens After Layer 2") as a method of the engine.

Sec. 4 of the paper: run the first K decoder layers on every token, then rank the image tokens by the
attention they receive in layer K and prune the lowest-ranked R of them for all later layers. Its FLOPs
count (K layers on n image tokens, T - K layers on (1 - R) n) is the layer average we report.

Options, in the one vocabulary of docs/method_options.md: `drop_after` = (K - 1,), the one 0-based layer
after which FastV drops, and `kept_share` = 1 - R, the share of the vision tokens that drop keeps. The paper's
names are accepted as aliases: `k=K` is `drop_after=K-1`, `ratio=R` is `kept_share=1-R`.

Choices, where the paper leaves room:
- Score: the head-averaged attention of the LAST prompt token's query (the row that predicts the first
  answer token), not the average attention received from all tokens that Sec. 4 describes; the last
  row is what FastV's KV-cache-compatible ("in-place") implementation ranks by, the criterion
  PyramidDrop shares, and the cheapest block to compute (one query row).
- Layers are 0-based here: the paper's "layer K" is decoder layer K - 1 = `drop_after`, so `select` runs
  after it and layers K, K+1, ... see the kept tokens.
- Count: keep round(kept_share * V) tokens, rounding halves up (so kept_share 0.5 on 577 keeps 289); ties in
  the score go to the earlier position.
- Budget: with `budget` set, keep is solved per prompt from its vision count V and the decoder depth L
  so that the layer average (K * V + (L - K) * keep) / L equals the budget (closed form, then rounded;
  K = drop_after + 1 layers see every token).
  `keep_fraction` F sets each prompt's budget to round(F * V) instead (`fraction_budget`).
- Positions: the released code (github.com/pkunlp-icler/FastV, `src/FastV/lmms-eval/fastv_kvcache.py`, the
  KV-cache variant for LLaVA on transformers 4.37) hands layers K, K+1, ... the kept tokens' original
  position ids (`position_ids = keep_indexs`) and decodes on from the full prompt length (generate's
  position ids count every prompt token), so `compact_positions` is False here: RoPE sees gaps where tokens
  were dropped, and the first answer token fed back sits at position = prompt length in every layer.

Where the released code differs and we do not follow it (docs/released_code.md): it runs layer K - 1
twice to read its attention, and both runs append to that layer's KV cache, so during decoding layer
K - 1 attends to every prompt key twice (its cache holds 2 x the prompt). That is a slip of the
implementation, not the method; this engine keeps one copy. On the golden fixtures
(tests/test_golden_released.py: K = 2 keeping 288 / 144 / 64 of 576, 12 questions each) the kept tokens,
their positions and all 36 answers equal the released code's all the same.

LLaVA-NeXT: the released code (github.com/pkunlp-icler/FastV, README's `fastv_config`) has no NeXT code of
its own; it is told the image span as `image_token_start_index` and `image_token_length` and ranks every
token inside it, so on NeXT every vision token of the model's own layout is a candidate: the base image,
the unpadded crop grid and its newline tokens (the engine's vision span is exactly those). The budget is
solved per prompt from its real vision count V. A budget must reach every image, so `check_model` tests
the floor K * V / L with the most vision tokens one image can bring (`max_vision_tokens`, 2928 for a
2 x 2 grid of 336 px crops): at L = 32 and the paper's K = 2 (drop_after 1) that floor is 183, so
`--budget 160` is refused up front and the message names the latest drop that reaches it (drop_after = 0,
floor 91.5) rather than silently changing the paper's K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from llava.drop.blocks import check_budget, check_drop_after, check_keep_fraction, check_share, round_half_up, top_k_mask
from llava.drop.method import PREFILL, DropMethod, LayerContext, last_token_scores
from llava.drop.methods.registry import OptionAlias, register
from llava.model.geometry import ModelGeometry

DEFAULT_DROP_AFTER = (1,)  # the paper's K = 2: layers 0 and 1 see every image token
DEFAULT_KEPT_SHARE = 0.5  # the paper's R = 0.5: half the image tokens pruned


def drop_after_from_k(k: int) -> tuple[int]:
    """The paper's K (layers 0..K-1 see every token) as `drop_after`."""
    return (k - 1,)


def kept_from_pruned(ratio: float) -> float:
    """The paper's R (the share pruned) as `kept_share`."""
    return 1.0 - ratio


@dataclass(frozen=True)
class FastVOptions:
    """drop_after: the one decoder layer (0-based, a one-element tuple) after which FastV drops, layers
    0..drop_after seeing every vision token; kept_share: the share of the vision tokens that drop keeps;
    budget: a target layer-averaged vision-token count that, when set, replaces `kept_share`; keep_fraction:
    instead of `budget`, that share of each prompt's vision tokens as its budget. The paper's K and R are
    aliases: `k=K` is drop_after (K - 1,), `ratio=R` (the pruned share) is kept_share 1 - R."""

    option_aliases: ClassVar[dict[str, OptionAlias]] = {
        "k": OptionAlias("drop_after", int, drop_after_from_k, "drop_after = k - 1, the paper's K"),
        "ratio": OptionAlias("kept_share", float, kept_from_pruned,
                             "kept_share = 1 - ratio, the paper's R (a pruned share)"),
    }
    drop_after: tuple[int, ...] = DEFAULT_DROP_AFTER
    kept_share: float = DEFAULT_KEPT_SHARE
    budget: float | None = None
    keep_fraction: float | None = None

    def __post_init__(self):
        check_drop_after(self.drop_after)
        if len(self.drop_after) != 1:
            raise ValueError(f"fastv drops once, after one layer: drop_after takes one layer, got {self.drop_after} "
                             "(pdrop and sparsevlm drop after several)")
        check_share("kept_share", self.kept_share)
        check_budget(self.budget)
        check_keep_fraction(self.keep_fraction, self.budget)


def fastv_budget_keep(budget: float, vision_count: int, drop_after: int, num_layers: int) -> int:
    """Tokens to keep after layer `drop_after` so that (K * V + (L - K) * keep) / L is closest to `budget`,
    K = drop_after + 1 being the layers that see every token.

    Closed form keep = (budget * L - K * V) / (L - K), capped at V and rounded; rounding keep moves the
    average by at most (L - K) / (2 L) < 0.5 tokens. A budget below K * V / L (what the first K layers
    alone average) cannot be reached and raises rather than silently missing the target.
    """
    seen = drop_after + 1  # layers 0..drop_after see every vision token
    if seen >= num_layers:
        raise ValueError(f"drop_after={drop_after} leaves no layer to prune in a {num_layers}-layer decoder")
    floor = seen * vision_count / num_layers
    if budget < floor:
        raise ValueError(f"budget {budget} is below {floor:g}, the average that layers 0..{drop_after} alone give "
                         f"{vision_count} vision tokens over {num_layers} layers; "
                         f"{earlier_drop_hint(budget, vision_count, num_layers)}")
    keep = (budget * num_layers - seen * vision_count) / (num_layers - seen)
    return round_half_up(min(keep, vision_count))


def earlier_drop_hint(budget: float, vision_count: int, num_layers: int) -> str:
    """Name the latest drop whose layers up to it alone stay within `budget`, or say that none does."""
    seen = math.floor(budget * num_layers / vision_count)  # the most layers that may see every token
    if seen < 1:
        return f"no drop reaches it (drop_after=0 alone averages {vision_count / num_layers:g})"
    return f"choose drop_after={seen - 1} or less"


@register
class FastV(DropMethod):
    """One drop after layer `drop_after`, ranked by the last prompt token's attention."""

    name = "fastv"
    family = PREFILL
    options_class = FastVOptions
    supports_next = True
    compact_positions = False  # the released code keeps the kept tokens' original positions (module docstring)

    def prefill_layers(self, geometry: ModelGeometry) -> tuple[int, ...]:
        return self.options.drop_after

    def check_model(self, geometry: ModelGeometry) -> None:
        """Also refuse a budget below what layers 0..drop_after alone average for the most vision tokens one
        image can bring (the closed form raises)."""
        super().check_model(geometry)
        if self.options.budget is not None:
            fastv_budget_keep(self.options.budget, geometry.max_vision_tokens, self.options.drop_after[0],
                              geometry.decoder_layers)

    def keep_count(self, vision_count: int, geometry: ModelGeometry) -> int:
        """From the kept share, or solved from the budget (or the keep fraction's) for a prompt's vision count."""
        budget = self.prompt_options(vision_count).budget
        if budget is None:
            return round_half_up(self.options.kept_share * vision_count)
        return fastv_budget_keep(budget, vision_count, self.options.drop_after[0], geometry.decoder_layers)

    def select(self, context: LayerContext) -> torch.Tensor:
        counts = [self.keep_count(count, context.geometry) for count in context.prompt_vision_counts]
        return top_k_mask(last_token_scores(context), counts, context.vision_valid)
