"""Theoretical FLOPs of a decoder prefill, to report how much a drop policy saves.

Counts multiply-adds x 2 of the projections, the MLP and the two attention matmuls (QK^T and AV, without
the causal halving, as FastV-style papers count), per layer for the number of tokens that layer saw.
"""

from __future__ import annotations


def decoder_layer_flops(config, tokens: int) -> float:
    """FLOPs of one Llama decoder layer over `tokens` tokens (prefill, full attention)."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    query_width = config.num_attention_heads * head_dim
    kv_width = config.num_key_value_heads * head_dim
    projections = hidden * (2 * query_width + 2 * kv_width)  # q, o and k, v
    mlp = 3 * hidden * config.intermediate_size
    attention = 2 * tokens * query_width  # QK^T and AV per token
    return 2.0 * tokens * (projections + mlp + attention)


def prefill_flops(config, tokens_per_layer: list[int]) -> float:
    return sum(decoder_layer_flops(config, tokens) for tokens in tokens_per_layer)
