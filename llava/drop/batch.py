"""Answer several prompts at once: each prompt's vision stage and prefill run alone, then one decode loop
steps all of them together.

Why this split: every method keeps its own vision tokens per prompt and per layer, so prefill stays
exactly the batch-1 computation (same kept sets, same statistics). Decoding one token is bound by
reading the weights, so stepping N answers through each layer costs about what one costs, and the
smaller KV caches that dropping leaves turn into throughput. The N caches sit side by side in one
buffer per layer, each prompt's tokens first and the rest masked; every step writes each prompt's new
token at that prompt's own length in that layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from llava.drop.cache import SEQ_DIM, LayerKVCache
from llava.drop.generate import (
    GenerationOutput,
    PrefilledAnswer,
    SamplingConfig,
    finish_stats,
    method_or_none,
    peak_memory,
    rotary,
    sample_on_device,
    seeded_generator,
    start_answer,
)
from llava.drop.graphs import StepGraph
from llava.drop.method import DropMethod
from llava.drop.timing import now
from llava.model.geometry import decoder_layer_count, geometry_of_model

COMPILE_BACKEND = "inductor"  # torch.compile's default backend, what --compile uses


@dataclass
class GenerationRequest:
    """One prompt of a batch: what `generate` takes for one answer."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_sizes: torch.Tensor | None = None
    should_stop: Callable[[list[int]], bool] | None = None


class BatchKVCache:
    """N prompts' caches in one buffer per layer, [N, kv_heads, longest + room, head_dim]: prompt n's tokens
    at 0..lengths[l][n] - 1, each step's token written at that length (the other slots are masked out)."""

    def __init__(self, caches: Sequence[LayerKVCache], room: int):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[torch.Tensor] = []  # per layer, [N] on the device
        for layer_idx in range(len(caches[0].keys)):
            lengths = [cache.length(layer_idx) for cache in caches]
            self.keys.append(self._side_by_side([cache.keys[layer_idx] for cache in caches], max(lengths) + room))
            self.values.append(self._side_by_side([cache.values[layer_idx] for cache in caches], max(lengths) + room))
            self.lengths.append(torch.tensor(lengths, device=self.keys[-1].device))
        self.device = self.keys[0].device
        # Layers holding the same lengths for every prompt (most of them) share one mask per step.
        per_layer = [tuple(cache.length(layer_idx) for cache in caches) for layer_idx in range(len(self.keys))]
        distinct = list(dict.fromkeys(per_layer))
        self.mask_group = [distinct.index(lengths) for lengths in per_layer]
        self.group_layer = [per_layer.index(lengths) for lengths in distinct]  # a layer that stands for each group

    @staticmethod
    def _side_by_side(tensors: list[torch.Tensor], slots: int) -> torch.Tensor:
        first = tensors[0]
        buffer = first.new_zeros((len(tensors), first.shape[1], slots, first.shape[3]))
        for row, tensor in enumerate(tensors):
            buffer[row, :, : tensor.shape[SEQ_DIM]] = tensor[0]
        return buffer

    def step_masks(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """This step's additive mask [N, 1, 1, slots] per layer: each prompt's cached tokens and the slot its
        new token is about to fill. Made before any layer writes, once per group of layers alike."""
        masks = []
        for layer_idx in self.group_layer:
            slots = torch.arange(self.keys[layer_idx].shape[SEQ_DIM], device=self.device)
            allowed = slots[None] <= self.lengths[layer_idx][:, None]
            mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device)
            masks.append(mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None, None])
        return [masks[group] for group in self.mask_group]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, **_) -> tuple[torch.Tensor, torch.Tensor]:
        """Write each prompt's one new token at its own length in this layer; return the whole buffers."""
        at = self.lengths[layer_idx]
        slot = at.view(-1, 1, 1, 1).expand(key_states.shape)  # [N, kv_heads, 1, head_dim]: each row's own slot
        self.keys[layer_idx].scatter_(SEQ_DIM, slot, key_states)
        self.values[layer_idx].scatter_(SEQ_DIM, slot, value_states)
        at.add_(1)  # in place: a compiled or captured step mutates this tensor, not the Python list
        return self.keys[layer_idx], self.values[layer_idx]


class BatchPositions:
    """Where each layer places each prompt's next token, [distinct position rows, N] on the device; layers
    whose positions agree for every prompt (most of them) share one row of RoPE."""

    def __init__(self, positions: Sequence[list[int]], device: torch.device):
        per_layer = [tuple(answer[layer] for answer in positions) for layer in range(len(positions[0]))]
        distinct = sorted(set(per_layer))
        self.row_of_layer = [distinct.index(row) for row in per_layer]
        self.rows = torch.tensor(distinct, device=device)
        self.steps = torch.zeros((), dtype=self.rows.dtype, device=device)  # a tensor: a captured step advances it

    def current(self) -> torch.Tensor:
        return self.rows + self.steps

    def advance(self) -> None:
        self.steps.add_(1)


def decode_step(model, tokens: torch.Tensor, cache: BatchKVCache, current: torch.Tensor,
                row_of_layer: list[int]) -> torch.Tensor:
    """Feed each prompt's last token ([N, 1]) at `current` positions ([distinct rows, N], layer l using row
    row_of_layer[l]); return the next-token logits [N, vocab] (float). Everything that changes between
    steps is a tensor, so `torch.compile` traces it once."""
    hidden = model.get_input_embeddings()(tokens)
    count = tokens.shape[0]
    cos, sin = (part.view(*current.shape, -1) for part in rotary(model, hidden, current.flatten()))
    layers = model.model.language_model.layers
    masks = cache.step_masks(hidden.dtype)
    for layer_idx in range(decoder_layer_count(model)):
        row = row_of_layer[layer_idx]
        hidden = layers[layer_idx](
            hidden,
            attention_mask=masks[layer_idx],
            position_ids=current[row].view(count, 1),
            cache=cache,
            use_cache=True,
            position_embeddings=(cos[row][:, None], sin[row][:, None]),
        )
    return model.lm_head(model.model.language_model.norm(hidden[:, -1])).float()


def answer_done(tokens: list[int], limit: int, eos_token_ids: set[int],
                should_stop: Callable[[list[int]], bool] | None) -> bool:
    """The batch-1 loop's stop rule: EOS, the token limit, or the prompt's own stop condition."""
    return tokens[-1] in eos_token_ids or len(tokens) >= limit or (should_stop is not None and should_stop(tokens))


def decode_together(model, answers: list[PrefilledAnswer], requests: Sequence[GenerationRequest],
                    eos_token_ids: set[int], generators: list[torch.Generator | None],
                    compile_backend: str | None = None, cuda_graph: bool = False) -> list[list[int]]:
    """Step every unfinished answer until each stops by the batch-1 rule; a finished one rides along
    (its tokens are ignored) so that the batch keeps its shape. The step reads the fed-back tokens from
    one tensor and advances positions in place, so it can run eagerly, under `torch.compile` with
    `compile_backend` (it compiles once per batch shape), or as a replayed CUDA graph (`cuda_graph`)."""
    tokens = [[answer.first_token] for answer in answers]
    limits = [answer.sampling.max_new_tokens for answer in answers]
    done = [answer_done(tokens[n], limits[n], eos_token_ids, requests[n].should_stop) for n in range(len(answers))]
    if all(done):
        return tokens
    device = model.get_input_embeddings().weight.device
    cache = BatchKVCache([answer.cache for answer in answers], max(limits) - 1)
    for answer in answers:
        answer.cache = None  # its tokens now live in the batch buffers; do not hold them twice
    positions = BatchPositions([answer.positions for answer in answers], device)
    fed_back = torch.tensor([[answer.first_token] for answer in answers], device=device)
    layer_step = decode_step if compile_backend is None else torch.compile(decode_step, backend=compile_backend)

    def step() -> torch.Tensor:
        logits = layer_step(model, fed_back, cache, positions.current(), positions.row_of_layer)
        positions.advance()
        return logits

    run_step = StepGraph(step, device) if cuda_graph else step
    while not all(done):
        fed_back.copy_(next_tokens(run_step(), answers, generators))
        for n, token in enumerate(fed_back.view(-1).tolist()):  # the one read per step, for the stop checks
            if not done[n]:
                tokens[n].append(token)
                done[n] = answer_done(tokens[n], limits[n], eos_token_ids, requests[n].should_stop)
    return tokens


def next_tokens(logits: torch.Tensor, answers: list[PrefilledAnswer],
                generators: list[torch.Generator | None]) -> torch.Tensor:
    """Each answer's next token [N, 1]: one argmax over the batch when greedy (every answer shares the
    temperature), else each answer sampled with its own generator, as it would be alone."""
    if answers[0].sampling.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.cat([sample_on_device(logits[n], answers[n].sampling, generators[n]) for n in range(len(answers))])


@torch.inference_mode()
def generate_batch(model, requests: Sequence[GenerationRequest], sampling: SamplingConfig,
                   eos_token_ids: set[int], drop: DropMethod | None = None,
                   compile_backend: str | None = None, cuda_graph: bool = False) -> list[GenerationOutput]:
    """`generate` for several prompts: under greedy decoding each answer and its statistics equal what
    `generate` gives that prompt alone (up to floating-point rounding of batched matrix products). With
    a seed, each prompt samples from its own generator seeded alike, as it would alone. `decode_seconds`
    is the batch's shared decoding time; `batch_size` says how many answers shared it. `compile_backend`
    (e.g. "inductor") compiles the decode step with `torch.compile`; `cuda_graph` replays it as a CUDA
    graph (same kernels, so the same tokens, without Python's launch overhead)."""
    if not requests:
        return []
    check_step_options(model, compile_backend, cuda_graph)
    method = method_or_none(drop)
    method.check_model(geometry_of_model(model))
    device = model.lm_head.weight.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    generators = [seeded_generator(sampling, device) for _ in requests]
    answers = [start_answer(model, method, request.input_ids, request.pixel_values, request.image_sizes, sampling,
                            generator) for request, generator in zip(requests, generators)]
    decode_started = now(device)
    tokens = decode_together(model, answers, requests, eos_token_ids, generators, compile_backend, cuda_graph)
    decode_seconds = now(device) - decode_started
    outputs = []
    for answer, answer_tokens in zip(answers, tokens):
        stats = finish_stats(answer, answer_tokens, eos_token_ids, sampling.max_new_tokens)
        stats.update(decode_seconds=decode_seconds, batch_size=len(requests), **peak_memory(device))
        outputs.append(GenerationOutput(token_ids=answer_tokens, stats=stats))
    return outputs


def check_step_options(model, compile_backend: str | None, cuda_graph: bool) -> None:
    """Refuse a decode-step choice that cannot run, before any prefill."""
    if compile_backend is not None and cuda_graph:
        raise ValueError("choose one of torch.compile and CUDA graphs for the decode step, not both")
    device = model.lm_head.weight.device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device; the model is on {device.type}")
