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
from llava.drop.cache import KVCache, gather_tokens, padded_rows
from llava.drop.method import DropMethod, LayerContext
from llava.drop.probe import TokenLayout, remap_key_indices, sequence_keep
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

    @property
    def length(self) -> int:
        return self.embeds.shape[1]


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


def attention_mask(model, lengths: list[int], like: torch.Tensor) -> torch.Tensor | None:
    """The additive mask [N, 1, seq, seq] that keeps each row's queries to its own causal keys. None when every
    row is full length and the kernel takes `is_causal` (SDPA, FlashAttention): batch 1 runs unmasked."""
    seq = like.shape[SEQUENCE_DIM]
    if model.config._attn_implementation != EAGER and all(length == seq for length in lengths):
        return None
    slots = torch.arange(seq, device=like.device)
    valid = slots[None] < torch.tensor(lengths, device=like.device)[:, None]  # [N, seq] real keys
    allowed = (slots[None, :] <= slots[:, None])[None] & valid[:, None, :]  # causal and real
    allowed |= torch.eye(seq, dtype=torch.bool, device=like.device)[None]  # a padding query sees itself: no NaN
    mask = torch.zeros(allowed.shape, dtype=like.dtype, device=like.device)
    return mask.masked_fill(~allowed, torch.finfo(like.dtype).min)[:, None]


def rotary(model, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE cos/sin for these positions [N, seq]; shared by every layer that uses the same positions."""
    return model.model.language_model.rotary_emb(hidden, positions)


def run_layer(model, layer_idx: int, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
              cache: KVCache, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One decoder layer over the whole padded batch, writing that layer's cache."""
    return model.model.language_model.layers[layer_idx](
        hidden, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
        position_embeddings=position_embeddings,
    )


def last_token_logits(model, hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Final norm and LM head on each row's last real token: [N, vocab] in float."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, torch.tensor(lengths, device=hidden.device) - 1]
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


@dataclass
class RowDrop:
    """One prompt's outcome at a dropping layer: the sequence positions it keeps and the tokens it adds
    right after its kept vision tokens (a method's recycled tokens, [n, hidden])."""

    kept: torch.Tensor  # vision positions kept, ascending
    keep: torch.Tensor  # sequence positions kept: the system tokens, the kept vision tokens, the text
    recycled: torch.Tensor | None = None

    @property
    def vision_kept(self) -> int:
        return self.kept.numel()

    @property
    def added(self) -> int:
        return 0 if self.recycled is None else self.recycled.shape[0]


def pack_rows(hidden: torch.Tensor, positions: torch.Tensor, layouts: list[TokenLayout], rows: list[RowDrop],
              compact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row reduced to its kept tokens, its recycled tokens inserted after its kept vision tokens (sharing
    the position of the token before them), padded again: one gather over [hidden; recycled] per batch."""
    longest = hidden.shape[SEQUENCE_DIM]
    extra = max(row.added for row in rows)
    if extra:
        recycled = hidden.new_zeros(hidden.shape[0], extra, hidden.shape[2])
        for n, row in enumerate(rows):
            if row.added:
                recycled[n, : row.added] = row.recycled.to(hidden)
        hidden = torch.cat([hidden, recycled], dim=SEQUENCE_DIM)
    sources, position_sources = [], []
    for layout, row in zip(layouts, rows):
        at = layout.vision_start + row.vision_kept
        keep = row.keep.to(hidden.device)
        inserted = torch.arange(longest, longest + row.added, device=hidden.device)
        sources.append(torch.cat([keep[:at], inserted, keep[at:]]))
        position_sources.append(torch.cat([keep[:at], keep[max(at - 1, 0)].expand(row.added), keep[at:]]))
    index = padded_rows(sources)
    hidden = gather_tokens(hidden, index, SEQUENCE_DIM)
    if compact:
        return hidden, torch.arange(index.shape[1], device=hidden.device)[None].expand(index.shape[0], -1)
    return hidden, positions.gather(1, padded_rows(position_sources))


def prefill(model, prompts: list[MultimodalPrompt], cache: KVCache, method: DropMethod | None = None) -> BatchPrefill:
    """Run the prompts through every layer together; after each of the method's layers every prompt keeps what
    the method selects from that prompt's own scores."""
    method = method_or_none(method)
    geometry = geometry_of_model(model)
    drop_layers = set(method.prefill_layers(geometry))
    lengths = [prompt.length for prompt in prompts]
    hidden = padded_rows([prompt.embeds[0] for prompt in prompts])
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None].expand(len(prompts), -1)
    layouts = [TokenLayout(prompt.vision_start, prompt.vision_count, prompt.length) for prompt in prompts]
    key_indices = [prompt.key_indices for prompt in prompts]
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
        if layer_idx not in drop_layers or not any(can_drop(layout) for layout in layouts):
            continue
        with stopwatch:
            rows = []
            for n, layout in enumerate(layouts):
                rows.append(select_row(method, model, layer_idx, layer_input[n : n + 1, : layout.seq_len],
                                       hidden[n : n + 1, : layout.seq_len], cache.keys[layer_idx][n : n + 1, :, : layout.seq_len],
                                       positions[n, : layout.seq_len], layout, key_indices[n],
                                       prompts[n].vision_count, geometry))
                key_indices[n] = remap_key_indices(key_indices[n], rows[-1].kept)
            hidden, positions = pack_rows(hidden, positions, layouts, rows, method.compact_positions)
        for n, (layout, row) in enumerate(zip(layouts, rows)):
            if can_drop(layout):
                vision_count = row.vision_kept + row.added
                results[n].drops.append((layer_idx, row.keep))
                results[n].vision_tokens_after_layer[layer_idx] = vision_count
                layouts[n] = TokenLayout(layout.vision_start, vision_count, row.keep.numel() + row.added)
        batch_drops.append((layer_idx, [row.keep for row in rows]))
        lengths = [layout.seq_len for layout in layouts]
        mask = attention_mask(model, lengths, hidden)
        position_embeddings = rotary(model, hidden, positions)
    logits = last_token_logits(model, hidden, lengths)
    for result, row_logits in zip(results, logits):
        result.logits = row_logits
    return BatchPrefill(logits, results, batch_drops, lengths, stopwatch.seconds())


def prefill_prompt(model, prompt: MultimodalPrompt, method: DropMethod | None = None) -> PrefillResult:
    """One prompt's prefill (a batch of one, into a fresh cache): what it kept, layer by layer."""
    return prefill(model, [prompt], KVCache(decoder_layer_count(model)), method).results[0]


def select_row(method: DropMethod, model, layer_idx: int, layer_input: torch.Tensor, layer_output: torch.Tensor,
               keys: torch.Tensor, positions: torch.Tensor, layout: TokenLayout, key_indices: torch.Tensor | None,
               prompt_vision_count: int, geometry) -> RowDrop:
    """One prompt's selection at a dropping layer, from its own rows of the batch (a prompt without vision or
    text tokens keeps everything)."""
    if not can_drop(layout):
        device = layer_output.device
        return RowDrop(torch.arange(layout.vision_count, device=device), torch.arange(layout.seq_len, device=device))
    context = LayerContext(model, layer_idx, layer_input, layer_output, keys, positions, layout, key_indices,
                           prompt_vision_count, geometry)
    kept = method.select(context)
    return RowDrop(kept, sequence_keep(layout, kept), method.recycle(context, kept))
