"""A KV cache whose layers may hold different numbers of tokens.

Token dropping shrinks the sequence between decoder layers, so layer 0 caches every prompt token
while deeper layers cache fewer. transformers' attention only calls `update`, so this small class
is all the decoder layers need. Prefill fills it once per layer; before decoding, `reserve` gives every
layer a preallocated buffer (in the spirit of gpt-fast's KVCache) that each step writes in place at that
layer's own length, so decoding allocates nothing and copies no earlier token.
"""

from __future__ import annotations

import torch

SEQ_DIM = 2  # key/value tensors are [batch, kv_heads, seq, head_dim]


class LayerKVCache:
    """Keys (already rotated) and values per decoder layer."""

    def __init__(self, num_layers: int):
        # keys[l] / values[l] are what layer l holds: its own tensors, or a view of its reserved buffer
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, **_) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values to `layer_idx` and return the layer's full keys/values."""
        if self.buffers[layer_idx] is not None:
            return self._write_in_place(key_states, value_states, layer_idx)
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key_states], dim=SEQ_DIM)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states], dim=SEQ_DIM)
        return self.keys[layer_idx], self.values[layer_idx]

    def reserve(self, extra_tokens: int) -> None:
        """Give every filled layer room for `extra_tokens` more tokens, written in place from now on."""
        for layer_idx, keys in enumerate(self.keys):
            if keys is None:
                continue
            length = keys.shape[SEQ_DIM]
            shape = (*keys.shape[:SEQ_DIM], length + extra_tokens, *keys.shape[SEQ_DIM + 1 :])
            key_buffer, value_buffer = keys.new_empty(shape), self.values[layer_idx].new_empty(shape)
            key_buffer.narrow(SEQ_DIM, 0, length).copy_(keys)
            value_buffer.narrow(SEQ_DIM, 0, length).copy_(self.values[layer_idx])
            self.buffers[layer_idx] = (key_buffer, value_buffer)
            self.keys[layer_idx] = key_buffer.narrow(SEQ_DIM, 0, length)
            self.values[layer_idx] = value_buffer.narrow(SEQ_DIM, 0, length)

    def _write_in_place(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        key_buffer, value_buffer = self.buffers[layer_idx]
        start, count = self.length(layer_idx), key_states.shape[SEQ_DIM]
        if start + count > key_buffer.shape[SEQ_DIM]:
            raise RuntimeError(f"layer {layer_idx}'s KV cache was reserved for {key_buffer.shape[SEQ_DIM]} tokens, "
                               f"cannot take {start + count}")
        key_buffer.narrow(SEQ_DIM, start, count).copy_(key_states)
        value_buffer.narrow(SEQ_DIM, start, count).copy_(value_states)
        self.keys[layer_idx] = key_buffer.narrow(SEQ_DIM, 0, start + count)
        self.values[layer_idx] = value_buffer.narrow(SEQ_DIM, 0, start + count)
        return self.keys[layer_idx], self.values[layer_idx]

    def length(self, layer_idx: int) -> int:
        keys = self.keys[layer_idx]
        return 0 if keys is None else keys.shape[SEQ_DIM]

    def lengths(self) -> list[int]:
        return [self.length(i) for i in range(len(self.keys))]

    def keep(self, layer_idx: int, positions: torch.Tensor) -> None:
        """Keep only the cached tokens at `positions` (ascending) in one layer (its reserved room is let go)."""
        positions = positions.to(self.keys[layer_idx].device)
        self.buffers[layer_idx] = None
        self.keys[layer_idx] = self.keys[layer_idx].index_select(SEQ_DIM, positions)
        self.values[layer_idx] = self.values[layer_idx].index_select(SEQ_DIM, positions)

    def nbytes(self) -> int:
        """Bytes of the cached keys and values (the tokens held, not the reserved room)."""
        tensors = [t for t in self.keys + self.values if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)
