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


def positions_at(positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The positions ([N, seq], or Qwen's [3, N, seq]) of each prompt's `slots` [N, K]."""
    if positions.dim() == 3:
        return positions.gather(2, slots[None].expand(positions.shape[0], -1, -1))
    return positions.gather(1, slots)


def vision_attention(
    model, layer_idx: int, layer_input: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
    query_rows: torch.Tensor, vision_slots: torch.Tensor,
) -> torch.Tensor:
    """Head-averaged attention [N, queries, vision] of some query rows of each prompt on its vision keys.

    `layer_input` [N, seq, hidden] is what entered the layer, `keys` the rotated keys it cached
    ([N, kv_heads, seq, head_dim]) and `positions` [N, seq] (Qwen: [3, N, seq]) the RoPE positions; `query_rows` [N, Q] and
    `vision_slots` [N, V] are sequence slots of each prompt (a padded batch repeats a real slot and masks
    the result). Each query's softmax runs over all keys it may see (causal), as in eager attention; only
    then are the vision columns taken.
    """
    layer = model.model.language_model.layers[layer_idx]
    attention = layer.self_attn
    batch, rows = query_rows.shape
    hidden_rows = query_rows[:, :, None].expand(-1, -1, layer_input.shape[2])
    normed = layer.input_layernorm(layer_input.gather(1, hidden_rows))
    queries = attention.q_proj(normed).view(batch, rows, -1, attention.head_dim).transpose(1, 2)
    cos, sin = model.model.language_model.rotary_emb(normed, positions_at(positions, query_rows))
    queries, _ = apply_rotary_pos_emb(queries, queries, cos, sin)
    keys = repeat_kv(keys, attention.num_key_value_groups)
    scores = torch.matmul(queries.float(), keys.float().transpose(2, 3)) * attention.scaling
    key_slots = torch.arange(keys.shape[2], device=scores.device)
    scores = scores.masked_fill(key_slots[None, None, None, :] > query_rows[:, None, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    columns = vision_slots[:, None, None, :].expand(-1, probs.shape[1], rows, -1)
    return probs.gather(3, columns).mean(dim=1)
