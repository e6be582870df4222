"""What a token-dropping method is: a set of stage policies the engine calls.

The engine (llava/drop/generate.py) owns the loop; a method only decides: how the image becomes vision
tokens (vision stage), which vision tokens survive after chosen decoder layers (prefill stage), and
what to do to the KV cache before decoding (decode stage). The base class changes nothing, so it is
the unpruned model ("none").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from llava.drop.cache import KVCache
from llava.drop.probe import TokenLayout, rows_to_vision_attention
from llava.drop.vision import VisionOutput, encode_image, encode_images_together, encode_next_image, is_next
from llava.model.geometry import ModelGeometry

TEXT_QUERIES = "text"  # every token after the image: the question and the template's tail
LAST_QUERY = "last"  # the last prompt token, which FastV / PyramidDrop rank by

# Where a method drops, as the paper sorts prior work (plus the simple baselines), for comparison tables.
UNPRUNED = "unpruned"
ENCODER = "encoder"  # only while the vision tower encodes (ToMe, PruMerge, VisionZip)
PREFILL = "prefill"  # only inside the decoder's prefill (FastV, PyramidDrop, SparseVLM)
MULTI_STAGE = "multi-stage"  # vision tower, prefill and decoding (MustDrop)
BASELINE = "baseline"  # no learned or attention signal: random subsets, pooling
FAMILIES = (ENCODER, PREFILL, MULTI_STAGE, BASELINE)


@dataclass
class LayerContext:
    """What a method may look at after a decoder layer ran, with attention blocks computed on demand.

    Only the requested block (some query rows x the vision keys) is computed, from the layer's input and
    its cached keys, so no layer has to run eager attention.
    """

    model: object
    layer_idx: int
    layer_input: torch.Tensor
    layer_output: torch.Tensor
    keys: torch.Tensor
    positions: torch.Tensor
    layout: TokenLayout
    key_indices: torch.Tensor | None
    prompt_vision_count: int  # vision tokens the decoder started with (after the vision stage)
    geometry: ModelGeometry
    _cache: dict = field(default_factory=dict)

    def attention(self, queries: str = TEXT_QUERIES) -> torch.Tensor:
        """Head-averaged attention probabilities [query rows, vision tokens]."""
        if queries not in self._cache:
            if queries == TEXT_QUERIES:
                rows = torch.arange(self.layout.text_start, self.layout.seq_len, device=self.layer_input.device)
            elif queries == LAST_QUERY:
                rows = torch.tensor([self.layout.seq_len - 1], device=self.layer_input.device)
            else:
                raise ValueError(f"unknown query rows {queries!r}; use {TEXT_QUERIES!r} or {LAST_QUERY!r}")
            self._cache[queries] = rows_to_vision_attention(
                self.model, self.layer_idx, self.layer_input, self.keys, self.positions, self.layout, rows
            )
        return self._cache[queries]

    @property
    def vision_hidden(self) -> torch.Tensor:
        """The layer's output hidden states of the current vision tokens, [vision, hidden]."""
        return self.layer_output[0, self.layout.vision_start : self.layout.text_start]


def last_token_scores(context: LayerContext) -> torch.Tensor:
    """Head-averaged attention [V] of the last prompt token on the current vision tokens."""
    return context.attention(LAST_QUERY)[0]


class DropMethod:
    """The unpruned model. Subclasses override the stages they change."""

    name: ClassVar[str] = "none"
    family: ClassVar[str] = UNPRUNED
    compact_positions: bool = True  # give the shorter sequence positions 0..len-1 (the reference's rule)
    supports_next: ClassVar[bool] = False  # its vision stage takes LLaVA-NeXT's base image + crops
    own_count: ClassVar[bool] = False  # picks its own token count per image and refuses a budget

    def encode_image(self, model, pixel_values: torch.Tensor) -> VisionOutput:
        return encode_image(model, pixel_values)

    def encode_next(self, model, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> VisionOutput:
        """LLaVA-NeXT's vision stage: the base image and its crops [1, 1 + K, 3, H, W] with the image's
        [[height, width]]; by default the model's own layout (its `mm_patch_merge_type`), unpruned."""
        return encode_next_image(model, pixel_values, image_sizes)

    def encode_images(self, model, pixel_values: list[torch.Tensor],
                      image_sizes: list[torch.Tensor | None]) -> list[VisionOutput]:
        """Every prompt's vision stage (LLaVA-NeXT: each prompt's base image + crops and its size). The
        unpruned tower runs the images of all prompts as one batch; a method with a vision stage of its own
        runs it one prompt at a time unless it overrides this too."""
        if self.has_own_vision_stage:
            return [self.encode_next(model, pixels, sizes) if is_next(model) else self.encode_image(model, pixels)
                    for pixels, sizes in zip(pixel_values, image_sizes)]
        return encode_images_together(model, pixel_values, image_sizes)

    @property
    def has_own_vision_stage(self) -> bool:
        own = type(self)
        return own.encode_image is not DropMethod.encode_image or own.encode_next is not DropMethod.encode_next

    def prefill_layers(self, geometry: ModelGeometry) -> tuple[int, ...]:
        """Decoder layers after which `select` is called, in a model of this geometry."""
        return ()

    def select(self, context: LayerContext) -> torch.Tensor:
        """Vision positions (ascending) to keep after `context.layer_idx`."""
        return torch.arange(context.layout.vision_count, device=context.layer_output.device)

    def recycle(self, context: LayerContext, kept: torch.Tensor) -> torch.Tensor | None:
        """Extra hidden states [n, hidden] placed right after the kept vision tokens, counted as vision
        tokens from the next layer on (default: none). Earlier layers' KV caches never hold them, so a
        method that recycles must not map `drops` back onto those caches in `after_prefill`."""
        return None

    def after_prefill(self, cache: KVCache, drops: list[tuple[int, list[torch.Tensor]]]) -> None:
        """Change the batch's KV cache before decoding (default: keep what each layer saw). `drops` lists, per
        dropping layer in order, each prompt's kept sequence positions (all of them where it could not drop)."""

    def check_model(self, geometry: ModelGeometry) -> None:
        """Raise ValueError for settings this model cannot honour, before anything runs: a scoring layer
        beyond its decoder, or a `budget` option above its vision tokens, or a LLaVA-NeXT model for a method
        without `supports_next`. Methods add their own floors."""
        if getattr(geometry, "max_crops", 0) and self.enabled and not self.supports_next:
            raise ValueError(f"dropping with {self.name} does not run on LLaVA-NeXT checkpoints yet; run them "
                             "without --sparse / --method, or use a LLaVA-1.5 checkpoint")
        layers = self.prefill_layers(geometry)
        if layers and max(layers) >= geometry.decoder_layers:
            raise ValueError(f"dropping after layer {max(layers)} (0-based) is impossible in a model "
                             f"with {geometry.decoder_layers} decoder layers; use layers 0..{geometry.decoder_layers - 1}")
        budget = getattr(getattr(self, "options", None), "budget", None)
        if budget is not None and budget > geometry.max_vision_tokens:
            raise ValueError(f"budget {budget:g} exceeds the {geometry.max_vision_tokens} vision tokens "
                             "this model gives an image at most")

    @property
    def enabled(self) -> bool:
        return type(self) is not DropMethod
