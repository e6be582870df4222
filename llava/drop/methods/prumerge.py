"""PruMerge and PruMerge+ (Shang et al., 2024, arXiv 2403.15388, "LLaVA-PruMerge: Adaptive Token Reduction
for Efficient Large Multimodal Models"): vision-stage methods.

Both shrink each CLIP image (576 patches) before the projector and leave the decoder alone. We follow the
authors' released code (github.com/42Shawn/LLaVA-PruMerge, `llava/model/multimodal_encoder/clip_encoder.py`,
`token_prune_merge_advanced` for PruMerge and `token_prune_merge_advanced_plus` for PruMerge+) wherever it
and the paper's text differ; each such choice is listed below.

The paper's steps, and how the released code (and so this module) does them:

- **Adaptive important-token selection via IQR outlier detection** (Sec. 3.1): the CLS query's
  attention over the patches, cls_attn [576], is taken in the tower layer that FOLLOWS LLaVA's select
  layer (the released code hooks layer 23 of 24 = the last layer, on its input, which is the select
  layer's output hidden_states[-2] with CLS). Code details: one full-width attention, no head split:
  q = q_proj(layer_norm1(h)), k = k_proj(layer_norm1(h)) (biases included), softmax(q k^T * C**-0.5)
  with C the tower's hidden size (not the head size), the softmax taken over all keys, CLS included, and
  cls_attn = its CLS row without the CLS column. The patches whose cls_attn lies above Q3 + 1.5 * IQR
  (quartiles by numpy's default linear interpolation) are the outliers; their count, `ratio` = count / N
  in the code, is the image's own number of kept tokens, taken as the top int(N * ratio) by cls_attn,
  best first (topk(sorted=True)); we break ties by a stable sort (earlier patch first).
- **Token supplement via similar-key clustering** (Sec. 3.2): every kept token i takes the `neighbours`
  (32 in the code) tokens whose keys (the same layer's full-width keys, CLS excluded) are most
  cosine-similar to its own key, among ALL other patches. The paper speaks of clustering the pruned
  tokens onto the kept ones; the released code's candidates are the other kept tokens as well as the
  pruned ones, so the groups overlap (and a pruned patch may join several kept tokens, or none). The
  kept token becomes X_i + sum_j cls_attn_j * X_j over its neighbours j, with X the select-layer features
  and the neighbours' ORIGINAL features (not their updated ones). The code names this a weighted average
  but does NOT divide by the weights' sum (`/ torch.sum(weights)` is commented out) and adds the sum to
  X_i: we follow the code. With fewer than `neighbours` other patches we take all of them.
- **One extra token** (released code only): sum over the pruned patches (those not kept) of
  cls_attn_j * X_j, appended after the kept tokens; a zero vector when nothing was pruned.
- **PruMerge+: spatially uniform sampling** (the paper's PruMerge+ section): the outliers are
  supplemented by patches sampled on a uniform stride over the grid. Code: step = int(1 / ratio),
  positions arange(0, N - 1, int(step / 3)) (the code writes 575 = N - 1, so the last patch is never
  sampled), those not already kept appended in ascending order after the outliers; then the same
  merge and extra token over this larger kept set. Two edge cases crash the released code and are
  decided here: no outliers (ratio 0, a division by zero): 1 / ratio is infinite, so the stride exceeds
  the grid and, as arange does for any stride >= N - 1, only position 0 is sampled (the limit of the
  code's rule as the ratio goes to 0); more than a third of the patches as outliers (int(step / 3) == 0,
  a zero arange step): the stride is clamped to 1, i.e. every position 0..N - 2 is sampled.

Vision tokens = projector([CLS] + kept tokens (PruMerge+: outliers, then samples) + extra token); the
CLS row is the select layer's CLS hidden state, dropped as LLaVA's `patch` select strategy does (the
released code's `select_feature = 'patch'`) and kept in front under the `full` strategy. So PruMerge
gives outliers + 1 tokens per image and PruMerge+ outliers + samples + 1.

Budget (`--budget N`): `prumerge` then runs the released code's non-adaptive mode (`if_adaptive=False`,
a fixed count instead of the IQR count): the top N - 1 patches by cls_attn + the extra token, exactly N
tokens. N = 1 is allowed and keeps no patch, only the extra token (the attention-weighted sum of all
patches), as the released code does for a count of 0. `prumerge_plus` picks its own count per image and
refuses a budget (its released non-adaptive branch is a training-time variant with a different sampling
rule, which we do not run). On LLaVA-NeXT every tower image (base image, then the crops) is reduced on
its own and the budget shared over them (`ImageReduction`).

Other differences from the released code: scores (cls_attn, cosine similarities) and the merge are
computed in float32 and the merged tokens cast back to the tower's dtype (the code stays in the tower's
dtype); the merge is one matrix product instead of a Python loop per kept token (same neighbours and
weights, summed in another order). The released inference instructions use LoRA-finetuned checkpoints;
here the method runs training-free on whatever checkpoint is loaded.

Counts: PruMerge+ can keep every patch (more than a sixth of them as outliers gives stride 1, which
samples all but the last patch; if the last is an outlier nothing is pruned), and then, as the released
code does, still appends the extra token, a zero vector: N + 1 tokens, one more than the unpruned model.

Golden fixtures (tests/test_golden_released.py, docs/released_code.md): on the demo questions our kept
patches and answers equal the released reductions' for both variants.

`patch_groups`: a kept token stands for itself and its neighbours (ascending), the extra token for
every pruned patch (ascending); the groups overlap, as the merge does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llava.drop.blocks import check_budget, check_keep_fraction, stable_top_k
from llava.drop.image_reduction import ImageReduction, ReducedImage
from llava.drop.method import ENCODER
from llava.drop.methods.registry import register
from llava.drop.timing import Stopwatch
from llava.drop.vision import CLS_INDEX, PATCHES_START, embed_patches, run_tower_to, selected_layer_count

NEIGHBOURS = 32  # most key-similar tokens merged into each kept token (the released code's k=int(32))
QUARTILES = (0.25, 0.75)  # Q1 and Q3 of the CLS attention
IQR_FENCE = 1.5  # an outlier lies above Q3 + IQR_FENCE * (Q3 - Q1)
STRIDE_DIVISOR = 3  # PruMerge+ samples every int(step / 3)-th position, step = int(1 / ratio)
EXTRA_TOKENS = 1  # the attention-weighted sum of the pruned patches, after the kept tokens


@dataclass(frozen=True)
class PruMergeOptions:
    """`budget`: vision tokens per image (top budget - 1 patches + the extra token) instead of the IQR
    count, or `keep_fraction`: that share of each prompt's vision tokens as its budget; `neighbours`: how
    many key-similar tokens each kept token absorbs."""

    budget: float | None = None
    neighbours: int = NEIGHBOURS
    keep_fraction: float | None = None

    def __post_init__(self):
        check_budget(self.budget, whole=True)
        check_keep_fraction(self.keep_fraction, self.budget)
        if self.neighbours < 0:
            raise ValueError(f"neighbours must be >= 0, got {self.neighbours}")


@dataclass(frozen=True)
class PruMergePlusOptions(PruMergeOptions):
    """PruMerge+'s options: `neighbours` only; its token count is its own (a budget is refused)."""

    def __post_init__(self):
        if self.budget is not None:
            raise ValueError(f"prumerge_plus picks its own token count per image (IQR outliers + uniform samples) "
                             f"and takes no budget (got {self.budget:g}); run it without --budget, or use "
                             "prumerge with a budget")
        if self.keep_fraction is not None:
            raise ValueError(f"prumerge_plus picks its own token count per image (IQR outliers + uniform samples) "
                             f"and takes no keep fraction (got {self.keep_fraction:g}); run it without --keep, or "
                             "use prumerge with a keep fraction")
        super().__post_init__()


def outlier_count(cls_attn: torch.Tensor) -> int:
    """How many of the scores [N] lie above Q3 + 1.5 * IQR (quartiles linearly interpolated, as numpy's
    default `percentile`)."""
    scores = cls_attn.float()
    q1, q3 = torch.quantile(scores, torch.tensor(QUARTILES, device=scores.device), interpolation="linear")
    upper = q3 + IQR_FENCE * (q3 - q1)
    return int((scores > upper).sum())


def adaptive_keep_count(outliers: int, patches: int) -> int:
    """The released code's kept count int(N * ratio), ratio = outliers / N (equal to `outliers`)."""
    return int(patches * (outliers / patches))


def sample_stride(outliers: int, patches: int) -> int:
    """PruMerge+'s sampling stride int(int(1 / ratio) / 3), ratio = outliers / N; no outliers gives a
    stride past the grid (1 / ratio is infinite: only position 0 is sampled), a zero stride is clamped to 1."""
    if outliers == 0:
        return patches
    step = int(1 / (outliers / patches))
    return max(int(step / STRIDE_DIVISOR), 1)


def uniform_samples(kept: torch.Tensor, patches: int, outliers: int) -> torch.Tensor:
    """Positions arange(0, N - 1, stride) not already in `kept`, ascending (PruMerge+'s supplement)."""
    positions = torch.arange(0, patches - 1, sample_stride(outliers, patches), device=kept.device)
    return positions[~torch.isin(positions, kept)]


def pruned_patches(kept: torch.Tensor, patches: int) -> torch.Tensor:
    """The patches not in `kept`, ascending."""
    mask = torch.ones(patches, dtype=torch.bool, device=kept.device)
    mask[kept] = False
    return mask.nonzero().flatten()


def similar_neighbours(keys: torch.Tensor, kept: torch.Tensor, count: int) -> torch.Tensor:
    """For each kept patch (in `kept` order), the patches [K, min(count, N - 1)] with the most
    cosine-similar keys [N, dim] among all others, most similar first.

    Candidates are listed as the released code lists them (the other kept patches in kept order, then the
    pruned ones ascending) and equal similarities go to the earlier candidate.
    """
    patches = keys.shape[0]
    order = torch.cat([kept, pruned_patches(kept, patches)])
    normed = F.normalize(keys.float(), p=2, dim=-1)
    similarity = normed[kept] @ normed[order].T  # [K, N]; kept patch i sits in column i
    rows = torch.arange(kept.shape[0], device=keys.device)
    similarity[rows, rows] = float("-inf")
    columns = torch.sort(similarity, dim=-1, descending=True, stable=True).indices[:, :min(count, patches - 1)]
    return order[columns]


def merge_tokens(features: torch.Tensor, cls_attn: torch.Tensor, kept: torch.Tensor,
                 neighbours: torch.Tensor) -> torch.Tensor:
    """Each kept patch's features plus the cls_attn-weighted sum (NOT normalised, as the released code) of
    its neighbours' original features, then the extra token: the cls_attn-weighted sum of the pruned
    patches. `features` [N, dim], `cls_attn` [N], `neighbours` [K, k] patch indices; returns [K + 1, dim]
    in `features`' dtype (computed in float32)."""
    values, weights = features.float(), cls_attn.float()
    mixing = torch.zeros(kept.shape[0], features.shape[0], device=features.device)
    mixing.scatter_(1, neighbours, weights[neighbours])
    merged = values[kept] + mixing @ values
    pruned = pruned_patches(kept, features.shape[0])
    extra = weights[pruned] @ values[pruned]
    return torch.cat([merged, extra[None]]).to(features.dtype)


def merge_groups(kept: torch.Tensor, neighbours: torch.Tensor, patches: int) -> list[list[int]]:
    """Per output token the patches it stands for: a kept patch with its neighbours, then all pruned ones."""
    groups = [sorted([patch, *others]) for patch, others in zip(kept.tolist(), neighbours.tolist())]
    return groups + [pruned_patches(kept, patches).tolist()]


def scoring_layer(layers, selected: int) -> torch.nn.Module:
    """The tower layer after the select layer, whose attention PruMerge reads (the released code's 23)."""
    if selected >= len(layers):
        raise ValueError(f"PruMerge reads the attention of the tower layer after the select layer, but "
                         f"vision_feature_layer selects the last of the {len(layers)} layers' outputs; "
                         "use a checkpoint that selects an earlier layer (LLaVA's default is -2)")
    return layers[selected]


@torch.no_grad()
def cls_attention_and_keys(layer: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width (no head split) CLS attention over the patches [n, N] (float32, softmax over all keys,
    CLS included) and the patches' keys [n, N, dim] of `layer`, given its input `hidden` [n, 1 + N, dim]."""
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden)
    keys = attention.k_proj(normed)
    query = attention.q_proj(normed[:, CLS_INDEX])
    logits = torch.einsum("nd,ntd->nt", query.float(), keys.float()) * hidden.shape[-1] ** -0.5
    return logits.softmax(dim=-1)[:, PATCHES_START:], keys[:, PATCHES_START:]


@register
class PruMerge(ImageReduction):
    """IQR-outlier patches (or the top budget - 1) each merged with its most key-similar tokens, plus one
    token summing the pruned patches (module docstring)."""

    name = "prumerge"
    family = ENCODER
    compact_positions = True  # nothing is dropped inside the decoder: positions never change
    options_class = PruMergeOptions
    # The CLS query's projection is one matrix product over the images it scores, whose rounding depends on
    # how many there are: scoring several prompts' images at once moves scores by ~1e-6 and can swap a token.
    prompts_together = False

    def kept_patches(self, cls_attn: torch.Tensor, count: int | None) -> torch.Tensor:
        """Patches kept whole, in output order: the top ones by cls_attn, best first; `count` (a share of
        the budget, extra token included) fixes how many, None takes the IQR outliers."""
        patches = cls_attn.shape[0]
        keep = adaptive_keep_count(outlier_count(cls_attn), patches) if count is None else count - EXTRA_TOKENS
        return stable_top_k(cls_attn, keep)

    @torch.no_grad()
    def reduce(self, model, images: torch.Tensor, counts: list[int | None], selecting: Stopwatch) -> list[ReducedImage]:
        tower = model.model.vision_tower
        layers = tower.encoder.layers
        selected = selected_layer_count(len(layers), model.config.vision_feature_layer)
        layer = scoring_layer(layers, selected)
        hidden = run_tower_to(layers, embed_patches(tower, images), 0, {selected})[selected]
        with selecting:
            cls_attn, keys = cls_attention_and_keys(layer, hidden)
            return [self.reduce_image(hidden[image], cls_attn[image], keys[image], count)
                    for image, count in enumerate(counts)]

    def reduce_image(self, hidden: torch.Tensor, cls_attn: torch.Tensor, keys: torch.Tensor,
                     count: int | None) -> ReducedImage:
        """One image's select-layer states [1 + N, dim] reduced to CLS + kept tokens + the extra token."""
        features = hidden[PATCHES_START:]
        kept = self.kept_patches(cls_attn, count)
        neighbours = similar_neighbours(keys, kept, self.options.neighbours)
        tokens = merge_tokens(features, cls_attn, kept, neighbours)
        return ReducedImage(torch.cat([hidden[:PATCHES_START], tokens]),
                            merge_groups(kept, neighbours, features.shape[0]))


@register
class PruMergePlus(PruMerge):
    """PruMerge with spatially uniform samples added after the outliers (module docstring); no budget."""

    name = "prumerge_plus"
    options_class = PruMergePlusOptions
    own_count = True

    def kept_patches(self, cls_attn: torch.Tensor, count: int | None) -> torch.Tensor:
        """The IQR outliers best first, then the uniform samples not among them, ascending."""
        patches = cls_attn.shape[0]
        outliers = outlier_count(cls_attn)
        top = stable_top_k(cls_attn, adaptive_keep_count(outliers, patches))
        return torch.cat([top, uniform_samples(top, patches, outliers)])
