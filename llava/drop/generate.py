"""Prefill and decode, gpt-fast style: a few plain functions that run the decoder layer by layer.

Running the layers ourselves is what lets the prompt shrink between layers (the prefill stage) and
each layer keep its own KV-cache length (the decode stage). Without a drop policy the result equals
transformers' own `generate()` token for token.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from transformers.generation.logits_process import TopPLogitsWarper

from llava.constants import IMAGE_TOKEN_INDEX
from llava.drop.cache import LayerKVCache
from llava.drop.flops import prefill_flops
from llava.drop.method import DropMethod, LayerContext
from llava.drop.probe import TokenLayout, remap_key_indices, sequence_keep
from llava.drop.timing import now
from llava.drop.vision import VisionOutput, is_next
from llava.model.geometry import decoder_layer_count, geometry_of_model

EAGER = "eager"
RU_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux


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


def rotary(model, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE cos/sin for these positions; shared by every layer that uses the same positions."""
    return model.model.language_model.rotary_emb(hidden, positions[None])


def run_layer(model, layer_idx: int, hidden: torch.Tensor, positions: torch.Tensor, cache: LayerKVCache,
              position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One decoder layer at the given positions, appending to that layer's cache."""
    return model.model.language_model.layers[layer_idx](
        hidden,
        attention_mask=causal_mask(model, hidden.shape[1], cache.length(layer_idx) + hidden.shape[1], hidden),
        position_ids=positions[None],
        cache=cache,
        use_cache=True,
        position_embeddings=position_embeddings or rotary(model, hidden, positions),
    )


def next_token_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm and LM head on the last position only."""
    return model.lm_head(model.model.language_model.norm(hidden[:, -1:]))[0, -1].float()


@dataclass
class PrefillResult:
    """Next-token logits plus what the prefill stage did, layer by layer."""

    logits: torch.Tensor
    drops: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (layer, sequence keep positions)
    vision_tokens_per_layer: list[int] = field(default_factory=list)
    tokens_per_layer: list[int] = field(default_factory=list)
    vision_tokens_after_layer: dict[int, int] = field(default_factory=dict)
    scoring_seconds: float = 0.0


def method_or_none(method: DropMethod | None) -> DropMethod:
    """The method to run; None is the unpruned model. (`llava.drop.methods.as_method` turns a DropConfig
    into MustDrop.)"""
    if method is None:
        return DropMethod()
    if not isinstance(method, DropMethod):
        raise TypeError(f"expected a DropMethod or None, got {type(method).__name__}; "
                        "wrap a DropConfig with llava.drop.methods.as_method")
    return method


def can_drop(layout: TokenLayout) -> bool:
    """Scoring needs vision tokens to drop and text tokens after them to score with."""
    return layout.vision_count > 0 and layout.text_start < layout.seq_len


def insert_tokens(
    hidden: torch.Tensor, positions: torch.Tensor, at: int, extra: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Put `extra` [n, hidden] at sequence index `at` (a method's recycled tokens, right after the kept
    vision tokens); uncompacted, they share the position of the token before them."""
    hidden = torch.cat([hidden[:, :at], extra[None].to(hidden), hidden[:, at:]], dim=1)
    shared = positions[max(at - 1, 0)].expand(extra.shape[0])
    return hidden, torch.cat([positions[:at], shared, positions[at:]])


def prefill(model, prompt: MultimodalPrompt, cache: LayerKVCache, method: DropMethod | None = None) -> PrefillResult:
    """Run the prompt through every layer; after each of the method's layers keep what it selects."""
    method = method_or_none(method)
    geometry = geometry_of_model(model)
    drop_layers = set(method.prefill_layers(geometry))
    hidden = prompt.embeds
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    layout = TokenLayout(prompt.vision_start, prompt.vision_count, hidden.shape[1])
    key_indices = prompt.key_indices
    result = PrefillResult(logits=torch.empty(0))
    position_embeddings = rotary(model, hidden, positions)  # recomputed only when a drop changes positions
    for layer_idx in range(decoder_layer_count(model)):
        result.vision_tokens_per_layer.append(layout.vision_count)
        result.tokens_per_layer.append(layout.seq_len)
        layer_input = hidden
        hidden = run_layer(model, layer_idx, hidden, positions, cache, position_embeddings)
        if layer_idx not in drop_layers or not can_drop(layout):
            continue
        started = now(hidden.device)
        context = LayerContext(model, layer_idx, layer_input, hidden, cache.keys[layer_idx], positions, layout,
                               key_indices, prompt.vision_count, geometry)
        kept = method.select(context)
        recycled = method.recycle(context, kept)
        key_indices = remap_key_indices(key_indices, kept)
        keep = sequence_keep(layout, kept)
        hidden, positions = hidden[:, keep], positions[keep]
        vision_count = kept.numel()
        if recycled is not None:
            hidden, positions = insert_tokens(hidden, positions, layout.vision_start + vision_count, recycled)
            vision_count += recycled.shape[0]
        if method.compact_positions:
            positions = torch.arange(hidden.shape[1], device=hidden.device)
        layout = TokenLayout(layout.vision_start, vision_count, hidden.shape[1])
        position_embeddings = rotary(model, hidden, positions)
        result.drops.append((layer_idx, keep))
        result.vision_tokens_after_layer[layer_idx] = vision_count
        result.scoring_seconds += now(hidden.device) - started
    result.logits = next_token_logits(model, hidden)
    return result


class DecodePositions:
    """Where each layer places the next token, kept on the device so that a decode step needs no host
    tensor. Layers may hold different cache lengths; those at the same position (most of them) share
    one row of RoPE, computed once per step for all distinct positions."""

    def __init__(self, positions: list[int], device: torch.device):
        distinct = sorted(set(positions))
        self.row_of_layer = [distinct.index(position) for position in positions]
        self.distinct = torch.tensor(distinct, device=device)
        self.step = 0

    def current(self) -> torch.Tensor:
        return self.distinct + self.step


def decode_one_token(model, token: torch.Tensor, cache: LayerKVCache, positions: DecodePositions) -> torch.Tensor:
    """Feed one token ([1, 1] on the device); layer l places it at its own position, then all advance."""
    hidden = model.get_input_embeddings()(token)
    current = positions.current()
    cos, sin = rotary(model, hidden, current)
    for layer_idx in range(decoder_layer_count(model)):
        row = positions.row_of_layer[layer_idx]
        rotation = (cos[:, row : row + 1], sin[:, row : row + 1])
        hidden = run_layer(model, layer_idx, hidden, current[row : row + 1], cache, rotation)
    positions.step += 1
    return next_token_logits(model, hidden)


def sample_on_device(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """The next token as a [1, 1] tensor where the logits are: greedy at temperature 0, otherwise
    temperature and nucleus sampling."""
    if sampling.temperature == 0:
        return logits.argmax().view(1, 1)
    scores = logits[None] / sampling.temperature
    if sampling.top_p is not None and sampling.top_p < 1:
        scores = TopPLogitsWarper(top_p=sampling.top_p)(None, scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs[0], 1, generator=generator).view(1, 1)


def sample(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> int:
    """`sample_on_device`, read back to the host."""
    return int(sample_on_device(logits, sampling, generator))


def decode_n_tokens(
    model,
    first_token: int,
    cache: LayerKVCache,
    positions: list[int],
    sampling: SamplingConfig,
    eos_token_ids: set[int],
    should_stop: Callable[[list[int]], bool] | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Generate until EOS, a stop condition on the tokens so far, or max_new_tokens.

    `positions[l]` is the RoPE position layer l gives the next token; each step advances all of them.
    The cache gets room for the whole answer first, and every step stays on the device except the one
    read of the new token that the stop checks need.
    """
    tokens = [first_token]
    device = model.get_input_embeddings().weight.device
    cache.reserve(sampling.max_new_tokens - 1)
    on_device = DecodePositions(positions, device)
    token = torch.tensor([[first_token]], device=device)
    while tokens[-1] not in eos_token_ids and len(tokens) < sampling.max_new_tokens:
        if should_stop is not None and should_stop(tokens):
            break
        logits = decode_one_token(model, token, cache, on_device)
        token = sample_on_device(logits, sampling, generator)
        tokens.append(int(token))
    return tokens


class ContextLengthError(ValueError):
    """The prompt, vision tokens included, does not fit in the decoder's context."""


def decode_room(context_length: int, positions: list[int]) -> int:
    """How many tokens can be generated before a fed-back token would need a position beyond the context
    (the first token comes from prefill, each later one feeds its predecessor back at the next position)."""
    return context_length - max(positions) + 1


@dataclass
class PrefilledAnswer:
    """One prompt after its vision stage and prefill: what decoding needs, and its statistics so far."""

    first_token: int
    cache: LayerKVCache
    positions: list[int]  # the RoPE position each layer gives the next token
    sampling: SamplingConfig  # max_new_tokens capped by the context left
    room: int
    stats: dict


def start_answer(model, method: DropMethod, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                 image_sizes: torch.Tensor | None, sampling: SamplingConfig,
                 generator: torch.Generator | None) -> PrefilledAnswer:
    """Vision stage, prefill and the first token of one prompt (the method already checked)."""
    geometry = geometry_of_model(model)
    device = model.lm_head.weight.device
    started = now(device)
    vision = encode_vision(model, method, pixel_values, image_sizes) if pixel_values is not None else None
    prompt = build_prompt(model, input_ids, vision)
    if prompt.embeds.shape[1] > geometry.context_length:
        raise ContextLengthError(
            f"the prompt is {prompt.embeds.shape[1]} tokens ({prompt.vision_count} of them vision tokens) but the "
            f"model's context holds {geometry.context_length}"
        )
    vision_done = now(device)
    cache = LayerKVCache(decoder_layer_count(model))
    prefilled = prefill(model, prompt, cache, method)
    method.after_prefill(cache, prefilled.drops)
    first = sample(prefilled.logits, sampling, generator)
    prefill_done = now(device)
    kv_lengths = cache.lengths()
    positions = kv_lengths if method.compact_positions else [prompt.embeds.shape[1]] * len(kv_lengths)
    room = decode_room(geometry.context_length, positions)
    stats = generation_stats(model, prompt, vision, prefilled, kv_lengths, cache)
    stats.update(vision_seconds=vision_done - started, prefill_seconds=prefill_done - vision_done)
    return PrefilledAnswer(first, cache, positions, replace(sampling, max_new_tokens=min(sampling.max_new_tokens, room)),
                           room, stats)


def finish_stats(answer: PrefilledAnswer, tokens: list[int], eos_token_ids: set[int], requested: int) -> dict:
    """The answer's statistics once decoded: how many tokens, and whether the context cut it short."""
    return {**answer.stats, "new_tokens": len(tokens),
            "stopped_at_context": answer.room < requested and len(tokens) == answer.room
            and tokens[-1] not in eos_token_ids}


def seeded_generator(sampling: SamplingConfig, device: torch.device) -> torch.Generator | None:
    return torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    sampling: SamplingConfig,
    eos_token_ids: set[int],
    should_stop: Callable[[list[int]], bool] | None = None,
    drop: DropMethod | None = None,
    image_sizes: torch.Tensor | None = None,
) -> GenerationOutput:
    """Encode the image, prefill the prompt, decode the answer (batch size 1), dropping per `drop`.
    LLaVA-NeXT also takes the image's size (`image_sizes`, [[height, width]])."""
    method = method_or_none(drop)
    method.check_model(geometry_of_model(model))
    device = model.lm_head.weight.device
    generator = seeded_generator(sampling, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    answer = start_answer(model, method, input_ids, pixel_values, image_sizes, sampling, generator)
    decode_started = now(device)
    tokens = decode_n_tokens(model, answer.first_token, answer.cache, answer.positions, answer.sampling,
                             eos_token_ids, should_stop, generator)
    stats = finish_stats(answer, tokens, eos_token_ids, sampling.max_new_tokens)
    stats.update(decode_seconds=now(device) - decode_started, batch_size=1, **peak_memory(device))
    return GenerationOutput(token_ids=tokens, stats=stats)


def encode_vision(model, method: DropMethod, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> VisionOutput:
    """The image as vision tokens: the method's vision stage. On LLaVA-NeXT it gets the base image and crops
    [1, 1 + K, 3, H, W] and the image's size (`DropMethod.check_model` refuses methods without NeXT support
    before anything runs)."""
    if not is_next(model):
        return method.encode_image(model, pixel_values)
    if image_sizes is None:
        raise ValueError("a LLaVA-NeXT model needs the image's size: pass image_sizes [[height, width]]")
    return method.encode_next(model, pixel_values, image_sizes)


def peak_memory(device: torch.device) -> dict:
    """CUDA: peak bytes allocated during this answer. CPU: the process's peak resident set so far
    (the OS only keeps a high-water mark per process, so compare settings in separate processes)."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device)}
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RU_MAXRSS_UNIT}


NEXT_STATS = ("images", "crops", "vision_tokens_per_image_in", "vision_tokens_per_image", "merged_windows",
              "key_tokens", "key_newlines")


def next_image_stats(vision_stats: dict, avg_vision_tokens: float) -> dict:
    """LLaVA-NeXT's per-image figures (the reference reports the layer average divided by the images);
    empty for a one-image model."""
    if "images" not in vision_stats:
        return {}
    counts = {key: vision_stats[key] for key in NEXT_STATS if key in vision_stats}
    return {**counts, "avg_vision_tokens_per_image": avg_vision_tokens / vision_stats["images"]}


def generation_stats(model, prompt: MultimodalPrompt, vision: VisionOutput | None, prefilled: PrefillResult,
                     kv_lengths: list[int], cache: LayerKVCache) -> dict:
    """Per-answer statistics: token counts per stage and layer, KV-cache size, FLOPs ratio."""
    vision_stats = vision.stats if vision is not None else {}
    vision_in = vision_stats.get("vision_tokens_in", prompt.vision_count)
    unpruned_len = prompt.embeds.shape[1] - prompt.vision_count + vision_in
    text_config = model.config.text_config
    unpruned_flops = prefill_flops(text_config, [unpruned_len] * len(prefilled.tokens_per_layer))
    per_layer = prefilled.vision_tokens_per_layer
    image_counts = next_image_stats(vision_stats, sum(per_layer) / len(per_layer))
    return {
        **image_counts,
        "vision_tokens_in": vision_in,
        "vision_tokens": prompt.vision_count,
        "vision_tokens_after_layer": {str(layer): count for layer, count in prefilled.vision_tokens_after_layer.items()},
        "avg_vision_tokens": sum(per_layer) / len(per_layer),
        "prompt_tokens": prompt.embeds.shape[1],
        "kv_cache_lengths": kv_lengths,
        "kv_cache_bytes": cache.nbytes(),
        "prefill_flops_ratio": prefill_flops(text_config, prefilled.tokens_per_layer) / unpruned_flops,
        "scoring_seconds": prefilled.scoring_seconds + vision_stats.get("merge_seconds", 0.0)
        + vision_stats.get("key_seconds", 0.0),
    }
