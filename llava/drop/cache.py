"""The KV cache of a batch of prompts, whose layers (and prompts) may hold different numbers of tokens.

Token dropping shrinks each prompt's sequence between decoder layers, so layer 0 caches every prompt token
while deeper layers cache fewer, and two prompts of a batch keep different counts. Each layer holds one
buffer [N, kv_heads, slots, head_dim]: prompt n's tokens at slots 0..lengths[l][n] - 1, the rest padding
that masks hide. Prefill writes each layer once, the whole (padded) batch; `reserve` then gives every
layer room for the answer (in the spirit of gpt-fast's KVCache), and each decode step writes every prompt's
new token in place at its own length, so decoding allocates nothing and copies no earlier token.
transformers' attention only calls `update`, so this class is all the decoder layers need.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SEQ_DIM = 2  # key/value tensors are [batch, kv_heads, seq, head_dim]


def padded_rows(rows: Sequence[torch.Tensor], fill: int = 0) -> torch.Tensor:
    """Index lists of different lengths as one [N, longest] tensor, short rows padded with `fill`."""
    return torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True, padding_value=fill)


def gather_tokens(tensor: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """`tensor` [N, ..., seq along `dim`, ...] reduced to each row's `index` [N, count] along `dim`."""
    shape = [1] * tensor.dim()
    shape[0], shape[dim] = index.shape
    expanded = index.to(tensor.device).view(shape).expand(*tensor.shape[:dim], index.shape[1], *tensor.shape[dim + 1 :])
    return tensor.gather(dim, expanded)


class KVCache:
    """Keys (already rotated) and values per decoder layer for N prompts, with each prompt's length."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.row_counts: list[list[int] | None] = [None] * num_layers  # per layer, each prompt's tokens (host)
        self.step_lengths: list[torch.Tensor] | None = None  # per layer [N] on the device once reserved
        self.mask_group: list[int] = []
        self.group_layer: list[int] = []

    @property
    def reserved(self) -> bool:
        return self.step_lengths is not None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, **_) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill (each layer runs once, on the whole padded batch): take the layer's keys/values. Decoding:
        write each prompt's one new token at its own length in this layer. Returns the layer's whole buffers."""
        if self.reserved:
            return self._write_step(key_states, value_states, layer_idx)
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        self.row_counts[layer_idx] = None  # every row full until `set_lengths` says otherwise
        return self.keys[layer_idx], self.values[layer_idx]

    def set_lengths(self, layer_idx: int, lengths: list[int]) -> None:
        """Each prompt's real token count in a layer that prefill wrote padded."""
        self.row_counts[layer_idx] = list(lengths)

    def lengths_of_layer(self, layer_idx: int) -> list[int]:
        keys = self.keys[layer_idx]
        if keys is None:
            return []
        counts = self.row_counts[layer_idx]
        return counts if counts is not None else [keys.shape[SEQ_DIM]] * keys.shape[0]

    def row_lengths(self, row: int) -> list[int]:
        """Prompt `row`'s token count in every layer (after prefill; decoding does not update it)."""
        return [self.lengths_of_layer(layer)[row] if self.keys[layer] is not None else 0
                for layer in range(len(self.keys))]

    def keep(self, layer_idx: int, rows: Sequence[torch.Tensor]) -> None:
        """Keep only prompt n's cached tokens at `rows[n]` (ascending positions) in one layer: one gather."""
        if self.reserved:
            raise RuntimeError("the KV cache is reserved for decoding; keep tokens before `reserve`")
        index = padded_rows([row.to(self.keys[layer_idx].device) for row in rows])
        self.keys[layer_idx] = gather_tokens(self.keys[layer_idx], index, SEQ_DIM)
        self.values[layer_idx] = gather_tokens(self.values[layer_idx], index, SEQ_DIM)
        self.row_counts[layer_idx] = [row.numel() for row in rows]

    def nbytes(self, row: int) -> int:
        """Bytes of prompt `row`'s cached keys and values (the tokens it holds, not padding or room)."""
        total = 0
        for layer, keys in enumerate(self.keys):
            if keys is not None:
                per_token = keys.shape[1] * keys.shape[3] * keys.element_size()
                total += 2 * per_token * self.lengths_of_layer(layer)[row]
        return total

    def reserve(self, room: int) -> None:
        """Give every layer room for `room` more tokens per prompt (the one copy decoding needs); from now on
        `update` writes each step's tokens in place."""
        per_layer = [tuple(self.lengths_of_layer(layer)) for layer in range(len(self.keys))]
        self.step_lengths = []
        for layer_idx, lengths in enumerate(per_layer):
            self.keys[layer_idx] = self._with_room(self.keys[layer_idx], max(lengths), room)
            self.values[layer_idx] = self._with_room(self.values[layer_idx], max(lengths), room)
            self.step_lengths.append(torch.tensor(lengths, device=self.keys[layer_idx].device))
        # Layers holding the same lengths for every prompt (most of them) share one mask per step.
        distinct = list(dict.fromkeys(per_layer))
        self.mask_group = [distinct.index(lengths) for lengths in per_layer]
        self.group_layer = [per_layer.index(lengths) for lengths in distinct]

    @staticmethod
    def _with_room(tensor: torch.Tensor, filled: int, room: int) -> torch.Tensor:
        """A new buffer with the first `filled` slots of `tensor` and `room` empty slots after them."""
        buffer = tensor.new_zeros((*tensor.shape[:SEQ_DIM], filled + room, *tensor.shape[SEQ_DIM + 1 :]))
        buffer.narrow(SEQ_DIM, 0, filled).copy_(tensor.narrow(SEQ_DIM, 0, filled))
        return buffer

    def step_masks(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """This step's additive mask [N, 1, 1, slots] per layer: each prompt's cached tokens and the slot its
        new token is about to fill. Made before any layer writes, once per group of layers alike."""
        masks = []
        for layer_idx in self.group_layer:
            slots = torch.arange(self.keys[layer_idx].shape[SEQ_DIM], device=self.keys[layer_idx].device)
            allowed = slots[None] <= self.step_lengths[layer_idx][:, None]
            mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            masks.append(mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None, None])
        return [masks[group] for group in self.mask_group]

    def _write_step(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        at = self.step_lengths[layer_idx]
        slot = at.view(-1, 1, 1, 1).expand(key_states.shape)  # [N, kv_heads, 1, head_dim]: each row's own slot
        self.keys[layer_idx].scatter_(SEQ_DIM, slot, key_states)
        self.values[layer_idx].scatter_(SEQ_DIM, slot, value_states)
        at.add_(1)  # in place: a compiled or captured step mutates this tensor, not a Python list
        return self.keys[layer_idx], self.values[layer_idx]
