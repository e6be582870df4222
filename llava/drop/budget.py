"""Fixed token budgets: keep counts per dropping layer that hit a target layer-averaged count.

The paper's "192/128/64 tokens" is the number of vision tokens each decoder layer sees, averaged over
the layers. With drops after layers d_1 < ... < d_n, the layers up to d_1 see V tokens, those up to
d_2 see k_1, ..., those after d_n see k_n. We use a geometric schedule k_i = V * rho^i (each drop keeps
the same share of what is left) and solve rho by bisection, then round so the integer average is
closest to the target.
"""

from __future__ import annotations

import math

import torch

BISECTION_STEPS = 60


def stage_lengths(drop_layers: tuple[int, ...], num_layers: int) -> list[int]:
    """How many layers see each token count: before/at the first drop, between drops, after the last."""
    bounds = [-1, *drop_layers, num_layers - 1]
    return [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]


def layer_average(counts: list[float], lengths: list[int]) -> float:
    return sum(c * n for c, n in zip(counts, lengths)) / sum(lengths)


def geometric_keep_counts(
    vision_count: int, budget: float, drop_layers: tuple[int, ...], num_layers: int, minimum: int = 0
) -> list[int]:
    """Tokens to keep after each drop so that the layer average is as close to `budget` as integers allow.

    No count goes below `minimum` (e.g. the key set, which is never dropped); when even that floor
    averages above the budget, the floor is returned and the budget cannot be met for this image.
    """
    lengths = stage_lengths(drop_layers, num_layers)
    if budget >= vision_count:
        return [vision_count] * len(drop_layers)

    def counts_for(rho: float) -> list[float]:
        return [vision_count] + [max(minimum, vision_count * rho**i) for i in range(1, len(lengths))]

    low, high = 0.0, 1.0
    for _ in range(BISECTION_STEPS):
        rho = (low + high) / 2
        low, high = (rho, high) if layer_average(counts_for(rho), lengths) < budget else (low, rho)
    counts = [round(count) for count in counts_for(low)[1:]]
    return nudge_last(counts, vision_count, budget, lengths, minimum)


def nudge_last(counts: list[int], vision_count: int, budget: float, lengths: list[int], minimum: int) -> list[int]:
    """Fix rounding by moving the count that lasts longest, which moves the average most finely per step."""
    def error(candidate: list[int]) -> float:
        return abs(layer_average([vision_count, *candidate], lengths) - budget)

    ceiling = counts[-2] if len(counts) > 1 else vision_count
    best = counts
    for delta in (-2, -1, 1, 2):
        candidate = [*counts[:-1], max(minimum, min(ceiling, counts[-1] + delta))]
        if error(candidate) < error(best):
            best = candidate
    return best


def ranked_keep(scores: torch.Tensor, key_indices: torch.Tensor | None, count: int) -> torch.Tensor:
    """The key set first, then the best-scored other tokens, `count` in all (ascending positions).

    If the key set alone is larger than `count`, the key set is kept whole (it is never dropped).
    """
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    if key_indices is not None and key_indices.numel():
        chosen[key_indices.to(scores.device)] = True
    remaining = max(0, count - int(chosen.sum()))
    others = scores.masked_fill(chosen, float("-inf"))
    best = torch.sort(others, descending=True, stable=True).indices[:remaining]
    chosen[best] = True
    return chosen.nonzero().flatten()


def merge_count_bounds(
    num_patches: int, window: int, budget: float, drop_layers: tuple[int, ...], num_layers: int, key_rate: float
) -> tuple[int, int]:
    """How many windows MustDrop's stage 1 must merge (at least) and may merge (at most) for a budget.

    Each merged window turns window^2 tokens into one. Merging too few leaves so many tokens that the
    layers up to the first drop plus the key set (never dropped) already average above the budget;
    merging too many leaves fewer tokens than the budget. Within the bounds the threshold decides.
    """
    saved_per_window = window * window - 1
    num_windows = num_patches // (window * window)
    lengths = stage_lengths(drop_layers, num_layers)
    most = max(0, min(num_windows, math.floor((num_patches - budget) / saved_per_window)))
    least = next((r for r in range(num_windows + 1)
                  if key_set_floor(num_patches - saved_per_window * r, lengths, key_rate) <= budget), num_windows)
    return min(least, most), most


def key_set_floor(vision_count: int, lengths: list[int], key_rate: float) -> float:
    """The lowest layer average MustDrop can reach from `vision_count` tokens: every layer up to the first
    drop sees them all, every later one at least the key set, which is never dropped."""
    floor = math.ceil(key_rate * vision_count)
    return layer_average([vision_count] + [floor] * (len(lengths) - 1), lengths)


def mustdrop_budget_floor(num_patches: int, window: int, merge: bool, drop_layers: tuple[int, ...], num_layers: int,
                          key_rate: float) -> float:
    """The smallest budget MustDrop's budget variant can reach: stage 1 merging every window (when
    merging is on), then only the key set left after the first drop."""
    merged = num_patches // (window * window) * (window * window - 1) if merge else 0
    return key_set_floor(num_patches - merged, stage_lengths(drop_layers, num_layers), key_rate)
