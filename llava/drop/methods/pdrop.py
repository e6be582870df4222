"""PyramidDrop (Xing et al., CVPR 2025) as a method of the engine, training-free inference only.

Sec. 3.2 of the paper: split the decoder into stages at layers l_1 < l_2 < ... (8, 16, 24 for the 32
layers of LLaVA-1.5); at the end of each stage, rank the image tokens by the attention the last
instruction token gives them and keep lambda of them, so stage s sees V * lambda^s tokens (a pyramid).

Options, in the one vocabulary of docs/method_options.md: `drop_after` = (l_1 - 1, l_2 - 1, ...), the 0-based
layers after which PyramidDrop drops, and `kept_share` = lambda, the share of the current vision tokens each
drop keeps. The paper's names are accepted as aliases: `layers=8;16;24` (the first layer of each new stage)
is `drop_after=7;15;23`, and `ratio` (lambda) is `kept_share`.

Choices, where the paper leaves room:
- Where: `select` runs after layers l_s - 1 (`drop_after`: 7, 15, 23), the LAST layer of each stage; layers l_s,
  l_s + 1, ... see the kept tokens, so every stage is exactly l_s - l_{s-1} layers long, as the paper's
  stage/FLOPs accounting assumes.
- Score, as released (github.com/Cooperx521/PyramidDrop, `llava/model/modeling_llama_pdrop.py`,
  `pdrop_rank_drop`): the attention that layer l_s WOULD give, i.e. layer l_s's input norm and q / k
  projections applied to layer l_s - 1's output, RoPE at the current positions, a causal softmax over every
  key in float32, averaged over heads. (Reading the paper, one would take layer l_s - 1's own attention;
  the released code made the numbers.) Only the last prompt token's query is computed, and the keys of
  layer l_s once for the whole sequence; layer l_s itself then runs as usual on the kept tokens. The golden
  fixtures (tests/test_golden_released.py, docs/released_code.md) hold our kept tokens at every stage, and
  the answers, equal to the released code's.
- Positions: the released code (`llava/model/modeling_llama_pdrop.py`, `pdrop_rank_drop`) gives the shorter
  sequence positions 0..len-1 after each drop, and while decoding it lowers each stage's position ids by
  the tokens that stage dropped, so a new token sits at its layer's cache length: `compact_positions`.
- Query: the last instruction token is the last prompt token (the template's "ASSISTANT:" tail), its
  head-averaged attention row over the current vision tokens.
- Counts: stage s keeps round(V * lambda^s) tokens (halves up), V being the prompt's vision count; with lambda = 0.5 and V = 576 that is 288, 144, 72 as in the paper. Ties in the score
  go to the earlier position.
- Budget: lambda is solved per prompt (V may differ per image) so that the layer-averaged count
  sum_s len_s * V * lambda^s / L equals the budget, then the integer counts are nudged one token at a
  time while that brings the integer average closer (`keep_fraction` F: a budget of round(F * V) for each
  prompt, `fraction_budget`). Budgets below the first stage's share
  (l_1 * V / L, e.g. 144 for drop_after (7, 15, 23) and V = 576) cannot be reached by any lambda and raise:
  move the first drop earlier for them.

LLaVA-NeXT: the released code (github.com/Cooperx521/PyramidDrop, `llava/model/llava_arch.py`) records
each image's token count as the length of its packed feature (`self.model.image_tokens =
[image_feature.shape[0] for image_feature in image_features]`, newline tokens included) and ranks all of
them, and its v1.6 scripts (`scripts/v1_6/pdrop_eval/*.sh`) keep `--layer_list '[8,16,24]'` and
`--image_token_ratio_list "[0.5,0.25,0.125]"` (lambda = 0.5). So on NeXT the pyramid runs on every
vision token of the model's own layout, V being the prompt's real count. Budget checks and the choice of
stages use the most vision tokens one image can bring (`max_vision_tokens`, 2928 for a 2 x 2 grid): the
default stages' floor is then 8 * 2928 / 32 = 732, so 640, 320 and 160 all drop after (1, 5, 11) (stages
starting at 2, 6, 12), whose floor 183 refuses 160 up front (drop after layer 0 first, e.g.
`drop_after=0;5;11`, floor 91.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from llava.drop.blocks import (
    bisect,
    check_budget,
    check_drop_after,
    check_keep_fraction,
    check_share,
    layer_average,
    planned,
    round_half_up,
    stage_lengths,
    top_k_mask,
)
from llava.drop.method import LAST_QUERY, PREFILL, DropMethod, LayerContext, query_rows
from llava.drop.probe import vision_attention
from llava.drop.methods.registry import OptionAlias, register, same
from llava.model.geometry import ModelGeometry

# The paper's LLaVA-1.5 stages start at layers 8, 16, 24: drops after the layer before each.
DEFAULT_DROP_AFTER = (7, 15, 23)
# Our choice, not the paper's: with a budget below what the default stages can reach (their first stage
# alone averages 8 / L of the V vision tokens, 144 of LLaVA-1.5's 576 over 32 layers), budget mode
# drops here (stages starting at layers 2, 6, 12).
EARLY_DROP_AFTER = (1, 5, 11)
DEFAULT_KEPT_SHARE = 0.5  # the paper's lambda


def drop_after_from_stage_starts(layers: tuple[int, ...]) -> tuple[int, ...]:
    """The paper's l_s, the first layer of each new stage, as `drop_after`: each drop is after the layer before."""
    return tuple(layer - 1 for layer in layers)


@dataclass(frozen=True)
class PDropOptions:
    """drop_after: the decoder layers (0-based) after which a drop ends a stage (None: the paper's (7, 15, 23),
    or (1, 5, 11) for a budget those cannot reach); kept_share: lambda, the share of the current vision tokens
    each drop keeps; budget: a target layer-averaged vision-token count that, when set, replaces `kept_share`;
    keep_fraction: instead of `budget`, that share of each prompt's vision tokens as its budget. The paper's
    names are aliases: `layers` (each new stage's first layer, drop_after + 1) and `ratio` (lambda)."""

    option_aliases: ClassVar[dict[str, OptionAlias]] = {
        "layers": OptionAlias("drop_after", tuple[int, ...] | None, drop_after_from_stage_starts,
                              "drop_after = each layer - 1, the first layer of each new stage"),
        "ratio": OptionAlias("kept_share", float, same, "kept_share = ratio, the paper's lambda"),
    }
    drop_after: tuple[int, ...] | None = None
    kept_share: float = DEFAULT_KEPT_SHARE
    budget: float | None = None
    keep_fraction: float | None = None

    def __post_init__(self):
        if self.drop_after is not None:
            check_drop_after(self.drop_after)
        check_share("kept_share", self.kept_share)
        check_budget(self.budget)
        check_keep_fraction(self.keep_fraction, self.budget)


def pyramid(vision_count: int, kept_share: float, stages: int) -> list[float]:
    """[V, V * kept_share, V * kept_share^2, ...] for the given number of stages."""
    return [vision_count * kept_share**stage for stage in range(stages)]


def solve_kept_share(budget: float, vision_count: int, lengths: list[int]) -> float:
    """lambda in [0, 1] whose pyramid averages `budget` (the average grows with lambda)."""
    low, high = bisect(lambda share: layer_average(pyramid(vision_count, share, len(lengths)), lengths) < budget,
                       0.0, 1.0)
    return (low + high) / 2


def nudge_counts(counts: list[int], lengths: list[int], budget: float) -> list[int]:
    """Move single counts by one token while that brings the integer layer average closer to `budget`.

    counts[0] is V and stays; the others stay non-increasing and >= 0, so the schedule is still a pyramid.
    """
    counts = list(counts)

    def error(candidate: list[int]) -> float:
        return abs(layer_average(candidate, lengths) - budget)

    while True:
        candidates = []
        for stage in range(1, len(counts)):
            for step in (-1, 1):
                candidate = counts[:stage] + [counts[stage] + step] + counts[stage + 1 :]
                if candidate[stage] >= 0 and candidate == sorted(candidate, reverse=True):
                    candidates.append(candidate)
        best = min(candidates, key=error, default=counts)
        if error(best) >= error(counts):
            return counts
        counts = best


def default_stages_floor(geometry: ModelGeometry) -> float:
    """The layer average the default stages' first stage alone gives the most vision tokens of one image."""
    return (DEFAULT_DROP_AFTER[0] + 1) * geometry.max_vision_tokens / geometry.decoder_layers


@planned
def budget_counts(budget: float, vision_count: int, drop_after: tuple[int, ...], num_layers: int) -> list[int]:
    """Tokens kept after each drop (after layers `drop_after`) so that the integer layer average is as close
    to `budget` as we get."""
    lengths = stage_lengths(drop_after, num_layers)
    floor = layer_average([vision_count] + [0] * len(drop_after), lengths)
    if budget < floor:
        raise ValueError(f"budget {budget} is below {floor:g}, the average that layers 0..{drop_after[0]} alone give "
                         f"{vision_count} vision tokens over {num_layers} layers; drop first after an earlier layer "
                         f"than {drop_after[0]}")
    if budget >= vision_count:
        return [vision_count] * len(drop_after)
    kept_share = solve_kept_share(budget, vision_count, lengths)
    rounded = [round_half_up(count) for count in pyramid(vision_count, kept_share, len(lengths))]
    return nudge_counts(rounded, lengths, budget)[1:]


def rotated_keys(model, layer_idx: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Layer `layer_idx`'s keys [N, kv_heads, seq, head_dim] for the hidden states entering it, rotated at
    `positions` [N, seq], as the layer would cache them."""
    layer = model.model.language_model.layers[layer_idx]
    normed = layer.input_layernorm(hidden)
    keys = layer.self_attn.k_proj(normed).view(*hidden.shape[:2], -1, layer.self_attn.head_dim).transpose(1, 2)
    cos, sin = model.model.language_model.rotary_emb(normed, positions)
    return apply_rotary_pos_emb(keys, keys, cos, sin)[1]


def next_layer_scores(context: LayerContext) -> torch.Tensor:
    """[N, V] the head-averaged attention each prompt's last token would give its vision tokens in the NEXT
    layer (its norm and q / k projections on this layer's output), zero past each prompt's vision tokens:
    the released code's ranking."""
    model, scoring_layer = context.model, context.layer_idx + 1
    hidden, positions = context.layer_output, context.positions
    rows, _ = query_rows(LAST_QUERY, context.layouts, hidden.device)
    keys = rotated_keys(model, scoring_layer, hidden, positions)
    block = vision_attention(model, scoring_layer, hidden, keys, positions, rows, context.vision_slots)
    return block[:, 0].masked_fill(~context.vision_valid, 0.0)


@register
class PDrop(DropMethod):
    """Drops at the end of each stage, ranked by the last prompt token's attention in the next layer.

    The keep counts are planned from the vision count the prompt started with, at every drop, so one
    method object serves any number of prompts without state.
    """

    name = "pdrop"
    family = PREFILL
    compact_positions = True  # as released: positions 0..len-1 after each drop (module docstring)
    options_class = PDropOptions
    supports_next = True

    def prefill_layers(self, geometry: ModelGeometry) -> tuple[int, ...]:
        """The configured drops, or the default for this budget and model (see EARLY_DROP_AFTER); under
        `keep_fraction` the budget of the largest image decides, as the stages are the same for every prompt."""
        if self.options.drop_after is not None:
            return self.options.drop_after
        budget = self.prompt_options(geometry.max_vision_tokens).budget
        early = budget is not None and budget < default_stages_floor(geometry)
        return EARLY_DROP_AFTER if early else DEFAULT_DROP_AFTER

    def plan(self, vision_count: int, geometry: ModelGeometry) -> list[int]:
        """Keep counts after each drop, from lambda or from the budget (or the keep fraction's)."""
        drop_after = self.prefill_layers(geometry)
        budget = self.prompt_options(vision_count).budget
        if budget is None:
            kept = pyramid(vision_count, self.options.kept_share, len(drop_after) + 1)[1:]
            return [round_half_up(count) for count in kept]
        return budget_counts(budget, vision_count, drop_after, geometry.decoder_layers)

    def check_model(self, geometry: ModelGeometry) -> None:
        """Also refuse a budget below the first stage's share of the most vision tokens one image can bring
        (planning the counts raises)."""
        super().check_model(geometry)
        last = max(self.prefill_layers(geometry))
        if last + 1 >= geometry.decoder_layers:
            raise ValueError(f"a drop after layer {last} is scored with layer {last + 1}, which a model with "
                             f"{geometry.decoder_layers} decoder layers does not have; use drop_after below "
                             f"{geometry.decoder_layers - 1}")
        self.plan(geometry.max_vision_tokens, geometry)

    def select(self, context: LayerContext) -> torch.Tensor:
        stage = self.prefill_layers(context.geometry).index(context.layer_idx)
        counts = [self.plan(count, context.geometry)[stage] for count in context.prompt_vision_counts]
        return top_k_mask(next_layer_scores(context), counts, context.vision_valid)
