"""Every MustDrop knob in one dataclass, with the reference code's defaults and validation.

Defaults follow the reference code (docs/algorithm.md): constants it hard-codes are fields here so that
they can be studied, but a user who only passes `--sparse --global_thr G --individual_thr I` gets the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

# Stage 1 (vision encoding), fixed in the reference code.
MERGE_AFTER_LAYER = 0
MERGE_WINDOW = 3
MERGE_THRESHOLD = 0.8
KEY_TOKEN_RATE = 0.08
# Stage 2 (prefill), fixed in the reference code.
DROP_LAYERS = (2, 6, 10, 14)
# Defaults when --sparse comes without thresholds: stage 2 then drops nothing.
DEFAULT_GLOBAL_THR = 1.0
DEFAULT_INDIVIDUAL_THR = 0.0


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {value}")


@dataclass(frozen=True)
class DropConfig:
    """MustDrop's settings. `enabled=False` (no `--sparse`) leaves the model untouched."""

    enabled: bool = True
    # Stage 1: local spatial merge after the first CLIP layer, and the CLS-attention key set.
    vision_merge: bool = True
    merge_window: int = MERGE_WINDOW
    merge_threshold: float = MERGE_THRESHOLD
    key_token_rate: float = KEY_TOKEN_RATE
    # Stage 2: dual attention filtering at these decoder layers (0-based).
    drop_layers: tuple[int, ...] = DROP_LAYERS
    global_thr: float = DEFAULT_GLOBAL_THR
    individual_thr: float = DEFAULT_INDIVIDUAL_THR
    budget: float | None = None  # target layer-averaged vision tokens: rank by global score instead of thresholds
    compact_positions: bool = True  # the reference gives the shorter sequence positions 0..len-1
    # Stage 3: shrink the KV caches of layers drop_layers[0]..drop_layers[-1] to the final token set.
    decode_cache_policy: bool = True

    def __post_init__(self):
        _check_unit_interval("global_thr", self.global_thr)
        _check_unit_interval("individual_thr", self.individual_thr)
        _check_unit_interval("key_token_rate", self.key_token_rate)
        if not -1.0 <= self.merge_threshold <= 1.0:
            raise ValueError(f"merge_threshold is a cosine similarity and must be in [-1, 1], got {self.merge_threshold}")
        if self.merge_window < 1:
            raise ValueError(f"merge_window must be >= 1, got {self.merge_window}")
        if self.budget is not None and self.budget <= 0:
            raise ValueError(f"budget must be a positive number of tokens, got {self.budget}")
        if any(layer < 0 for layer in self.drop_layers) or list(self.drop_layers) != sorted(set(self.drop_layers)):
            raise ValueError(f"drop_layers must be distinct, ascending and >= 0, got {self.drop_layers}")

    @classmethod
    def disabled(cls) -> "DropConfig":
        return cls(enabled=False)
