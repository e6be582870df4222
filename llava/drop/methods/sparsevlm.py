"""SparseVLM (Zhang et al., ICML 2025, "Visual Token Sparsification for Efficient VLM Inference").

Text-guided, training-free sparsification inside the decoder. After each dropping layer:

1. **Raters** (Sec. 3.2): the text tokens that look at the image. Relevance of text token t is the mean
   over the current vision tokens of its head-averaged attention A[t, v]; raters are the tokens whose
   relevance is >= the mean relevance (so there is always at least one).
2. **Scores**: vision token v's score is the attention the raters give it, averaged over raters.
3. **Adaptive count** (Sec. 3.3, N = lambda * (V - rank(P))): with P the raters' attention rows, the
   rank-based drop count is floor(rank_scale * (V - rank(P))); the schedule caps it, so
   keep = max(scheduled keep, V - floor(rank_scale * (V - rank(P)))), at most V. With rank_scale = 1
   the rank is a floor on the kept count (never fewer tokens than independent rater views);
   `rank_scale=None` keeps the schedule alone.
4. The best-scored `keep` tokens survive, in their original order (ties go to the earlier position).
5. **Recycling** (Sec. 3.4): of the dropped tokens, the ceil(recycled_share * dropped) best-scored are
   recycled. ceil(recycled / cluster_size) of them, the best-scored, are cluster centres; every
   recycled token joins the centre whose layer-output hidden state is most cosine-similar (a centre
   joins itself), and each cluster becomes the plain mean of its members' hidden states. The merged
   tokens follow the kept vision tokens (ordered by their centre's position) and count as vision
   tokens from the next layer on; the engine inserts them through `recycle`.

Options, in the one vocabulary of docs/method_options.md: `drop_after` lists the 0-based layers after which
SparseVLM drops (the released code's `layers`, the same numbers), `keep` the vision tokens kept after each,
and `recycled_share` the share of the dropped tokens merged back (the code's `recycle_ratio`); `layers` and
`recycle_ratio` are accepted as aliases.

Sources: drops after layers (2, 6, 15) with keep counts (66, 30, 17) are the "64 tokens" LLaVA-1.5 schedule of
the authors' released code (its 128 schedule is (303, 110, 36), its 192 one (300, 200, 110)); the
30 % recycling share and about ten recycled tokens per merged token come from the same code.

Approximations, where this differs from the paper or its code:
- Raters come from the scoring layer's own text -> vision attention at every dropping layer; the code
  picks them once from the similarity of the LLM's input embeddings (softmax over text, mean over
  vision, strictly above the mean).
- Cluster centres are the best-scored recycled tokens and assignment is by cosine similarity; the
  code uses density-peak clustering (DPC-KNN) on Euclidean distances, with random tie noise.
- Counts: recycled = ceil(recycled_share * dropped) and clusters = ceil(recycled / cluster_size), where the
  code has int(0.3 * dropped) + 1 and int(recycled / 10) + 1; the code also always drops at least one
  token (keep <= V - 1), while here keep >= V keeps everything, so a large schedule is the unpruned
  model. The released code computes no rank (its rank term is 0), i.e. `rank_scale=None`.
- Budget mode fixes the counts per layer (the rank floor is not applied), see `budget_keep_counts`;
  `keep_fraction` F is budget mode at a budget of round(F * V) for a prompt of V vision tokens.
- Positions: as the released code's default mode (`modelling_sparse_llama.py` without `USE_VERSION=2_0`)
  does, the shorter sequence takes positions 0..len-1 after each drop and a decoded token the position
  of its layer's cache length (`compact_positions`); its later "V2.0" mode keeps original positions instead.

LLaVA-NeXT: the released code (github.com/Gumpest/SparseVLMs, `llava/model/llava_arch.py`,
`prepare_sparse_inputs_labels_for_multimodal`) packs a NeXT image in the model's own layout (base image,
unpadded crop grid, a newline token per row) and its sparse decoder (`modelling_sparse_llama.py`) treats
the `image_shape` tokens after the system prompt as the vision span (`v_token_num = image_shape`).
`image_shape` is set from `image_features.shape[1]`, written for LLaVA-1.5's batched tensor; on NeXT's list
of packed features that line does not run as released, so we take the reading the rest of the code
implies: the vision span is the whole packed feature, newline tokens included, every token of it scored,
dropped and recycled alike; raters are the text tokens after that span, their relevance a mean over all
of it. The code has no NeXT schedule, so budget mode scales the 64-token schedule to the budget per
prompt as on LLaVA-1.5. The floor check uses the most vision tokens one image can bring
(`max_vision_tokens`, 2928 for a 2 x 2 grid): with the default drops the first three layers and the
recycled tokens alone keep the average above 286.8, so `--budget 160` is refused up front; dropping from
layer 0 (`drop_after=0;6;15`) brings the floor to about 109.3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from llava.drop.blocks import (
    bisect,
    check_budget,
    check_drop_after,
    check_keep_fraction,
    check_share,
    grouped_mean,
    last_count_nudges,
    layer_average,
    nearest_centres,
    planned,
    ranked_keep,
    stage_lengths,
)
from llava.drop.method import PREFILL, TEXT_QUERIES, DropMethod, PromptContext
from llava.drop.methods.registry import OptionAlias, register, same
from llava.model.geometry import ModelGeometry

DEFAULT_DROP_AFTER = (2, 6, 15)
DEFAULT_KEEP = (66, 30, 17)  # the released code's "64 tokens" schedule for LLaVA-1.5
DEFAULT_RECYCLED_SHARE = 0.3
DEFAULT_CLUSTER_SIZE = 10  # recycled tokens per merged token
DEFAULT_RANK_SCALE = 1.0  # the paper's lambda


@dataclass(frozen=True)
class SparseVLMOptions:
    """drop_after: decoder layers (0-based) after which to sparsify; keep: vision tokens kept after each of
    them; recycled_share: share of the dropped tokens merged back; cluster_size: recycled tokens per merged
    token; rank_scale: lambda of the rank-based count (None: schedule only); budget: a target
    layer-averaged vision count that, when set, replaces `keep` (scaled in its proportions) and the
    rank term; keep_fraction: instead of `budget`, that share of each prompt's vision tokens as its budget
    (not `keep`, which is the schedule's counts). The released code's names are aliases: `layers` is
    `drop_after`, `recycle_ratio` is `recycled_share`, values unchanged."""

    option_aliases: ClassVar[dict[str, OptionAlias]] = {
        "layers": OptionAlias("drop_after", tuple[int, ...], same, "drop_after = layers"),
        "recycle_ratio": OptionAlias("recycled_share", float, same, "recycled_share = recycle_ratio"),
    }
    drop_after: tuple[int, ...] = DEFAULT_DROP_AFTER
    keep: tuple[int, ...] = DEFAULT_KEEP
    recycled_share: float = DEFAULT_RECYCLED_SHARE
    cluster_size: int = DEFAULT_CLUSTER_SIZE
    rank_scale: float | None = DEFAULT_RANK_SCALE
    budget: float | None = None
    keep_fraction: float | None = None

    def __post_init__(self):
        check_drop_after(self.drop_after)
        if len(self.keep) != len(self.drop_after):
            raise ValueError(f"keep needs one count per drop: {len(self.drop_after)} layers {self.drop_after}, "
                             f"{len(self.keep)} counts {self.keep}")
        if any(count < 0 for count in self.keep):
            raise ValueError(f"keep counts must be >= 0, got {self.keep}")
        check_share("recycled_share", self.recycled_share)
        if self.cluster_size < 1:
            raise ValueError(f"cluster_size must be >= 1, got {self.cluster_size}")
        if self.rank_scale is not None and self.rank_scale <= 0:
            raise ValueError(f"rank_scale must be > 0 (or None for the schedule alone), got {self.rank_scale}")
        check_budget(self.budget)
        check_keep_fraction(self.keep_fraction, self.budget)
        if (self.budget is not None or self.keep_fraction is not None) and not any(self.keep):
            raise ValueError(f"budget scales the keep schedule, which must have a count > 0, got {self.keep}")


def text_raters(attention: torch.Tensor) -> torch.Tensor:
    """Text rows (ascending) whose mean attention on the vision tokens is >= the mean over rows.

    The threshold is capped at the largest relevance so that float rounding of the mean can never
    leave no rater when every row is equal.
    """
    relevance = attention.mean(dim=1)
    threshold = torch.minimum(relevance.mean(), relevance.max())
    return (relevance >= threshold).nonzero().flatten()


def vision_scores(attention: torch.Tensor) -> torch.Tensor:
    """Mean attention [V] that the raters give each vision token."""
    return attention[text_raters(attention)].mean(dim=0)


def rank_bounded_keep(
    vision_count: int, scheduled: int, rater_attention: torch.Tensor, rank_scale: float | None
) -> int:
    """keep = max(scheduled, V - floor(rank_scale * (V - rank))), at most V: the schedule caps the
    paper's rank-based drop count N = lambda * (V - rank(P))."""
    scheduled = min(scheduled, vision_count)
    if rank_scale is None:
        return scheduled
    rank = int(torch.linalg.matrix_rank(rater_attention.float()))
    return max(scheduled, vision_count - math.floor(rank_scale * (vision_count - rank)))


def recycled_count(dropped: int, share: float) -> int:
    return math.ceil(share * dropped)


def cluster_count(recycled: int, cluster_size: int) -> int:
    return math.ceil(recycled / cluster_size)


def next_vision_count(vision_count: int, keep: int, options: SparseVLMOptions) -> int:
    """Vision tokens after a drop: the kept ones plus one merged token per cluster of recycled ones."""
    keep = min(keep, vision_count)
    return keep + cluster_count(recycled_count(vision_count - keep, options.recycled_share), options.cluster_size)


def stage_counts(vision_count: int, keeps: list[int], options: SparseVLMOptions) -> list[int]:
    """Vision tokens seen before the first drop and after each drop."""
    counts = [vision_count]
    for keep in keeps:
        counts.append(next_vision_count(counts[-1], keep, options))
    return counts


@planned
def budget_keep_counts(vision_count: int, num_layers: int, options: SparseVLMOptions) -> tuple[int, ...]:
    """Keep counts, proportional to `options.keep`, whose layer-averaged vision count (recycled tokens
    included) is closest to the budget.

    The average never decreases with the scale s of keep_i = round(s * keep_i), so s is bisected;
    then the last count, which lasts the most layers and so moves the average most finely, is nudged.
    """
    lengths = stage_lengths(options.drop_after, num_layers)

    def error(keeps: list[int]) -> float:
        return abs(layer_average(stage_counts(vision_count, keeps, options), lengths) - options.budget)

    def scaled(scale: float) -> list[int]:
        return [round(scale * count) for count in options.keep]

    def below(scale: float) -> bool:
        return layer_average(stage_counts(vision_count, scaled(scale), options), lengths) < options.budget

    low, high = bisect(below, 0.0, float(vision_count))
    candidates = [scaled(low), scaled(high)]
    candidates += [nudged for keeps in candidates[:2] for nudged in last_count_nudges(keeps)]
    return tuple(min(candidates, key=error))


def budget_floor(vision_count: int, num_layers: int, options: SparseVLMOptions) -> float:
    """The lowest layer average a budget can reach: every drop keeping nothing, so only the layers up to
    the first drop and the merged recycled tokens count."""
    zero_keeps = [0] * len(options.drop_after)
    return layer_average(stage_counts(vision_count, zero_keeps, options), stage_lengths(options.drop_after, num_layers))


def merge_clusters(hidden: torch.Tensor, scores: torch.Tensor, clusters: int) -> torch.Tensor:
    """[clusters, hidden]: the best-scored rows are centres (in row order); every row joins its most
    cosine-similar centre (a centre joins itself) and each cluster is the mean of its rows."""
    return grouped_mean(hidden, nearest_centres(hidden, ranked_keep(scores, None, clusters)), clusters)


@register
class SparseVLM(DropMethod):
    """Rater-scored drops after a few decoder layers, with the best dropped tokens merged back."""

    name = "sparsevlm"
    family = PREFILL
    compact_positions = True  # as released (its default mode): positions 0..len-1 after each drop
    options_class = SparseVLMOptions
    supports_next = True

    def prefill_layers(self, geometry: ModelGeometry) -> tuple[int, ...]:
        return self.options.drop_after

    def check_model(self, geometry: ModelGeometry) -> None:
        """Also refuse a budget below `budget_floor` of the most vision tokens one image can bring, which the
        bisection would silently stop at."""
        super().check_model(geometry)
        if self.options.budget is None:
            return
        floor = budget_floor(geometry.max_vision_tokens, geometry.decoder_layers, self.options)
        if self.options.budget < floor:
            raise ValueError(f"budget {self.options.budget:g} is below {floor:.1f}, the layer average of "
                             f"drops after layers {self.options.drop_after} keeping no token and recycling "
                             f"{self.options.recycled_share:g} of the dropped ones; {self.floor_hint(geometry)}")

    def floor_hint(self, geometry: ModelGeometry) -> str:
        """The way out of a too-low budget: recycling less helps only while the layers up to the first drop
        alone stay within it."""
        no_recycling = budget_floor(geometry.max_vision_tokens, geometry.decoder_layers,
                                    replace(self.options, recycled_share=0.0))
        if self.options.budget < no_recycling:
            return f"drop first after an earlier layer than {self.options.drop_after[0]}"
        return "lower recycled_share or drop first after an earlier layer"

    def keep_count(self, context: PromptContext, rater_attention: torch.Tensor) -> int:
        """The schedule floored by the rank term, or in budget mode the plan for this prompt's vision count."""
        vision_count = context.layout.vision_count
        stage = self.options.drop_after.index(context.layer_idx)
        options = self.prompt_options(context.prompt_vision_count)
        if options.budget is None:
            return rank_bounded_keep(vision_count, options.keep[stage], rater_attention, options.rank_scale)
        plan = budget_keep_counts(context.prompt_vision_count, context.geometry.decoder_layers, options)
        return min(plan[stage], vision_count)

    def select_prompt(self, context: PromptContext) -> torch.Tensor:
        attention = context.attention(TEXT_QUERIES)
        rater_attention = attention[text_raters(attention)]
        return ranked_keep(rater_attention.mean(dim=0), None, self.keep_count(context, rater_attention))

    def recycle(self, context: PromptContext, kept: torch.Tensor) -> torch.Tensor | None:
        """Merged tokens [clusters, hidden] from the best-scored dropped tokens (None if none)."""
        scores = vision_scores(context.attention(TEXT_QUERIES))
        dropped_mask = torch.ones_like(scores, dtype=torch.bool)
        dropped_mask[kept.to(scores.device)] = False
        dropped = dropped_mask.nonzero().flatten()
        count = recycled_count(dropped.numel(), self.options.recycled_share)
        if count == 0:
            return None
        recycled = dropped[ranked_keep(scores[dropped], None, count)]
        hidden = context.vision_hidden[recycled.to(context.vision_hidden.device)]
        return merge_clusters(hidden, scores[recycled], cluster_count(count, self.options.cluster_size))
