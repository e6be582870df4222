"""Prefill and decode, gpt-fast style: a few plain functions that run the decoder layer by layer.

Running the layers ourselves is what lets the prompt shrink between layers (the prefill stage) and
each layer keep its own KV-cache length (the decode stage). Without a drop policy the result equals
transformers' own `generate()` token for token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import TopPLogitsWarper

from llava.constants import IMAGE_TOKEN_INDEX
from llava.drop.cache import LayerKVCache
from llava.drop.config import DropConfig
from llava.drop.vision import VisionOutput, encode_image

EAGER = "eager"


@dataclass
class SamplingConfig:
    """Decoding knobs with LLaVA's evaluation defaults (greedy, 128 new tokens)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class MultimodalPrompt:
    """The prompt as embeddings: [system][vision][text], and where the vision span sits."""

    embeds: torch.Tensor  # [1, seq, hidden]
    vision_start: int
    vision_count: int
    key_indices: torch.Tensor | None = None

    @property
    def text_start(self) -> int:
        return self.vision_start + self.vision_count


@dataclass
class GenerationOutput:
    token_ids: list[int]
    stats: dict = field(default_factory=dict)


def build_prompt(model, input_ids: torch.Tensor, vision: VisionOutput | None) -> MultimodalPrompt:
    """Embed the text and splice the vision tokens in place of the one IMAGE_TOKEN_INDEX sentinel."""
    ids = input_ids.reshape(-1)
    sentinels = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
    if len(sentinels) > 1:
        raise ValueError(f"the prompt has {len(sentinels)} <image> placeholders; one image per prompt is supported")
    if sentinels and vision is None:
        raise ValueError("the prompt has an <image> placeholder but no image was given")
    if vision is not None and not sentinels:
        raise ValueError("an image was given but the prompt has no <image> placeholder")
    embed_tokens = model.get_input_embeddings()
    ids = ids.to(embed_tokens.weight.device)
    if not sentinels:
        return MultimodalPrompt(embed_tokens(ids)[None], vision_start=ids.numel(), vision_count=0)
    start = sentinels[0]
    pieces = [embed_tokens(ids[:start]), vision.features.to(embed_tokens.weight.dtype), embed_tokens(ids[start + 1 :])]
    embeds = torch.cat(pieces, dim=0)[None]
    return MultimodalPrompt(embeds, start, vision.features.shape[0], vision.key_indices)


def causal_mask(model, query_len: int, key_len: int, like: torch.Tensor) -> torch.Tensor | None:
    """SDPA/FlashAttention take `is_causal`; only eager attention needs an explicit mask."""
    if model.config._attn_implementation != EAGER or query_len == 1:
        return None
    allowed = torch.ones(query_len, key_len, dtype=torch.bool, device=like.device).tril(key_len - query_len)
    mask = torch.zeros(query_len, key_len, dtype=like.dtype, device=like.device)
    return mask.masked_fill(~allowed, torch.finfo(like.dtype).min)[None, None]


def run_layer(model, layer_idx: int, hidden: torch.Tensor, positions: torch.Tensor, cache: LayerKVCache) -> torch.Tensor:
    """One decoder layer at the given positions, appending to that layer's cache."""
    language_model = model.model.language_model
    position_ids = positions[None]
    return language_model.layers[layer_idx](
        hidden,
        attention_mask=causal_mask(model, hidden.shape[1], cache.length(layer_idx) + hidden.shape[1], hidden),
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        position_embeddings=language_model.rotary_emb(hidden, position_ids),
    )


def next_token_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm and LM head on the last position only."""
    return model.lm_head(model.model.language_model.norm(hidden[:, -1:]))[0, -1].float()


def prefill(model, prompt: MultimodalPrompt, cache: LayerKVCache) -> torch.Tensor:
    """Run the whole prompt through every layer; return the logits of the next token."""
    hidden = prompt.embeds
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    for layer_idx in range(len(model.model.language_model.layers)):
        hidden = run_layer(model, layer_idx, hidden, positions, cache)
    return next_token_logits(model, hidden)


def decode_one_token(model, token: int, cache: LayerKVCache) -> torch.Tensor:
    """Feed one token; each layer places it at its own cache length (layers may differ)."""
    embed_tokens = model.get_input_embeddings()
    hidden = embed_tokens(torch.tensor([[token]], device=embed_tokens.weight.device))
    for layer_idx in range(len(model.model.language_model.layers)):
        position = torch.tensor([cache.length(layer_idx)], device=hidden.device)
        hidden = run_layer(model, layer_idx, hidden, position, cache)
    return next_token_logits(model, hidden)


def sample(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0, otherwise temperature and nucleus sampling."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    scores = logits[None] / sampling.temperature
    if sampling.top_p is not None and sampling.top_p < 1:
        scores = TopPLogitsWarper(top_p=sampling.top_p)(None, scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs[0], 1, generator=generator))


def decode_n_tokens(
    model,
    first_token: int,
    cache: LayerKVCache,
    sampling: SamplingConfig,
    eos_token_ids: set[int],
    should_stop: Callable[[list[int]], bool] | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Generate until EOS, a stop condition on the tokens so far, or max_new_tokens."""
    tokens = [first_token]
    while tokens[-1] not in eos_token_ids and len(tokens) < sampling.max_new_tokens:
        if should_stop is not None and should_stop(tokens):
            break
        logits = decode_one_token(model, tokens[-1], cache)
        tokens.append(sample(logits, sampling, generator))
    return tokens


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    sampling: SamplingConfig,
    eos_token_ids: set[int],
    should_stop: Callable[[list[int]], bool] | None = None,
    drop: DropConfig | None = None,
) -> GenerationOutput:
    """Encode the image, prefill the prompt, decode the answer; batch size 1."""
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(sampling.seed)
    vision = encode_image(model, pixel_values) if pixel_values is not None else None
    prompt = build_prompt(model, input_ids, vision)
    cache = LayerKVCache(len(model.model.language_model.layers))
    first = sample(prefill(model, prompt, cache), sampling, generator)
    tokens = decode_n_tokens(model, first, cache, sampling, eos_token_ids, should_stop, generator)
    stats = {"vision_tokens": prompt.vision_count, "prompt_tokens": prompt.embeds.shape[1]}
    return GenerationOutput(token_ids=tokens, stats=stats)
