"""Answer prompts with token dropping: the vision stage, prefill and decode of one engine, batched by
construction (one prompt is a batch of one).

`generate_batch` runs every prompt's image through the vision stage, prefills all prompts together
(`llava.drop.prefill`), lets the method change the KV caches, and decodes all answers together
(`llava.drop.decode`). Without a drop policy `generate` equals transformers' own `generate()` token for
token; under greedy decoding each answer of a batch, and its statistics, equal what the prompt gets alone.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from llava.drop.cache import KVCache
from llava.drop.decode import SamplingConfig, decode_together, next_tokens, seeded_generator
from llava.drop.flops import prefill_flops
from llava.drop.method import DropMethod
from llava.drop.prefill import (
    MultimodalPrompt,
    PrefillResult,
    build_prompt,
    compacts_positions,
    method_or_none,
    prefill,
)
from llava.drop.timing import now
from llava.drop.vision import VisionOutput, is_next
from llava.model.geometry import decoder_layer_count, geometry_of_model

__all__ = ["COMPILE_BACKEND", "ContextLengthError", "GenerationOutput", "GenerationRequest", "SamplingConfig",
           "generate", "generate_batch"]

COMPILE_BACKEND = "inductor"  # torch.compile's default backend, what --compile uses
RU_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux


@dataclass
class GenerationRequest:
    """One prompt of a batch: its token ids (with the <image> sentinel), its image, when to stop, and who
    hears each new token as it is decoded (`on_token`: a chat streams its answer so)."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_sizes: torch.Tensor | None = None
    should_stop: Callable[[list[int]], bool] | None = None
    on_token: Callable[[int], None] | None = None


@dataclass
class GenerationOutput:
    token_ids: list[int]
    stats: dict = field(default_factory=dict)


class ContextLengthError(ValueError):
    """The prompt, vision tokens included, does not fit in the decoder's context."""


def decode_room(context_length: int, positions: list[int]) -> int:
    """How many tokens can be generated before a fed-back token would need a position beyond the context
    (the first token comes from prefill, each later one feeds its predecessor back at the next position)."""
    return context_length - max(positions) + 1


def check_step_options(model, compile_backend: str | None, cuda_graph: bool) -> None:
    """Refuse a decode-step choice that cannot run, before any prefill."""
    if compile_backend is not None and cuda_graph:
        raise ValueError("choose one of torch.compile and CUDA graphs for the decode step, not both")
    device = model.lm_head.weight.device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device; the model is on {device.type}")


def encode_visions(model, method: DropMethod, pixel_values: Sequence[torch.Tensor | None],
                   image_sizes: Sequence[torch.Tensor | None]) -> list[VisionOutput | None]:
    """Every prompt's image as vision tokens, through the method's vision stage (all images at once where
    the method allows); None for a text-only prompt. LLaVA-NeXT also needs each image's size."""
    with_image = [n for n, pixels in enumerate(pixel_values) if pixels is not None]
    if is_next(model) and any(image_sizes[n] is None for n in with_image):
        raise ValueError("a LLaVA-NeXT model needs the image's size: pass image_sizes [[height, width]]")
    encoded = method.encode_images(model, [pixel_values[n] for n in with_image],
                                   [image_sizes[n] for n in with_image]) if with_image else []
    visions: list[VisionOutput | None] = [None] * len(pixel_values)
    for n, vision in zip(with_image, encoded):
        visions[n] = vision
    return visions


def encode_vision(model, method: DropMethod, pixel_values: torch.Tensor,
                  image_sizes: torch.Tensor | None = None) -> VisionOutput:
    """One image's vision stage ([1, 3, H, W]; LLaVA-NeXT: [1, 1 + K, 3, H, W] and [[height, width]])."""
    return encode_visions(model, method, [pixel_values], [image_sizes])[0]


def check_context(prompt: MultimodalPrompt, context_length: int) -> None:
    if prompt.length > context_length:
        raise ContextLengthError(f"the prompt is {prompt.length} tokens ({prompt.vision_count} of them vision tokens) "
                                 f"but the model's context holds {context_length}")


@torch.inference_mode()
def generate_batch(model, requests: Sequence[GenerationRequest], sampling: SamplingConfig,
                   eos_token_ids: set[int], drop: DropMethod | None = None,
                   compile_backend: str | None = None, cuda_graph: bool = False) -> list[GenerationOutput]:
    """Answer every request, dropping per `drop`: vision stage, one prefill and one decode loop for all of them.

    Under greedy decoding each answer and its statistics equal what the prompt gets alone (up to the
    floating-point rounding of batched matrix products). With a seed, each prompt samples from its own
    generator seeded alike, as it would alone. The times (`vision_seconds`, `prefill_seconds`,
    `scoring_seconds`, `decode_seconds`) are the batch's, shared by its `batch_size` answers.
    `compile_backend` (e.g. "inductor") compiles the decode step with `torch.compile`; `cuda_graph` replays
    it as a CUDA graph (same kernels, so the same tokens, without Python's launch overhead).
    """
    if not requests:
        return []
    check_step_options(model, compile_backend, cuda_graph)
    method = method_or_none(drop)
    geometry = geometry_of_model(model)
    method.check_model(geometry)
    device = model.lm_head.weight.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    generators = [seeded_generator(sampling, device) for _ in requests]
    started = now(device)
    visions = encode_visions(model, method, [request.pixel_values for request in requests],
                             [request.image_sizes for request in requests])
    prompts = [build_prompt(model, request.input_ids, vision) for request, vision in zip(requests, visions)]
    for prompt in prompts:
        check_context(prompt, geometry.context_length)
    vision_done = now(device)
    cache = KVCache(decoder_layer_count(model))
    prefilled = prefill(model, prompts, cache, method)
    method.after_prefill(cache, prefilled.drops)
    first_tokens = next_tokens(prefilled.logits, sampling, generators)
    prefill_done = now(device)
    kv_lengths = [cache.row_lengths(n) for n in range(len(prompts))]
    positions = kv_lengths if compacts_positions(method, prompts) else [
        [prompt.next_position] * len(lengths) for prompt, lengths in zip(prompts, kv_lengths)]
    rooms = [decode_room(geometry.context_length, answer_positions) for answer_positions in positions]
    shared = {"vision_seconds": vision_done - started, "prefill_seconds": prefill_done - vision_done,
              "scoring_seconds": prefilled.scoring_seconds + sum(v.selection_seconds for v in visions if v is not None),
              "batch_size": len(requests)}
    stats = [{**generation_stats(model, prompt, vision, result, lengths, cache.nbytes(n)), **shared}
             for n, (prompt, vision, result, lengths) in enumerate(zip(prompts, visions, prefilled.results, kv_lengths))]
    limits = [min(sampling.max_new_tokens, room) for room in rooms]
    tokens = decode_together(model, first_tokens, cache, positions, limits, sampling, eos_token_ids,
                             [request.should_stop for request in requests], generators, compile_backend, cuda_graph,
                             [request.on_token for request in requests])
    decode_seconds = now(device) - prefill_done
    outputs = []
    for answer_stats, answer_tokens, room in zip(stats, tokens, rooms):
        stopped_at_context = (room < sampling.max_new_tokens and len(answer_tokens) == room
                              and answer_tokens[-1] not in eos_token_ids)
        answer_stats.update(new_tokens=len(answer_tokens), stopped_at_context=stopped_at_context,
                            decode_seconds=decode_seconds, **peak_memory(device))
        outputs.append(GenerationOutput(token_ids=answer_tokens, stats=answer_stats))
    return outputs


def generate(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    sampling: SamplingConfig,
    eos_token_ids: set[int],
    should_stop: Callable[[list[int]], bool] | None = None,
    drop: DropMethod | None = None,
    image_sizes: torch.Tensor | None = None,
    compile_backend: str | None = None,
    cuda_graph: bool = False,
) -> GenerationOutput:
    """Encode the image, prefill the prompt, decode the answer, dropping per `drop`: `generate_batch` with one
    prompt. LLaVA-NeXT also takes the image's size (`image_sizes`, [[height, width]])."""
    request = GenerationRequest(input_ids, pixel_values, image_sizes, should_stop)
    return generate_batch(model, [request], sampling, eos_token_ids, drop, compile_backend, cuda_graph)[0]


def peak_memory(device: torch.device) -> dict:
    """CUDA: peak bytes allocated during this batch. CPU: the process's peak resident set so far
    (the OS only keeps a high-water mark per process, so compare settings in separate processes)."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device)}
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RU_MAXRSS_UNIT}


def generation_stats(model, prompt: MultimodalPrompt, vision: VisionOutput | None, prefilled: PrefillResult,
                     kv_lengths: list[int], kv_bytes: int) -> dict:
    """Per-answer statistics: what the method's vision stage reports about itself, then what every method
    shares: token counts per stage and layer, KV-cache size, FLOPs ratio. LLaVA-NeXT adds the layer average
    per tower image (the reference reports the total divided by the images). `vision_kept_fraction` is the
    layer average over the image's vision tokens in (what a `keep_fraction`, which the vision stage reports
    when one was asked, aims at)."""
    vision_stats = vision.stats if vision is not None else {}
    vision_in = vision_stats.get("vision_tokens_in", prompt.vision_count)
    unpruned_len = prompt.length - prompt.vision_count + vision_in
    text_config = model.config.text_config
    unpruned_flops = prefill_flops(text_config, [unpruned_len] * len(prefilled.tokens_per_layer))
    per_layer = prefilled.vision_tokens_per_layer
    average = sum(per_layer) / len(per_layer)
    per_image = {"avg_vision_tokens_per_image": average / vision_stats["images"]} if "images" in vision_stats else {}
    kept_fraction = {"vision_kept_fraction": average / vision_in} if vision_in else {}
    return {
        **vision_stats,
        **per_image,
        **kept_fraction,
        "vision_tokens_in": vision_in,
        "vision_tokens": prompt.vision_count,
        "vision_tokens_after_layer": {str(layer): count for layer, count in prefilled.vision_tokens_after_layer.items()},
        "avg_vision_tokens": average,
        "prompt_tokens": prompt.length,
        "kv_cache_lengths": kv_lengths,
        "kv_cache_bytes": kv_bytes,
        "prefill_flops_ratio": prefill_flops(text_config, prefilled.tokens_per_layer) / unpruned_flops,
    }
