"""Decode, gpt-fast style: every answer of a batch (one answer is a batch of one) steps together.

Decoding one token is bound by reading the weights, so stepping N answers through each layer costs about
what one costs, and the smaller KV caches that dropping leaves turn into throughput. The N caches sit side
by side in one buffer per layer (`KVCache`), each prompt's tokens first and the rest masked; every step
writes each prompt's new token at that prompt's own length in that layer, at that layer's own position.
Everything a step changes lives in tensors that stay put, so the step runs eagerly, under
`torch.compile`, or replayed as a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import TopPLogitsWarper

from llava.drop.cache import KVCache
from llava.drop.graphs import StepGraph
from llava.model.geometry import decoder_layer_count


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


def seeded_generator(sampling: SamplingConfig, device: torch.device) -> torch.Generator | None:
    return torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None


def sample_on_device(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One answer's next token as a [1, 1] tensor where its logits [vocab] are: greedy at temperature 0,
    otherwise temperature and nucleus sampling."""
    if sampling.temperature == 0:
        return logits.argmax().view(1, 1)
    scores = logits[None] / sampling.temperature
    if sampling.top_p is not None and sampling.top_p < 1:
        scores = TopPLogitsWarper(top_p=sampling.top_p)(None, scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs[0], 1, generator=generator).view(1, 1)


def next_tokens(logits: torch.Tensor, sampling: SamplingConfig, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Each answer's next token [N, 1]: one argmax over the batch when greedy, else each answer sampled with
    its own generator, as it would be alone."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.cat([sample_on_device(logits[n], sampling, generators[n]) for n in range(logits.shape[0])])


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


def decode_step(model, tokens: torch.Tensor, cache: KVCache, current: torch.Tensor,
                row_of_layer: list[int]) -> torch.Tensor:
    """Feed each prompt's last token ([N, 1]) at `current` positions ([distinct rows, N], layer l using row
    row_of_layer[l]); return the next-token logits [N, vocab] (float). Everything that changes between
    steps is a tensor, so `torch.compile` traces it once."""
    hidden = model.get_input_embeddings()(tokens)
    count = tokens.shape[0]
    cos, sin = (part.view(*current.shape, -1) for part in model.model.language_model.rotary_emb(hidden, current.flatten()[None]))
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
    """An answer's stop rule: EOS, its token limit, or its prompt's own stop condition."""
    return tokens[-1] in eos_token_ids or len(tokens) >= limit or (should_stop is not None and should_stop(tokens))


def decode_together(model, first_tokens: torch.Tensor, cache: KVCache, positions: Sequence[list[int]],
                    limits: list[int], sampling: SamplingConfig, eos_token_ids: set[int],
                    stops: Sequence[Callable[[list[int]], bool] | None], generators: list[torch.Generator | None],
                    compile_backend: str | None = None, cuda_graph: bool = False,
                    listeners: Sequence[Callable[[int], None] | None] | None = None) -> list[list[int]]:
    """Step every unfinished answer until each stops by its own rule; a finished one rides along (its tokens
    are ignored) so that the batch keeps its shape. `first_tokens` [N, 1] come from prefill, `positions[n][l]`
    is where layer l places answer n's next token. The step reads the fed-back tokens from one tensor and
    advances positions in place, so it can run eagerly, under `torch.compile` with `compile_backend` (it
    compiles once per batch shape), or as a replayed CUDA graph (`cuda_graph`). `listeners[n]`, where given,
    is called with each of answer n's tokens as it is decoded (a chat streams the answer so)."""
    tokens = [[token] for token in first_tokens.view(-1).tolist()]
    listeners = listeners or [None] * len(tokens)
    for listener, answer in zip(listeners, tokens):
        if listener is not None:
            listener(answer[0])
    done = [answer_done(tokens[n], limits[n], eos_token_ids, stops[n]) for n in range(len(tokens))]
    if all(done):
        return tokens
    device = first_tokens.device
    cache.reserve(max(limits) - 1)
    batch_positions = BatchPositions(positions, device)
    fed_back = first_tokens.clone()
    layer_step = decode_step if compile_backend is None else torch.compile(decode_step, backend=compile_backend)

    def step() -> torch.Tensor:
        logits = layer_step(model, fed_back, cache, batch_positions.current(), batch_positions.row_of_layer)
        batch_positions.advance()
        return logits

    run_step = StepGraph(step, device) if cuda_graph else step
    while not all(done):
        fed_back.copy_(next_tokens(run_step(), sampling, generators))
        for n, token in enumerate(fed_back.view(-1).tolist()):  # the one read per step, for the stop checks
            if not done[n]:
                tokens[n].append(token)
                if listeners[n] is not None:
                    listeners[n](token)
                done[n] = answer_done(tokens[n], limits[n], eos_token_ids, stops[n])
    return tokens
