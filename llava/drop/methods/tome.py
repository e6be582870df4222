"""ToMe (Bolya et al., ICLR 2023, "Token Merging: Your ViT But Faster") inside LLaVA's CLIP tower.

The tower is run layer by layer up to LLaVA's select layer (`vision_feature_layer`, -2: 23 of CLIP-L's
24 layers), and every run layer merges tokens as the paper's section 3 "Token Merging" describes:

- **Where** ("Strategy"): between the attention and the MLP of each layer,
  x = x + attn(norm1(x)); merge r tokens; x = x + mlp(norm2(x)).
- **Similarity** ("Token Similarity"): the layer's attention keys (k_proj of norm1(x)), averaged over
  heads, compared by cosine similarity.
- **Bipartite Soft Matching**: the current tokens alternate into set A (positions 0, 2, 4, ...) and B
  (positions 1, 3, ...) of the sequence in ToMe's order (below). CLS, at position 0 in A, is never merged
  (its scores are -inf, as ToMe's `class_token` protection). Every A token finds its most similar B
  token (ties to the earlier B token); the r A tokens whose best match scores highest merge into that
  match (a stable descending sort, so a tie goes to the earlier A token and results are reproducible).
- **Tracking Token Size**: each token stands for `size` patches (1 at the start; sizes add up on a
  merge) and a merge is the size-weighted average, (sum of x * size) / (sum of sizes), over the
  destination and its sources. Proportional attention adds log(size) of each *key* token to the
  attention logits, softmax(QK^T / sqrt(d) + log s), so that a merged token weighs as the patches it
  stands for. Merges are computed in float32 and returned in the tower's dtype.

Our choices, where the paper or its code leaves room or does otherwise:

- **Order: the released code's inside the tower, the original one out of it.** After each merge the
  tokens run on in the order ToMe's `merge` returns them: the unmerged A tokens, then every B token, each
  ascending (CLS first). That order decides the next layer's A and B sets, so it is part of the merge rule,
  not only of the output: keeping the original order inside the tower instead (as this module did before
  the golden comparison) pairs other tokens from the second layer on, and none of the 48 image x setting
  runs of `tests/fixtures/golden_tome.json` then merged as the release does. At the select layer every
  token is put back at the original position of the token it grew from (the B token its merges ended in),
  so CLS stays first and the tokens keep their relative image order: CLIP does not care, LLaVA's decoder,
  which reads the tokens as a sequence with positions, does; the release has no LLaVA code to follow.
- **Schedule** (the paper's "constant" schedule): `--budget N` (N = patch tokens leaving the tower, CLS
  not counted) merges 576 - N tokens over the L run layers as a constant r, r_l = (576 - N) // L, the
  first (576 - N) % L layers merging one more. A layer can merge at most (tokens - 1) // 2 of its tokens
  (CLS protected, as ToMe caps r); a budget whose schedule asks more anywhere is refused with the
  smallest budget that is reachable. Without a budget, `r` tokens (default 8) merge in every run layer,
  capped per layer the same way. The default is the ViT-L setting of the paper's Table 1 and of ToMe's
  README (off-the-shelf ViT-L/16, r = 8; r = 16 is their ViT-B setting): on LLaVA-1.5's 23 run layers it
  leaves 576 - 23 x 8 = 392 patch tokens.
- **Exactness**: where a layer merges nothing and every size is still 1, the layer itself runs
  (`layer(hidden, None)`), so r = 0 or budget 576 gives the unpruned features bit for bit.
- **Each image on its own**: images merge differently, so shapes differ; LLaVA-NeXT's base image and
  crops are each one tower image with its share of the budget (`ImageReduction`).
- **Patch groups**: a map from every original patch to the token that stands for it is updated on each
  merge, so every output token lists the row-major patches it covers (CLS covers none).

What is compared with the release, and why only the tower: ToMe's authors (facebookresearch/ToMe)
released code for timm, SWAG and MAE vision transformers and none for LLaVA, so there is no released
LLaVA run whose answers we could match. The stage ToMe changes does run: `tools/golden_tome.py` runs
LLaVA's own CLIP tower (haotian-liu/LLaVA's `CLIPVisionTower`, transformers 4.37) with every layer run by
the release's `ToMeBlock` / `ToMeAttention` forward and its `bipartite_soft_matching`, `merge_wavg` and
`merge_source` (facebookresearch/ToMe af95e4b, unchanged; the adapter that hands CLIP's modules to them
is ours), on the tiny checkpoint over the 12 demo images at r = 8 and budgets 192, 128 and 64, and
`tests/test_golden_tome.py` checks that every run layer leaves the same tokens and the same patch groups,
and that the select layer's tokens have the same sizes and feature norms (1e-5), except from a layer
where our matching hangs on a cosine tie within 1e-6 (the tiny tower's keys are nearly parallel: 15 of
the 48 runs part at such a tie, each named by the test; the three we looked up in the release's own
scores tie there too). The rest of our choices are outside what the release decides: order at the output
(above), budgets (the release takes r or a list of r per layer; a budget is our constant schedule handed
to it as that list), float32 merges (the release merges in the tower's dtype), stable tie rules (the
release's `argsort` is not stable).

The reachability of a budget depends on the tower's depth, which the configuration-only geometry does
not give, so it is checked when the model runs (`reduce`), before any layer does.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llava.drop.blocks import check_budget, check_keep_fraction, index_sum, stable_top_k
from llava.drop.image_reduction import ImageReduction, ReducedImage
from llava.drop.method import ENCODER
from llava.drop.methods.registry import register
from llava.drop.timing import Stopwatch
from llava.drop.vision import CLS_INDEX, PATCHES_START, embed_patches, selected_layer_count

DEFAULT_R = 8  # tokens merged per layer without a budget: ToMe's ViT-L setting (paper Table 1, README)
SET_STRIDE = 2  # bipartite sets alternate: A = positions 0, 2, 4, ...; B = positions 1, 3, 5, ...
A_START, B_START = 0, 1


@dataclass(frozen=True)
class ToMeOptions:
    """Tokens merged per run layer; `budget` (patch tokens leaving the tower) overrides it, and so does
    `keep_fraction` (that share of each prompt's vision tokens as its budget)."""

    r: int = DEFAULT_R
    budget: float | None = None
    keep_fraction: float | None = None

    def __post_init__(self):
        if self.r < 0:
            raise ValueError(f"r (tokens merged per layer) must be >= 0, got {self.r}")
        check_budget(self.budget, whole=True)
        check_keep_fraction(self.keep_fraction, self.budget)


# --- schedule -----------------------------------------------------------------------------------------

def mergeable(tokens: int) -> int:
    """Most tokens one layer can merge out of `tokens` (CLS included): every A token but CLS, i.e.
    (tokens - 1) // 2, the cap ToMe puts on r with a class token."""
    return (tokens - PATCHES_START) // SET_STRIDE


def constant_schedule(merges: int, layers: int) -> list[int]:
    """`merges` spread over `layers` as a constant r, the first layers taking the remainder."""
    share, remainder = divmod(merges, layers)
    return [share + int(layer < remainder) for layer in range(layers)]


def first_overdrawn_layer(schedule: list[int], patches: int) -> int | None:
    """The first layer whose merges exceed what its tokens allow (None: the schedule is reachable)."""
    tokens = PATCHES_START + patches
    for layer, merges in enumerate(schedule):
        if merges > mergeable(tokens):
            return layer
        tokens -= merges
    return None


def smallest_reachable_count(patches: int, layers: int) -> int:
    """Fewest patch tokens a constant schedule over `layers` can leave of `patches`: the reachable counts
    are those from this one up (a smaller count asks every layer for at least as many merges out of at
    most as many tokens)."""
    for count in range(1, patches + 1):
        if first_overdrawn_layer(constant_schedule(patches - count, layers), patches) is None:
            return count
    return patches


def capped_schedule(r: int, layers: int, patches: int) -> list[int]:
    """`r` merges in every layer, each capped at what that layer's tokens allow."""
    schedule, tokens = [], PATCHES_START + patches
    for _ in range(layers):
        schedule.append(min(r, mergeable(tokens)))
        tokens -= schedule[-1]
    return schedule


# --- bipartite soft matching --------------------------------------------------------------------------

def bipartite_matches(metric: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sources, destinations): positions of the r A tokens to merge and of the B token each merges into.

    `metric` [t, k] is compared by cosine; the A token at CLS_INDEX is never chosen. Best matches and
    the ranking both break ties toward the earlier token (stable sorts), so results are reproducible.
    """
    normed = F.normalize(metric.float(), dim=-1)
    a_positions = torch.arange(A_START, metric.shape[0], SET_STRIDE, device=metric.device)
    b_positions = torch.arange(B_START, metric.shape[0], SET_STRIDE, device=metric.device)
    scores = normed[a_positions] @ normed[b_positions].T
    scores[a_positions == CLS_INDEX] = float("-inf")
    ranked = torch.sort(scores, dim=-1, descending=True, stable=True)
    best, match = ranked.values[:, 0], ranked.indices[:, 0]
    chosen = stable_top_k(best, r)
    return a_positions[chosen], b_positions[match[chosen]]


def released_order(tokens: int, sources: torch.Tensor) -> torch.Tensor:
    """The positions of the tokens a merge keeps, in the order ToMe's `merge` returns them: the unmerged A
    tokens ascending (CLS first, as its `class_token` sort), then every B token ascending."""
    positions = torch.arange(tokens, device=sources.device)
    rank = positions + (positions % SET_STRIDE == B_START) * tokens  # A before B, each ascending
    rank[sources] = SET_STRIDE * tokens  # merged away: after every kept token
    return rank.argsort()[: tokens - sources.shape[0]]


def weighted_merge(tokens: torch.Tensor, sizes: torch.Tensor, sources: torch.Tensor,
                   destinations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge each source token into its destination (the size-weighted average, module docstring).

    Returns the merged tokens [t - r, dim] in ToMe's order (`released_order`; input dtype; tokens no merge
    touched keep their exact values), their sizes [t - r] (float32), for each of the t input tokens the
    position of the token that now stands for it, and the input position of each output token.
    """
    values, sizes = tokens.float(), sizes.float()
    weighted = values * sizes[:, None]
    totals = index_sum(weighted, destinations, weighted[sources])
    new_sizes = index_sum(sizes, destinations, sizes[sources])
    touched = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    touched[destinations] = True
    merged = torch.where(touched[:, None], totals / new_sizes[:, None], values)
    kept = released_order(tokens.shape[0], sources)
    destination = torch.empty(tokens.shape[0], dtype=torch.long, device=tokens.device)
    destination[kept] = torch.arange(kept.shape[0], device=tokens.device)
    destination[sources] = destination[destinations]
    return merged[kept].to(tokens.dtype), new_sizes[kept], destination, kept


def bipartite_merge(tokens: torch.Tensor, sizes: torch.Tensor, metric: torch.Tensor,
                    r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bipartite soft matching on one image: `tokens` [t, dim] of `sizes` [t], matched by `metric`
    [t, k], lose r tokens; returns `weighted_merge`'s (tokens, sizes, new position of each token, input
    position of each output token)."""
    if r > mergeable(tokens.shape[0]):
        raise ValueError(f"cannot merge {r} of {tokens.shape[0]} tokens: at most {mergeable(tokens.shape[0])} "
                         "(every A token but CLS)")
    sources, destinations = bipartite_matches(metric, r)
    return weighted_merge(tokens, sizes, sources, destinations)


# --- one layer ----------------------------------------------------------------------------------------

def proportional_attention(attention: torch.nn.Module, normed: torch.Tensor,
                           sizes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP self-attention of `normed` [1, t, dim] with log(size) of each key token added to the logits
    (sizes None: plain attention); also the head-averaged keys [t, head_dim], the merge metric."""
    heads, head_dim = attention.num_heads, attention.head_dim
    shape = (*normed.shape[:-1], heads, head_dim)
    queries, keys, values = (projection(normed).view(shape).transpose(1, 2)
                             for projection in (attention.q_proj, attention.k_proj, attention.v_proj))
    bias = None if sizes is None else sizes.log().to(queries.dtype)[None, None, None, :]  # over heads, queries
    attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=bias, scale=attention.scale)
    output = attention.out_proj(attended.transpose(1, 2).reshape(normed.shape))
    return output, keys[0].mean(dim=0)


def merging_layer(layer: torch.nn.Module, hidden: torch.Tensor, sizes: torch.Tensor | None, r: int,
                  selecting: Stopwatch | None = None) -> tuple[torch.Tensor, torch.Tensor | None,
                                                               torch.Tensor | None, torch.Tensor | None]:
    """One CLIP layer of image `hidden` [1, t, dim] with r merges between attention and MLP.

    Returns the output, the sizes after it, each input token's new position and each output token's input
    position (both None where nothing merged). With no merge and unit sizes (`sizes` None) the layer itself
    runs, bit-identical to transformers. The matching and merging run inside `selecting` when it is given.
    """
    if r == 0 and sizes is None:
        return layer(hidden, None), None, None, None
    attended, metric = proportional_attention(layer.self_attn, layer.layer_norm1(hidden), sizes)
    hidden = hidden + attended
    destination = kept = None
    if r:
        current = torch.ones(hidden.shape[1], device=hidden.device) if sizes is None else sizes
        with selecting or nullcontext():
            tokens, sizes, destination, kept = bipartite_merge(hidden[0], current, metric, r)
        hidden = tokens[None]
    return hidden + layer.mlp(layer.layer_norm2(hidden)), sizes, destination, kept


def groups_of(owner: torch.Tensor, tokens: int) -> list[list[int]]:
    """Per token after CLS (of `tokens` in all), the ascending patches that `owner` (patch -> token) maps to it."""
    groups: list[list[int]] = [[] for _ in range(tokens - PATCHES_START)]
    for patch, token in enumerate(owner.tolist()):
        groups[token - PATCHES_START].append(patch)
    return groups


def merge_image(layers, hidden: torch.Tensor, schedule: list[int], selecting: Stopwatch | None = None) -> ReducedImage:
    """One embedded image [1, 1 + P, dim] through `layers`, merging `schedule[l]` tokens in layer l in ToMe's
    token order, then every token put back at the original position of the token it grew from."""
    patches = hidden.shape[1] - PATCHES_START
    owner = torch.arange(PATCHES_START, PATCHES_START + patches, device=hidden.device)
    origin = torch.arange(PATCHES_START + patches, device=hidden.device)  # of each current token (CLS: 0)
    sizes = None
    for layer, r in zip(layers, schedule):
        hidden, sizes, destination, kept = merging_layer(layer, hidden, sizes, r, selecting)
        if destination is not None:
            owner, origin = destination[owner], origin[kept]
    order = origin.argsort()  # origins are distinct; CLS (0) stays first
    return ReducedImage(hidden[0, order], groups_of(order.argsort()[owner], hidden.shape[1]))


@register
class ToMe(ImageReduction):
    """Bipartite soft matching between attention and MLP of every run CLIP layer (module docstring)."""

    name = "tome"
    family = ENCODER
    compact_positions = True  # nothing is dropped inside the decoder: positions never change
    options_class = ToMeOptions
    prompts_together = False  # every image merges through the layers on its own anyway, and a refused
    # count names the prompt's own tower images

    def schedule(self, count: int | None, patches: int, layers: int, images: int, budget: int) -> list[int]:
        """Merges per run layer leaving `count` patch tokens (None: `r` per layer, capped); a count the
        constant schedule cannot reach is refused, naming the prompt's `budget`, with the smallest reachable
        budget over `images`."""
        if count is None:
            return capped_schedule(self.options.r, layers, patches)
        smallest = smallest_reachable_count(patches, layers)
        if count < smallest:
            schedule = constant_schedule(patches - count, layers)
            layer = first_overdrawn_layer(schedule, patches)
            tokens = PATCHES_START + patches - sum(schedule[:layer])
            per_image = f" ({smallest} per tower image, {images} images)" if images > 1 else ""
            raise ValueError(f"budget {budget} leaves a tower image {count} of its {patches} patches: merging "
                             f"{patches - count} over {layers} layers asks layer {layer} for {schedule[layer]} "
                             f"merges, but only {mergeable(tokens)} of its {tokens} tokens can merge (CLS never "
                             f"does); the smallest reachable budget is {smallest * images}{per_image}")
        return constant_schedule(patches - count, layers)

    def reduce(self, model, images: torch.Tensor, counts: list[int | None], selecting: Stopwatch) -> list[ReducedImage]:
        """Each image merged on its own through the run layers down to its count (module docstring)."""
        layers = model.model.vision_tower.encoder.layers
        run = selected_layer_count(len(layers), model.config.vision_feature_layer)
        if run == 0:
            raise ValueError(f"vision_feature_layer {model.config.vision_feature_layer} selects the embeddings, "
                             "where no layer runs to merge tokens in")
        embedded = embed_patches(model.model.vision_tower, images)
        patches = embedded.shape[1] - PATCHES_START
        budget = sum(count or 0 for count in counts)  # one prompt's images (prompts_together is off): its budget
        schedules = [self.schedule(count, patches, run, len(counts), budget) for count in counts]
        return [merge_image(layers[:run], embedded[index : index + 1], schedule, selecting)
                for index, schedule in enumerate(schedules)]
