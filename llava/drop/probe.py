"""The attention probe: what the text queries of one decoder layer give the vision keys, and where the
vision tokens sit in the (possibly shortened) sequence.

At a dropping layer a method needs the attention probabilities of some queries (usually the text tokens
after the image) on the vision keys, exactly as an eager attention of that layer would give them. We
compute only that block: those rows' queries against every key the layer cached, so the layer itself
keeps running on SDPA / FlashAttention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv


@dataclass
class TokenLayout:
    """Where the vision tokens sit in the current (possibly shortened) sequence."""

    vision_start: int
    vision_count: int
    seq_len: int

    @property
    def text_start(self) -> int:
        return self.vision_start + self.vision_count


def text_to_vision_attention(
    model, layer_idx: int, layer_input: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, layout: TokenLayout
) -> torch.Tensor:
    """Head-averaged attention probabilities [text tokens, vision tokens] of one decoder layer.

    `layer_input` is the hidden state entering the layer, `keys` the rotated keys it cached ([1, kv_heads,
    seq, head_dim]) and `positions` the RoPE positions of the sequence. Each text query's softmax runs
    over all keys it may see (causal), as in eager attention; only then are the vision columns taken.
    """
    text_rows = torch.arange(layout.text_start, layout.seq_len, device=layer_input.device)
    return rows_to_vision_attention(model, layer_idx, layer_input, keys, positions, layout, text_rows)


def rows_to_vision_attention(
    model, layer_idx: int, layer_input: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
    layout: TokenLayout, query_rows: torch.Tensor,
) -> torch.Tensor:
    """Head-averaged attention [len(query_rows), vision tokens] for the given query positions only."""
    layer = model.model.language_model.layers[layer_idx]
    attention = layer.self_attn
    normed = layer.input_layernorm(layer_input[:, query_rows])
    queries = attention.q_proj(normed).view(1, normed.shape[1], -1, attention.head_dim).transpose(1, 2)
    cos, sin = model.model.language_model.rotary_emb(normed, positions[query_rows][None])
    queries, _ = apply_rotary_pos_emb(queries, queries, cos, sin)
    keys = repeat_kv(keys, attention.num_key_value_groups)
    scores = torch.matmul(queries.float(), keys.float().transpose(2, 3)) * attention.scaling
    key_index = torch.arange(keys.shape[2], device=scores.device)[None, :]
    scores = scores.masked_fill(key_index > query_rows.to(scores.device)[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    vision_columns = slice(layout.vision_start, layout.text_start)
    return probs[0, :, :, vision_columns].mean(dim=0)


def remap_key_indices(key_indices: torch.Tensor | None, kept: torch.Tensor) -> torch.Tensor | None:
    """Positions of the key tokens within the kept vision tokens (every key token is kept)."""
    if key_indices is None:
        return None
    return torch.searchsorted(kept, key_indices.to(kept.device))


def sequence_keep(layout: TokenLayout, kept_vision: torch.Tensor) -> torch.Tensor:
    """Sequence positions that survive: all system tokens, the kept vision tokens, all text tokens."""
    device = kept_vision.device
    return torch.cat([
        torch.arange(layout.vision_start, device=device),
        layout.vision_start + kept_vision,
        torch.arange(layout.text_start, layout.seq_len, device=device),
    ])
