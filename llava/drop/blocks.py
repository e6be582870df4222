"""Building blocks the methods share, written once: stable top-k, budget arithmetic over decoder stages
(stage lengths, layer averages, bisection, rounding), and grouping tokens around centres.

Model geometry (decoder depth, vision tokens per image) lives in `llava.model.geometry`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

# A budget's keep counts depend only on the prompt's vision count and the options, yet each dropping layer of
# each prompt asks for them (about 0.1 ms of bisection on the host each): planned once per distinct input.
planned = functools.lru_cache(maxsize=4096)
BISECTION_STEPS = 60  # halves an interval below float resolution
NUDGES = (-2, -1, 1, 2)  # fine steps on the last keep count after rounding a solved schedule


def device_tensor(values: list[int] | list[bool], device: torch.device) -> torch.Tensor:
    """Host numbers (per-prompt lengths, counts) as a tensor on `device`, copied without waiting: a plain
    `torch.tensor(values, device=cuda)` synchronises the stream, which would stall every dropping layer."""
    return torch.tensor(values).to(device, non_blocking=True)


def stable_top_k(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the `count` highest scores, best first; equal scores prefer the earlier position.

    A stable descending sort makes the tie rule explicit (torch.topk leaves tie order unspecified), so
    results do not depend on the backend.
    """
    return torch.sort(scores, descending=True, stable=True).indices[:count]


def top_positions(scores: torch.Tensor, count: int) -> torch.Tensor:
    """`stable_top_k`, in ascending (original) order."""
    return stable_top_k(scores, count).sort().values


def ranked_keep(scores: torch.Tensor, key_indices: torch.Tensor | None, count: int) -> torch.Tensor:
    """The key set first, then the best-scored other tokens, `count` in all (ascending positions).

    If the key set alone is larger than `count`, the key set is kept whole (it is never dropped).
    """
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    if key_indices is not None and key_indices.numel():
        chosen[key_indices.to(scores.device)] = True
    remaining = max(0, count - int(chosen.sum()))
    chosen[stable_top_k(scores.masked_fill(chosen, float("-inf")), remaining)] = True
    return chosen.nonzero().flatten()


def top_k_mask(scores: torch.Tensor, counts: list[int], valid: torch.Tensor) -> torch.Tensor:
    """[N, V] boolean: each row's `counts[n]` best `valid` scores, ties to the earlier position (the rule of
    `stable_top_k`, for a whole batch in one sort)."""
    order = torch.sort(scores.masked_fill(~valid, float("-inf")), dim=1, descending=True, stable=True).indices
    ranks = torch.arange(scores.shape[1], device=scores.device)[None]
    chosen = ranks < device_tensor(counts, scores.device)[:, None]
    return torch.zeros_like(valid).scatter(1, order, chosen)


def ranked_keep_mask(scores: torch.Tensor, key_mask: torch.Tensor | None, key_counts: list[int], counts: list[int],
                     valid: torch.Tensor) -> torch.Tensor:
    """`ranked_keep` for a batch [N, V]: each row's key tokens, then its best other tokens, `counts[n]` in all."""
    if key_mask is None:
        return top_k_mask(scores, counts, valid)
    remaining = [max(0, count - keys) for count, keys in zip(counts, key_counts)]
    return key_mask | top_k_mask(scores, remaining, valid & ~key_mask)


def check_budget(budget: float | None, whole: bool = False) -> None:
    """The one rule for a `budget` option: a positive number of tokens, and with `whole` (a per-image token
    count, as the vision-stage methods take it, not a layer average) a whole number, at least one."""
    if budget is None:
        return
    if whole and (budget < 1 or budget != int(budget)):
        raise ValueError(f"budget must be a whole number of tokens >= 1, got {budget:g}")
    if budget <= 0:
        raise ValueError(f"budget must be a positive number of tokens, got {budget:g}")


def check_keep_fraction(fraction: float | None, budget: float | None) -> None:
    """The one rule for a `keep_fraction` option: a share of the image's vision tokens in (0, 1], given
    instead of a `budget`, never beside one (both would set the same count)."""
    if fraction is None:
        return
    if budget is not None:
        raise ValueError(f"give either keep_fraction or budget, not both (got keep_fraction {fraction:g} and "
                         f"budget {budget:g})")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {fraction:g}")


def check_drop_after(layers, may_be_empty: bool = False) -> None:
    """The one rule for a `drop_after` option, the 0-based decoder layers after which a method drops (layers
    0..l see the tokens before the drop): a tuple of distinct layers >= 0 in ascending order, at least one
    unless `may_be_empty`."""
    if not isinstance(layers, tuple) or not all(isinstance(layer, int) for layer in layers):
        raise ValueError(f"drop_after must be a tuple of decoder layers, e.g. (1,), got {layers!r}")
    if not layers and not may_be_empty:
        raise ValueError("drop_after must name at least one decoder layer")
    if any(layer < 0 for layer in layers) or list(layers) != sorted(set(layers)):
        raise ValueError(f"drop_after must be distinct decoder layers >= 0 in ascending order, got {layers}")


def check_share(name: str, share: float) -> None:
    """The one rule for a `*_share` option: a share of some tokens, in [0, 1]."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {share}")


def fraction_budget(fraction: float, vision_count: int) -> int:
    """A prompt's budget under `keep_fraction`: that share of the `vision_count` tokens its image brings,
    rounded half up, at least one (0.111 of LLaVA-1.5's 576 is 63.9, a budget of 64; 0.222 gives 128, 0.333
    gives 192). The budget then means for the method exactly what `budget` means for it."""
    return max(1, round_half_up(fraction * vision_count))


def round_half_up(value: float) -> int:
    """Rounding that does not depend on parity (Python's round(288.5) is 288, round(289.5) is 290)."""
    return math.floor(value + 0.5)


def stage_lengths(drop_after: tuple[int, ...], num_layers: int) -> list[int]:
    """How many layers see each token count: up to the first drop, between drops, after the last (the drops
    are after layers `drop_after`)."""
    bounds = [-1, *drop_after, num_layers - 1]
    return [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]


def layer_average(counts: list[float], lengths: list[int]) -> float:
    """The token count averaged over layers, `counts[i]` lasting `lengths[i]` layers."""
    return sum(c * n for c, n in zip(counts, lengths)) / sum(lengths)


def bisect(below: Callable[[float], bool], low: float, high: float) -> tuple[float, float]:
    """Shrink [low, high] onto the point where `below` (true at low, false at high) turns false."""
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if below(middle) else (low, middle)
    return low, high


def last_count_nudges(counts: list[int], minimum: int = 0, ceiling: int | None = None) -> list[list[int]]:
    """`counts` with the last count moved by each of NUDGES, kept within [minimum, ceiling].

    The last count lasts the most layers, so it moves a layer average most finely per token.
    """
    def moved(delta: int) -> int:
        value = counts[-1] + delta
        return max(minimum, value if ceiling is None else min(ceiling, value))

    return [[*counts[:-1], moved(delta)] for delta in NUDGES]


def index_sum(target: torch.Tensor, index: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """`target.index_add(0, index, source)`, added in the same order at every run. On CUDA index_add adds
    atomically, in an order (so a float result) that changes from run to run and can flip a ranking;
    there index_put with accumulate, which sorts the indices first, does the sum. On CPU index_add is
    already sequential."""
    if target.device.type == "cuda":
        return target.index_put((index,), source, accumulate=True)
    return target.index_add(0, index, source)
