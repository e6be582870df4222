"""SparseVLM (Zhang et al., ICML 2025, "Visual Token Sparsification for Efficient VLM Inference"), as its
authors' released code runs it.

The released code (github.com/Gumpest/SparseVLMs, `llava/model/language_model/modelling_sparse_llama.py`,
`score.py`, `utils.py`; its default mode, `USE_VERSION` unset, the algorithm of its v1.5 branch) is the
default here, and golden fixtures hold us to it (tests/test_golden_released.py, docs/released_code.md):

1. **Raters**, once per prompt, from the decoder's input embeddings (Sec. 3.2): with E_v the vision
   tokens' and E_t those of every token after the image, relevance = softmax(E_v E_t^T over the text).mean
   over the vision tokens; the raters are the text tokens whose relevance is strictly above the mean (all of
   them where none is, e.g. a one-token text, on which the released code would average nothing).
2. After each layer of `drop_after` (2, 6, 15), the layer's own attention, averaged over heads, of the raters
   on the current vision tokens, averaged over the raters, scores them; the best `keep[s]` survive in their
   order (ties to the earlier token).
3. **Recycling** (Sec. 3.4): of the d dropped tokens, the int(recycled_share * d) + 1 best-scored (best
   first) are clustered by DPC-KNN on the layer's output hidden states: Euclidean distances / sqrt(hidden),
   density exp(-mean squared distance to the k nearest, itself included) plus 1e-6 uniform noise, k the
   cluster count int(recycled / cluster_size) + 1; centres are the k tokens of highest density x distance to
   the nearest denser token; every token joins its nearest centre (a centre itself) and a cluster becomes
   sum(members) / (count + 1e-6). The merged tokens follow the kept vision tokens, in centre order, and
   count as vision tokens from the next layer on (the engine inserts them through `recycle`).
4. **Positions**: the shorter sequence takes positions 0..len-1 after each drop, and a decoded token at
   each layer the position of that layer's cache length (`compact_positions`).

The noise: the released code draws `torch.rand` from the global generator (so a run's draws depend on all
that ran before). Here each prompt draws from its own `torch.Generator` seeded with `seed`, the same shapes
in the same order ([1, recycled] at each drop, the counts the schedule gives), so a prompt answers alike
alone and in any batch; the fixtures seed the released run the same way before each question.

Settings: `keep` is the released code's `RETAIN_TOKN` schedule (`score.py`), kept tokens after layers 2, 6
and 15: 192 -> (300, 200, 110), 128 -> (303, 110, 36), 96 -> (238, 48, 26), 64 -> (66, 30, 17), the
default (`RELEASED_SCHEDULES`). Its "Equal Tokens" counts each layer's vision tokens after that layer's
drop, merged tokens included ((2 x 576 + 4 x 82 + 9 x 32 + 17 x 18) / 32 = 64.8 for the 64 schedule); our
budgets count the tokens each layer sees (`docs/method_options.md`), so the 192 / 128 / 96 / 64 schedules
average 206.5 / 145.4 / 114.1 / 82.25 here, and `budget` B (or `keep_fraction`) scales `keep` in its
proportions until that average, counted with the released formulas, is B.

Where this differs from the released code, by choice:
- A schedule count at or above the current vision tokens keeps them all (no drop, no recycling); the
  released code keeps at most V - 1 and merges the one dropped token back (never at its LLaVA-1.5
  settings, where every count is below V). So `keep` >= 576 is the unpruned model.
- Counts clipped where the released formulas overrun (recycled_share 1, cluster_size 1): at most the dropped
  tokens are recycled, at most one cluster per recycled token; `recycled_share=0` recycles nothing.
- DPC-KNN and the relevance run in float32 (the released code runs them in the model's dtype, float16 in
  its scripts), and the noise is drawn on the CPU in float32 (the released code draws on the model's device
  and in its dtype); on a float32 CPU run the two coincide.
- Equal scores go to the earlier token (kept and recycled tokens, centres), where `torch.topk` leaves the
  order unspecified; the released code runs one prompt at a time, this any batch, each prompt as alone.
- `rank_scale` (None by default: the released code computes no rank) adds the paper's adaptive count
  N = lambda (V - rank(P)), P the raters' attention rows: keep = max(scheduled, V - floor(lambda (V - rank))).
  Its draws still follow the schedule's counts.

LLaVA-NeXT: the released code (`llava/model/llava_arch.py`, `prepare_sparse_inputs_labels_for_multimodal`)
packs a NeXT image in the model's own layout (base image, unpadded crop grid, a newline token per row), then
sets `image_shape = image_features.shape[1]`, written for LLaVA-1.5's batched tensor: on NeXT's list of
packed features it raises AttributeError, so the released code does not run on NeXT. Its sparse decoder
treats the `image_shape` tokens after the system prompt as the vision span, so we take the reading the rest
of the code implies: the vision span is the whole packed feature, newline tokens included, every token of
it scored, dropped and recycled alike. The code has no NeXT schedule, so budget mode scales the 64-token
schedule to the budget per prompt as on LLaVA-1.5. The floor check uses the most vision tokens one image can
bring (`max_vision_tokens`, 2928 for a 2 x 2 grid): with the default drops the first three layers and the
recycled tokens alone keep the average at 286.8 or more, so `--budget 160` is refused up front; dropping from
layer 0 (`drop_after=0;6;15`) brings the floor to 109.3. The golden fixtures for NeXT come from the released code
with that one line reading the packed feature's length.

Options, in the one vocabulary of docs/method_options.md: `drop_after` lists the 0-based layers after which
SparseVLM drops (the released code's `pruning_loc`, the same numbers), `keep` the vision tokens kept after
each, and `recycled_share` the share of the dropped tokens recycled (the code's 0.3); `layers` and
`recycle_ratio` are accepted as aliases.
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
    index_sum,
    last_count_nudges,
    layer_average,
    planned,
    ranked_keep,
    stable_top_k,
    stage_lengths,
)
from llava.drop.method import PREFILL, TEXT_QUERIES, DropMethod, PromptContext
from llava.drop.methods.registry import OptionAlias, register, same
from llava.model.geometry import ModelGeometry

DEFAULT_DROP_AFTER = (2, 6, 15)  # the released `pruning_loc`
# The released `RETAIN_TOKN` settings (`score.py`, default mode): kept tokens after each of DEFAULT_DROP_AFTER.
RELEASED_SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
DEFAULT_KEEP = RELEASED_SCHEDULES[64]
DEFAULT_RECYCLED_SHARE = 0.3  # `int(dropped * 0.3) + 1` recycled tokens
DEFAULT_CLUSTER_SIZE = 10  # `int(recycled / 10) + 1` clusters
DEFAULT_SEED = 0
DENSITY_NOISE = 1e-6  # DPC-KNN's tie-breaking noise, times a uniform draw
MERGE_EPSILON = 1e-6  # a cluster is sum(members) / (count + MERGE_EPSILON)
DISTANCE_BLOCK = 1 << 24  # difference elements per block of the pairwise distances (64 MiB in float32)


@dataclass(frozen=True)
class SparseVLMOptions:
    """drop_after: decoder layers (0-based) after which to sparsify; keep: vision tokens kept after each of
    them (the released schedules are RELEASED_SCHEDULES); recycled_share: share of the dropped tokens recycled
    (int(share * dropped) + 1 of them); cluster_size: recycled tokens per merged token (int(recycled /
    cluster_size) + 1 clusters); rank_scale: lambda of the paper's rank-based count (None: the schedule alone,
    as released); seed: the seed of DPC-KNN's density noise, drawn per prompt; budget: a target
    layer-averaged vision count that, when set, replaces `keep` (scaled in its proportions) and the rank term;
    keep_fraction: instead of `budget`, that share of each prompt's vision tokens as its budget (not `keep`,
    which is the schedule's counts). The released code's names are aliases: `layers` is `drop_after`,
    `recycle_ratio` is `recycled_share`, values unchanged."""

    option_aliases: ClassVar[dict[str, OptionAlias]] = {
        "layers": OptionAlias("drop_after", tuple[int, ...], same, "drop_after = layers"),
        "recycle_ratio": OptionAlias("recycled_share", float, same, "recycled_share = recycle_ratio"),
    }
    drop_after: tuple[int, ...] = DEFAULT_DROP_AFTER
    keep: tuple[int, ...] = DEFAULT_KEEP
    recycled_share: float = DEFAULT_RECYCLED_SHARE
    cluster_size: int = DEFAULT_CLUSTER_SIZE
    rank_scale: float | None = None
    seed: int = DEFAULT_SEED
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


def text_raters(vision_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """The text tokens (ascending indices among those after the image) whose relevance to the image is strictly
    above the mean relevance: softmax over the text of each vision token's dot products with the text
    embeddings, averaged over the vision tokens. Every text token where none is above the mean."""
    relevance = (vision_embeds.float() @ text_embeds.float().T).softmax(dim=1).mean(dim=0)
    raters = (relevance > relevance.mean()).nonzero().flatten()
    return raters if raters.numel() else torch.arange(relevance.numel(), device=relevance.device)


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
    """The released int(share * dropped) + 1, at most the dropped tokens; none when nothing is dropped or the
    share is 0."""
    if dropped == 0 or share == 0:
        return 0
    return min(int(share * dropped) + 1, dropped)


def cluster_count(recycled: int, cluster_size: int) -> int:
    """The released int(recycled / cluster_size) + 1, at most one per recycled token."""
    return min(int(recycled / cluster_size) + 1, recycled)


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


def density_noise(seed: int, vision_count: int, keeps: tuple[int, ...], stage: int, count: int,
                  options: SparseVLMOptions) -> torch.Tensor:
    """The uniform draws [count] of drop `stage`: a generator seeded with `seed` draws, in order, a [1, recycled]
    block for every earlier drop of the schedule `keeps` (as the released code's `torch.rand` does for each of
    its clusterings), then this one's."""
    generator = torch.Generator().manual_seed(seed)
    for before in range(stage):
        kept = min(keeps[before], vision_count)
        recycled = recycled_count(vision_count - kept, options.recycled_share)
        if recycled:
            torch.rand((1, recycled), generator=generator)
        vision_count = next_vision_count(vision_count, kept, options)
    return torch.rand((1, count), generator=generator)[0]


def pairwise_distances(tokens: torch.Tensor) -> torch.Tensor:
    """[N, N] Euclidean distances, each the norm of the difference of two rows as the released code takes it,
    computed a block of rows at a time so that the [rows, N, hidden] differences stay small."""
    count, width = tokens.shape
    rows = max(1, DISTANCE_BLOCK // max(1, count * width))
    return torch.cat([(tokens[start : start + rows, None] - tokens[None]).norm(dim=-1, p=2)
                      for start in range(0, count, rows)])


def best_dropped(scores: torch.Tensor, kept: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` best-scored tokens outside `kept`, best first (ties to the earlier token): the recycled tokens,
    in the order DPC-KNN receives them."""
    dropped_mask = torch.ones_like(scores, dtype=torch.bool)
    dropped_mask[kept.to(scores.device)] = False
    dropped = dropped_mask.nonzero().flatten()
    return dropped[stable_top_k(scores[dropped], count)]


def dpc_knn_scores(tokens: torch.Tensor, clusters: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The released `cluster_and_merge`'s distances [N, N] between one prompt's recycled tokens [N, hidden]
    (float32, Euclidean / sqrt(hidden)) and each token's claim to be a centre [N]: its density (exp of minus
    the mean squared distance to its `clusters` nearest, itself included, plus the noise) times its distance
    to the nearest denser token (the largest distance for the densest)."""
    count, width = tokens.shape
    distance = pairwise_distances(tokens) / (width ** 0.5)
    nearest = torch.topk(distance, k=clusters, dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp() + noise.to(tokens.device) * DENSITY_NOISE
    denser = density[None, :] > density[:, None]  # [i, j]: token j is denser than token i
    to_denser = torch.where(denser, distance, distance.max()).min(dim=-1).values
    return distance, to_denser * density


def dpc_knn(tokens: torch.Tensor, clusters: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN as released: the centres [clusters] (rows of `tokens`, the best `dpc_knn_scores` first, ties to
    the earlier row) and each token's cluster [N] (its nearest centre, the earlier on a tie; a centre its own)."""
    distance, scores = dpc_knn_scores(tokens, clusters, noise)
    centres = stable_top_k(scores, clusters)
    assignment = distance[centres].argmin(dim=0)
    assignment[centres] = torch.arange(clusters, device=tokens.device)
    return centres, assignment


def merge_clusters(tokens: torch.Tensor, assignment: torch.Tensor, clusters: int) -> torch.Tensor:
    """[clusters, hidden]: each cluster's sum(members) / (count + MERGE_EPSILON), as released."""
    count, width = tokens.shape
    members = index_sum(tokens.new_zeros(clusters), assignment, tokens.new_ones(count)) + MERGE_EPSILON
    weights = 1.0 / members[assignment]
    return index_sum(tokens.new_zeros(clusters, width), assignment, tokens * weights[:, None])


@register
class SparseVLM(DropMethod):
    """Text-rated drops after a few decoder layers, the best dropped tokens clustered and merged back."""

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

    def schedule(self, context: PromptContext) -> tuple[SparseVLMOptions, tuple[int, ...]]:
        """The prompt's options and its keep counts: the schedule, or in budget mode the plan for its vision count."""
        options = self.prompt_options(context.prompt_vision_count)
        if options.budget is None:
            return options, options.keep
        return options, budget_keep_counts(context.prompt_vision_count, context.geometry.decoder_layers, options)

    def rater_attention(self, context: PromptContext) -> torch.Tensor:
        """[raters, vision]: the raters' head-averaged attention rows on the current vision tokens (once per
        layer: the selection and the recycling read them both)."""
        def rows() -> torch.Tensor:
            raters = text_raters(*context.prompt_embeddings())
            return context.attention(TEXT_QUERIES)[raters.to(context.layer_output.device)]

        return context.memo("sparsevlm_rater_attention", rows)

    def keep_count(self, context: PromptContext, rater_attention: torch.Tensor) -> int:
        """The schedule, floored by the rank term where `rank_scale` is set (not in budget mode)."""
        options, keeps = self.schedule(context)
        scheduled = keeps[options.drop_after.index(context.layer_idx)]
        if options.budget is not None:
            return min(scheduled, context.layout.vision_count)
        return rank_bounded_keep(context.layout.vision_count, scheduled, rater_attention, options.rank_scale)

    def select_prompt(self, context: PromptContext) -> torch.Tensor:
        rater_attention = self.rater_attention(context)
        return ranked_keep(rater_attention.mean(dim=0), None, self.keep_count(context, rater_attention))

    def recycle(self, context: PromptContext, kept: torch.Tensor) -> torch.Tensor | None:
        """Merged tokens [clusters, hidden] from the best-scored dropped tokens (None if none)."""
        scores = self.rater_attention(context).mean(dim=0)
        options, keeps = self.schedule(context)
        count = recycled_count(scores.numel() - kept.numel(), options.recycled_share)
        if count == 0:
            return None
        recycled = best_dropped(scores, kept, count)
        hidden = context.vision_hidden[recycled.to(context.vision_hidden.device)]
        stage = options.drop_after.index(context.layer_idx)
        noise = density_noise(options.seed, context.prompt_vision_count, keeps, stage, count, options)
        clusters = cluster_count(count, options.cluster_size)
        _, assignment = dpc_knn(hidden.float(), clusters, noise)
        return merge_clusters(hidden.float(), assignment, clusters).to(hidden.dtype)
