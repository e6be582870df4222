"""Prefill, gpt-fast style: N prompts run through the decoder layer by layer, together.

Running the layers ourselves is what lets each prompt shrink between layers. The prompts of a batch sit
in one padded tensor [N, longest, hidden], each prompt's tokens first; a padding mask keeps every prompt
to its own causal keys, so each row computes what it would alone. After a method's dropping layer every
prompt keeps what the method selects from its own scores, and one gather per layer packs the shorter
rows again. Without a drop policy the result equals transformers' own forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llava.constants import IMAGE_TOKEN_INDEX
from llava.drop.blocks import device_tensor
from llava.drop.cache import KVCache, gather_tokens, padded_rows
from llava.drop.method import DropMethod, LayerContext, positions_to_mask
from llava.drop.probe import TokenLayout, positions_at
from llava.drop.timing import Stopwatch
from llava.drop.vision import VisionOutput
from llava.model.geometry import decoder_layer_count, geometry_of_model

EAGER = "eager"
SEQUENCE_DIM = 1  # hidden states are [batch, seq, hidden]


@dataclass
class MultimodalPrompt:
    """The prompt as embeddings: [system][vision][text], and where the vision span sits."""

    embeds: torch.Tensor  # [1, seq, hidden]
    vision_start: int
    vision_count: int
    key_indices: torch.Tensor | None = None
    positions: torch.Tensor | None = None  # Qwen's 3-D positions [3, seq] (host); None: token i at position i

    @property
    def length(self) -> int:
        return self.embeds.shape[1]

    @property
    def next_position(self) -> int:
        """Where the first answer token goes when no drop re-numbers the prompt: after its last position."""
        return self.length if self.positions is None else int(self.positions.max()) + 1


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
    positions = None if vision.positions is None else spatial_positions(vision, start, ids.numel() - start - 1)
    return MultimodalPrompt(embeds, start, vision.features.shape[0], vision.key_indices, positions)


def spatial_positions(vision: VisionOutput, start: int, text_after: int) -> torch.Tensor:
    """[3, seq] M-RoPE positions of [text][image][text]: text at one position on every axis, each vision token
    at start + its (t, row, column) offset, the text after the image from start + the image's span on."""
    device = vision.positions.device
    before = torch.arange(start, device=device)
    after = torch.arange(text_after, device=device) + start + vision.position_span
    return torch.cat([before.expand(3, -1), vision.positions + start, after.expand(3, -1)], dim=1)


def attention_mask(model, lengths: list[int], like: torch.Tensor) -> torch.Tensor | None:
    """The additive mask [N, 1, seq, seq] that keeps each row's queries to its own causal keys. None when every
    row is full length and the kernel takes `is_causal` (SDPA, FlashAttention): batch 1 runs unmasked."""
    seq = like.shape[SEQUENCE_DIM]
    if model.config._attn_implementation != EAGER and all(length == seq for length in lengths):
        return None
    slots = torch.arange(seq, device=like.device)
    valid = slots[None] < device_tensor(lengths, like.device)[:, None]  # [N, seq] real keys
    allowed = (slots[None, :] <= slots[:, None])[None] & valid[:, None, :]  # causal and real
    allowed |= torch.eye(seq, dtype=torch.bool, device=like.device)[None]  # a padding query sees itself: no NaN
    mask = torch.zeros(allowed.shape, dtype=like.dtype, device=like.device)
    return mask.masked_fill(~allowed, torch.finfo(like.dtype).min)[:, None]


def rotary(model, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE cos/sin for these positions ([N, seq], or Qwen's [3, N, seq]); shared by every layer that uses
    the same positions."""
    return model.model.language_model.rotary_emb(hidden, positions)


def batch_positions(prompts: list[MultimodalPrompt], seq: int, device) -> torch.Tensor:
    """The padded batch's positions: [N, seq] 0..len-1, or [3, N, seq] when a prompt has 3-D positions (a
    prompt without them, text only, sits at i on every axis; padding at 0)."""
    if all(prompt.positions is None for prompt in prompts):
        return torch.arange(seq, device=device)[None].expand(len(prompts), -1)
    rows = [torch.arange(prompt.length).expand(3, -1) if prompt.positions is None else prompt.positions.cpu()
            for prompt in prompts]  # built on the host (where the vision stage's positions are), copied once
    return torch.stack([padded_rows([row[axis] for row in rows]) for axis in range(3)]).to(device, non_blocking=True)


def spatial(positions: torch.Tensor) -> bool:
    return positions.dim() == 3


def compacts_positions(method: DropMethod, prompts: list[MultimodalPrompt]) -> bool:
    """Whether a drop re-numbers the kept tokens 0..len-1 (the method's rule). Never with 3-D positions: a
    kept Qwen vision token keeps its own (t, row, column) and the text after it its positions."""
    return method.compact_positions and all(prompt.positions is None for prompt in prompts)


def run_layer(model, layer_idx: int, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
              cache: KVCache, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One decoder layer over the whole padded batch, writing that layer's cache. (Like transformers' Qwen
    forward, 3-D positions reach the layer only as its rotary embeddings.)"""
    return model.model.language_model.layers[layer_idx](
        hidden, attention_mask=mask, position_ids=None if spatial(positions) else positions, cache=cache,
        use_cache=True, position_embeddings=position_embeddings,
    )


def last_token_logits(model, hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Final norm and LM head on each row's last real token: [N, vocab] in float."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, device_tensor(lengths, hidden.device) - 1]
    return model.lm_head(model.model.language_model.norm(last)).float()


@dataclass
class PrefillResult:
    """What the prefill stage did to one prompt, layer by layer."""

    drops: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (layer, sequence keep positions)
    vision_tokens_per_layer: list[int] = field(default_factory=list)
    tokens_per_layer: list[int] = field(default_factory=list)
    vision_tokens_after_layer: dict[int, int] = field(default_factory=dict)
    logits: torch.Tensor | None = None  # the next-token logits [vocab] after the prompt


@dataclass
class BatchPrefill:
    """The batch's next-token logits [N, vocab], each prompt's record, every dropping layer's keep lists (one per
    prompt, a prompt that could not drop keeping everything) for the decode stage, and the selection time."""

    logits: torch.Tensor
    results: list[PrefillResult]
    drops: list[tuple[int, list[torch.Tensor]]]
    lengths: list[int]
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


def key_mask_of(prompts: list[MultimodalPrompt], device) -> tuple[torch.Tensor | None, list[int]]:
    """The vision stage's key tokens (which no drop removes) as a mask [N, V], and how many each prompt has."""
    if all(prompt.key_indices is None for prompt in prompts):
        return None, [0] * len(prompts)
    kept = [torch.tensor([], dtype=torch.long) if prompt.key_indices is None else prompt.key_indices
            for prompt in prompts]
    width = max(prompt.vision_count for prompt in prompts)
    return positions_to_mask(kept, width, device), [indices.numel() for indices in kept]


def recycled_tokens(method: DropMethod, context: LayerContext, vision_keep: torch.Tensor,
                    droppable: list[bool]) -> list[torch.Tensor | None] | None:
    """Each prompt's recycled tokens [n, hidden] (None: no method recycles, or that prompt adds none)."""
    if type(method).recycle is DropMethod.recycle:
        return None
    return [method.recycle(context.row(n), vision_keep[n].nonzero().flatten()) if can else None
            for n, can in enumerate(droppable)]


@dataclass
class Repacked:
    """The batch after a drop: its padded hidden states and positions, each prompt's kept sequence positions
    (in the sequence before the drop), vision and total token counts, and key tokens."""

    hidden: torch.Tensor
    positions: torch.Tensor
    sequence_keeps: list[torch.Tensor]
    vision_counts: list[int]
    lengths: list[int]
    key_mask: torch.Tensor | None


def kept_slots(layouts: list[TokenLayout], vision_keep: torch.Tensor, seq: int) -> torch.Tensor:
    """[N, seq] which sequence slots survive: every system and text token, the kept vision tokens."""
    device = vision_keep.device
    slots = torch.arange(seq, device=device)[None]
    starts = device_tensor([layout.vision_start for layout in layouts], device)[:, None]
    text_starts = device_tensor([layout.text_start for layout in layouts], device)[:, None]
    ends = device_tensor([layout.seq_len for layout in layouts], device)[:, None]
    relative = slots - starts
    in_vision = (relative >= 0) & (slots < text_starts)
    vision_kept = vision_keep.gather(1, relative.clamp(0, vision_keep.shape[1] - 1)) & in_vision
    return (slots < starts) | vision_kept | ((slots >= text_starts) & (slots < ends))


def kept_first(mask: torch.Tensor) -> torch.Tensor:
    """[N, width]: each row's True positions first, in ascending order, then the others."""
    return torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices


def repack(hidden: torch.Tensor, positions: torch.Tensor, layouts: list[TokenLayout], vision_keep: torch.Tensor,
           recycled: list[torch.Tensor | None] | None, key_mask: torch.Tensor | None, compact: bool) -> Repacked:
    """Every prompt reduced to its kept tokens, its recycled tokens inserted after its kept vision tokens
    (sharing the position of the token before them), padded again: one gather over [hidden; recycled] for
    the batch, and one host synchronisation (the new lengths)."""
    batch, seq, _ = hidden.shape
    device = hidden.device
    keep_slots = kept_slots(layouts, vision_keep, seq)
    kept_counts, vision_kept = torch.stack([keep_slots.sum(dim=1), vision_keep.sum(dim=1)]).tolist()
    added = [0 if tokens is None else tokens.shape[0] for tokens in recycled or []] or [0] * batch
    lengths = [kept + extra for kept, extra in zip(kept_counts, added)]
    sequence_order = kept_first(keep_slots)
    order = sequence_order
    if max(added):
        hidden, order = with_recycled(hidden, layouts, keep_slots, recycled, added)
    index = order[:, : max(lengths)]
    vision_counts = [kept + extra for kept, extra in zip(vision_kept, added)]
    if compact:
        new_positions = torch.arange(index.shape[1], device=device)[None].expand(batch, -1)
    else:
        new_positions = positions_at(positions, source_slots(index, seq, added))
    return Repacked(gather_tokens(hidden, index, SEQUENCE_DIM), new_positions,
                    [sequence_order[n, :count] for n, count in enumerate(kept_counts)], vision_counts, lengths,
                    remap_key_mask(key_mask, vision_keep, vision_kept, max(vision_counts)))


def with_recycled(hidden: torch.Tensor, layouts: list[TokenLayout], keep_slots: torch.Tensor,
                  recycled: list[torch.Tensor | None], added: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[hidden; recycled] and the gather order that puts each prompt's recycled tokens right before its text."""
    batch, seq, width = hidden.shape
    device = hidden.device
    extra = max(added)
    tokens = hidden.new_zeros(batch, extra, width)
    for n, rows in enumerate(recycled):
        if rows is not None:
            tokens[n, : rows.shape[0]] = rows.to(hidden)
    never = 2 * (seq + extra)  # sorts after every kept token
    slots = torch.arange(seq, device=device)[None]
    real_keys = torch.where(keep_slots, 2 * slots, never)
    text_starts = device_tensor([layout.text_start for layout in layouts], device)[:, None]
    inserted = torch.arange(extra, device=device)[None] < device_tensor(added, device)[:, None]
    recycled_keys = torch.where(inserted, 2 * text_starts - 1, never)  # between the last vision and first text slot
    order = torch.sort(torch.cat([real_keys, recycled_keys], dim=1), dim=1, stable=True).indices
    return torch.cat([hidden, tokens], dim=SEQUENCE_DIM), order


def source_slots(index: torch.Tensor, seq: int, added: list[int]) -> torch.Tensor:
    """The slot whose position each new token takes: its own, or for a recycled token the kept token before it
    (the first kept token after it when nothing precedes it)."""
    real = torch.where(index < seq, index, -1)
    before = real.cummax(dim=1).values
    first_after = index.gather(1, device_tensor(added, index.device)[:, None])
    return torch.where(before < 0, first_after, before)


def remap_key_mask(key_mask: torch.Tensor | None, vision_keep: torch.Tensor, vision_kept: list[int],
                   width: int) -> torch.Tensor | None:
    """The key tokens among each prompt's kept vision tokens (every key token is kept), [N, width]."""
    if key_mask is None:
        return None
    order = kept_first(vision_keep)[:, :width]
    remapped = key_mask.gather(1, order.clamp(max=key_mask.shape[1] - 1)) if width else key_mask[:, :0]
    if remapped.shape[1] < width:
        remapped = torch.cat([remapped, remapped.new_zeros(remapped.shape[0], width - remapped.shape[1])], dim=1)
    ranks = torch.arange(width, device=vision_keep.device)[None]
    return remapped & (ranks < device_tensor(vision_kept, vision_keep.device)[:, None])


def prefill(model, prompts: list[MultimodalPrompt], cache: KVCache, method: DropMethod | None = None) -> BatchPrefill:
    """Run the prompts through every layer together; after each of the method's layers every prompt keeps what
    the method selects from that prompt's own scores."""
    method = method_or_none(method)
    geometry = geometry_of_model(model)
    drop_layers = set(method.prefill_layers(geometry))
    lengths = [prompt.length for prompt in prompts]
    hidden = inputs_embeds = padded_rows([prompt.embeds[0] for prompt in prompts])
    positions = batch_positions(prompts, hidden.shape[1], hidden.device)
    compact = compacts_positions(method, prompts)
    layouts = [TokenLayout(prompt.vision_start, prompt.vision_count, prompt.length) for prompt in prompts]
    key_mask, key_counts = key_mask_of(prompts, hidden.device)
    prompt_vision_counts = [prompt.vision_count for prompt in prompts]
    results = [PrefillResult() for _ in prompts]
    batch_drops: list[tuple[int, list[torch.Tensor]]] = []
    stopwatch = Stopwatch(hidden.device)
    mask = attention_mask(model, lengths, hidden)
    position_embeddings = rotary(model, hidden, positions)  # recomputed only when a drop changes positions
    for layer_idx in range(decoder_layer_count(model)):
        for result, layout in zip(results, layouts):
            result.vision_tokens_per_layer.append(layout.vision_count)
            result.tokens_per_layer.append(layout.seq_len)
        layer_input = hidden
        hidden = run_layer(model, layer_idx, hidden, positions, mask, cache, position_embeddings)
        cache.set_lengths(layer_idx, lengths)
        if layer_idx not in drop_layers:
            continue
        droppable = [can_drop(layout) for layout in layouts]
        if not any(droppable):
            continue
        with stopwatch:
            context = LayerContext(model, layer_idx, layer_input, hidden, cache.keys[layer_idx], positions, layouts,
                                   key_mask, key_counts, prompt_vision_counts, geometry, inputs_embeds)
            vision_keep = method.select(context)
            if not all(droppable):
                vision_keep = torch.where(device_tensor(droppable, hidden.device)[:, None], vision_keep,
                                          context.vision_valid)
            step = repack(hidden, positions, layouts, vision_keep, recycled_tokens(method, context, vision_keep, droppable),
                          key_mask, compact)
        hidden, positions, key_mask, lengths = step.hidden, step.positions, step.key_mask, step.lengths
        for n, (layout, can) in enumerate(zip(layouts, droppable)):
            layouts[n] = TokenLayout(layout.vision_start, step.vision_counts[n], step.lengths[n])
            if can:
                results[n].drops.append((layer_idx, step.sequence_keeps[n]))
                results[n].vision_tokens_after_layer[layer_idx] = step.vision_counts[n]
        batch_drops.append((layer_idx, step.sequence_keeps))
        mask = attention_mask(model, lengths, hidden)
        position_embeddings = rotary(model, hidden, positions)
    logits = last_token_logits(model, hidden, lengths)
    for result, row_logits in zip(results, logits):
        result.logits = row_logits
    return BatchPrefill(logits, results, batch_drops, lengths, stopwatch.seconds())


def prefill_prompt(model, prompt: MultimodalPrompt, method: DropMethod | None = None) -> PrefillResult:
    """One prompt's prefill (a batch of one, into a fresh cache): what it kept, layer by layer."""
    return prefill(model, [prompt], KVCache(decoder_layer_count(model)), method).results[0]
