"""A KV cache whose layers may hold different numbers of tokens.

Token dropping shrinks the sequence between decoder layers, so layer 0 caches every prompt token
while deeper layers cache fewer. transformers' attention only calls `update`, so this small class
is all the decoder layers need.
"""

from __future__ import annotations

import torch

SEQ_DIM = 2  # key/value tensors are [batch, kv_heads, seq, head_dim]


class LayerKVCache:
    """Keys (already rotated) and values per decoder layer."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, **_) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values to `layer_idx` and return the layer's full keys/values."""
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key_states], dim=SEQ_DIM)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states], dim=SEQ_DIM)
        return self.keys[layer_idx], self.values[layer_idx]

    def length(self, layer_idx: int) -> int:
        keys = self.keys[layer_idx]
        return 0 if keys is None else keys.shape[SEQ_DIM]

    def lengths(self) -> list[int]:
        return [self.length(i) for i in range(len(self.keys))]

    def keep(self, layer_idx: int, positions: torch.Tensor) -> None:
        """Keep only the cached tokens at `positions` (ascending) in one layer."""
        positions = positions.to(self.keys[layer_idx].device)
        self.keys[layer_idx] = self.keys[layer_idx].index_select(SEQ_DIM, positions)
        self.values[layer_idx] = self.values[layer_idx].index_select(SEQ_DIM, positions)

    def nbytes(self) -> int:
        """Bytes held by all cached keys and values."""
        tensors = [t for t in self.keys + self.values if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)
