"""What a token-dropping method is: a set of stage policies the engine calls.

The engine (llava/drop/generate.py) owns the loop; a method only decides: how the image becomes vision
tokens (vision stage), which vision tokens survive after chosen decoder layers (prefill stage), and
what to do to the KV cache before decoding (decode stage). The base class changes nothing, so it is
the unpruned model ("none").
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from llava.drop.blocks import device_tensor, fraction_budget, planned
from llava.drop.cache import KVCache
from llava.drop.probe import TokenLayout, vision_attention
from llava.drop.vision import VisionOutput, encode_image, encode_images_together, encode_next_image, is_next
from llava.model.geometry import QWEN_FAMILY, ModelGeometry

TEXT_QUERIES = "text"  # every token after the image: the question and the template's tail
LAST_QUERY = "last"  # the last prompt token, which FastV / PyramidDrop rank by

# Where a method drops, as the paper sorts prior work (plus the simple baselines), for comparison tables.
UNPRUNED = "unpruned"
ENCODER = "encoder"  # only while the vision tower encodes (ToMe, PruMerge, VisionZip)
PREFILL = "prefill"  # only inside the decoder's prefill (FastV, PyramidDrop, SparseVLM)
MULTI_STAGE = "multi-stage"  # vision tower, prefill and decoding (MustDrop)
BASELINE = "baseline"  # no learned or attention signal: random subsets, pooling
FAMILIES = (ENCODER, PREFILL, MULTI_STAGE, BASELINE)
# What runs on Qwen2-VL / Qwen2.5-VL, for the refusal of the vision-stage methods that do not.
QWEN_RUNNING_METHODS = ("fastv, pdrop, sparsevlm, mustdrop without its vision stage (--no_merge), and the vision-stage "
                        "ports random, pool and visionzip")


def query_rows(queries: str, layouts: list[TokenLayout], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's query slots [N, Q] (a short row repeats its last real slot) and which are real [N, Q]."""
    if queries == TEXT_QUERIES:
        starts = [layout.text_start for layout in layouts]
    elif queries == LAST_QUERY:
        starts = [layout.seq_len - 1 for layout in layouts]
    else:
        raise ValueError(f"unknown query rows {queries!r}; use {TEXT_QUERIES!r} or {LAST_QUERY!r}")
    ends = device_tensor([layout.seq_len for layout in layouts], device)
    width = max(layout.seq_len - start for layout, start in zip(layouts, starts))
    rows = device_tensor(starts, device)[:, None] + torch.arange(width, device=device)[None]
    return rows.clamp(max=ends[:, None] - 1), rows < ends[:, None]


@dataclass
class LayerContext:
    """What a method may look at after a decoder layer ran, for every prompt of the batch at once.

    Tensors are the padded batch: prompt n's tokens at slots 0..layouts[n].seq_len - 1. Vision-token
    tensors are [N, V], V the most vision tokens any prompt has now; `vision_valid` says which are real.
    Attention blocks (some query rows x the vision keys) are computed on demand, from the layer's input
    and its cached keys, so no layer has to run eager attention.
    """

    model: object
    layer_idx: int
    layer_input: torch.Tensor  # [N, seq, hidden]
    layer_output: torch.Tensor
    keys: torch.Tensor  # [N, kv_heads, seq, head_dim]
    positions: torch.Tensor  # [N, seq] (Qwen: [3, N, seq])
    layouts: list[TokenLayout]
    key_mask: torch.Tensor | None  # [N, V] the key tokens, which are never dropped
    key_counts: list[int]  # key tokens per prompt (they are never dropped, so this stays on the host)
    prompt_vision_counts: list[int]  # vision tokens each prompt entered the decoder with
    geometry: ModelGeometry
    inputs_embeds: torch.Tensor | None = None  # [N, seq, hidden] what entered the decoder, before any drop
    _cache: dict = field(default_factory=dict)

    @property
    def vision_counts(self) -> list[int]:
        return [layout.vision_count for layout in self.layouts]

    @property
    def vision_valid(self) -> torch.Tensor:
        """[N, V]: which vision columns are real tokens of their prompt."""
        if "valid" not in self._cache:
            device = self.layer_output.device
            counts = device_tensor(self.vision_counts, device)
            self._cache["valid"] = torch.arange(max(self.vision_counts), device=device)[None] < counts[:, None]
        return self._cache["valid"]

    @property
    def vision_slots(self) -> torch.Tensor:
        """[N, V]: each prompt's vision tokens' sequence slots (a short prompt's past-the-end ones repeat a
        real slot; `vision_valid` masks them)."""
        if "slots" not in self._cache:
            device = self.layer_output.device
            starts = device_tensor([layout.vision_start for layout in self.layouts], device)
            slots = starts[:, None] + torch.arange(self.vision_valid.shape[1], device=device)[None]
            self._cache["slots"] = slots.clamp(max=self.layer_input.shape[1] - 1)
        return self._cache["slots"]

    def attention(self, queries: str = TEXT_QUERIES) -> torch.Tensor:
        """Head-averaged attention probabilities [N, query rows, vision tokens], zero outside each prompt's
        own query rows and vision tokens."""
        if queries not in self._cache:
            rows, real_rows = query_rows(queries, self.layouts, self.layer_output.device)
            block = vision_attention(self.model, self.layer_idx, self.layer_input, self.keys, self.positions,
                                     rows, self.vision_slots)
            real = real_rows[:, :, None] & self.vision_valid[:, None, :]
            self._cache[queries] = block.masked_fill(~real, 0.0)
        return self._cache[queries]

    def memo(self, key, make):
        """`make()`, computed once per layer context and kept under `key` (what a method derives from the layer
        more than once: its selection and its recycling read the same scores)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def row(self, n: int) -> PromptContext:
        """Prompt n alone, for methods that select one prompt at a time; the same view (and what it computed)
        for every call at this layer, so recycling reuses the selection's attention."""
        return self.memo(("row", n), lambda: self.new_row(n))

    def new_row(self, n: int) -> PromptContext:
        layout = self.layouts[n]
        key_indices = None if self.key_mask is None else self.key_mask[n, : layout.vision_count].nonzero().flatten()
        rows = slice(n, n + 1)
        return PromptContext(LayerContext(
            self.model, self.layer_idx, self.layer_input[rows, : layout.seq_len], self.layer_output[rows, : layout.seq_len],
            self.keys[rows, :, : layout.seq_len], self.positions[..., rows, : layout.seq_len], [layout],
            None if key_indices is None else self.key_mask[rows, : layout.vision_count], [self.key_counts[n]],
            [self.prompt_vision_counts[n]], self.geometry,
            None if self.inputs_embeds is None else self.inputs_embeds[rows]), key_indices)


@dataclass
class PromptContext:
    """One prompt's view of a layer (a batch of one), with its attention as [query rows, vision tokens]."""

    batch: LayerContext
    key_indices: torch.Tensor | None

    @property
    def layer_idx(self) -> int:
        return self.batch.layer_idx

    @property
    def geometry(self) -> ModelGeometry:
        return self.batch.geometry

    @property
    def layer_output(self) -> torch.Tensor:
        return self.batch.layer_output

    @property
    def layout(self) -> TokenLayout:
        return self.batch.layouts[0]

    @property
    def prompt_vision_count(self) -> int:
        return self.batch.prompt_vision_counts[0]

    def attention(self, queries: str = TEXT_QUERIES) -> torch.Tensor:
        return self.batch.attention(queries)[0]

    def memo(self, key, make):
        """`LayerContext.memo` for this prompt at this layer."""
        return self.batch.memo(key, make)

    @property
    def vision_hidden(self) -> torch.Tensor:
        """The layer's output hidden states of the current vision tokens, [vision, hidden]."""
        return self.batch.layer_output[0, self.layout.vision_start : self.layout.text_start]

    def prompt_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's input embeddings as the decoder received them, before any drop: its vision tokens
        [prompt vision count, hidden] and every token after them [text, hidden] (only vision tokens are ever
        dropped, so the text is the current layout's text)."""
        start, vision = self.layout.vision_start, self.prompt_vision_count
        text_end = self.layout.seq_len - self.layout.vision_count + vision
        embeds = self.batch.inputs_embeds[0]
        return embeds[start : start + vision], embeds[start + vision : text_end]


def last_token_scores(context: LayerContext) -> torch.Tensor:
    """Head-averaged attention [N, V] of each prompt's last token on its vision tokens (zero past them)."""
    return context.attention(LAST_QUERY)[:, 0]


@planned
def options_at_count(options, vision_count: int):
    """`options` with the budget their `keep_fraction` gives an image of `vision_count` vision tokens in its
    place (`fraction_budget`), so that the method runs as it does with that budget; planned once per count."""
    return replace(options, budget=fraction_budget(options.keep_fraction, vision_count), keep_fraction=None)


def positions_to_mask(kept: list[torch.Tensor], width: int, device) -> torch.Tensor:
    """Per-prompt kept vision positions as one boolean mask [N, width]."""
    mask = torch.zeros(len(kept), width, dtype=torch.bool, device=device)
    for n, positions in enumerate(kept):
        mask[n, positions.to(device)] = True
    return mask


class DropMethod:
    """The unpruned model. Subclasses override the stages they change."""

    name: ClassVar[str] = "none"
    family: ClassVar[str] = UNPRUNED
    compact_positions: bool = True  # give the shorter sequence positions 0..len-1 (the reference's rule)
    supports_next: ClassVar[bool] = False  # its vision stage takes LLaVA-NeXT's base image + crops
    own_count: ClassVar[bool] = False  # picks its own token count per image and refuses a budget
    options_class: ClassVar[type | None] = None  # the frozen dataclass of the method's options (none: no options)

    def __init__(self, options=None):
        """The method with `options` (an `options_class` instance), or with that class's defaults."""
        self.options = options or (self.options_class() if self.options_class is not None else None)

    @property
    def keep_fraction(self) -> float | None:
        """The share of each image's vision tokens asked for (`--keep`), or None."""
        return getattr(self.options, "keep_fraction", None)

    def prompt_options(self, vision_count: int):
        """The options one prompt runs with, its image bringing `vision_count` vision tokens into the method:
        the options as given, or under `keep_fraction` the budget that fraction gives this image in its place.
        Each method converts where it reads its budget, per prompt, because the count depends on the image
        (LLaVA-NeXT's crops) while the method object serves every prompt."""
        if self.keep_fraction is None:
            return self.options
        return options_at_count(self.options, vision_count)

    def asked(self, outputs: list[VisionOutput]) -> list[VisionOutput]:
        """`outputs` with the keep fraction asked for in their statistics (every answer reports it)."""
        if self.keep_fraction is not None:
            for output in outputs:
                output.stats["keep_fraction"] = self.keep_fraction
        return outputs

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
            return self.asked([self.encode_next(model, pixels, sizes) if is_next(model)
                               else self.encode_image(model, pixels) for pixels, sizes in zip(pixel_values, image_sizes)])
        return self.asked(encode_images_together(model, pixel_values, image_sizes))

    @property
    def has_own_vision_stage(self) -> bool:
        own = type(self)
        return own.encode_image is not DropMethod.encode_image or own.encode_next is not DropMethod.encode_next

    def prefill_layers(self, geometry: ModelGeometry) -> tuple[int, ...]:
        """Decoder layers after which `select` is called, in a model of this geometry."""
        return ()

    def select(self, context: LayerContext) -> torch.Tensor:
        """The vision tokens each prompt keeps after `context.layer_idx`: a boolean mask [N, V] within
        `context.vision_valid`. By default every prompt alone through `select_prompt`."""
        return positions_to_mask([self.select_prompt(context.row(n)) for n in range(len(context.layouts))],
                                 context.vision_valid.shape[1], context.vision_valid.device)

    def select_prompt(self, context: PromptContext) -> torch.Tensor:
        """Vision positions (ascending) one prompt keeps, for methods that select a prompt at a time."""
        return torch.arange(context.layout.vision_count, device=context.layer_output.device)

    def recycle(self, context: PromptContext, kept: torch.Tensor) -> torch.Tensor | None:
        """One prompt's extra hidden states [n, hidden] placed right after the kept vision tokens, counted as vision
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
        if geometry.family == QWEN_FAMILY and self.enabled and not self.runs_on_qwen:
            raise ValueError(self.qwen_refusal())
        layers = self.prefill_layers(geometry)
        if layers and max(layers) >= geometry.decoder_layers:
            raise ValueError(f"dropping after layer {max(layers)} (0-based) is impossible in a model "
                             f"with {geometry.decoder_layers} decoder layers; use layers 0..{geometry.decoder_layers - 1}")
        budget = getattr(getattr(self, "options", None), "budget", None)
        if budget is not None and budget > geometry.max_vision_tokens:
            raise ValueError(f"budget {budget:g} exceeds the {geometry.max_vision_tokens} vision tokens "
                             "this model gives an image at most")
        if self.keep_fraction is not None:
            self.check_fraction_budget(geometry)

    def check_fraction_budget(self, geometry: ModelGeometry) -> None:
        """Under `keep_fraction`, every budget check of the method, on the budget the fraction gives the
        largest image (on LLaVA-1.5 every image: all bring the same count). The floors the checks test scale
        with an image's count, so a fraction that reaches the largest image reaches the others too, give or
        take the rounding of one token (a prompt it misses is refused when it arrives)."""
        largest = geometry.max_vision_tokens
        options = self.prompt_options(largest)
        try:
            type(self)(options).check_model(geometry)
        except ValueError as error:
            raise ValueError(f"keep_fraction {self.keep_fraction:g} gives an image of {largest} vision tokens "
                             f"(the most this model gives one) a budget of {options.budget:g}: {error}") from None

    @property
    def enabled(self) -> bool:
        return type(self) is not DropMethod

    @property
    def runs_on_qwen(self) -> bool:
        """Whether this method runs on Qwen2-VL / Qwen2.5-VL: a method that only drops in the decoder does; a
        vision stage needs a port of its own, since Qwen's tower has no CLS token, sees each image at its own
        resolution and merges 2 x 2 patches into one decoder token."""
        return not self.has_own_vision_stage

    def qwen_refusal(self) -> str:
        return (f"{self.name} changes the vision tower's tokens with rules written for CLIP (a CLS token, a square "
                "grid of patches), which Qwen2-VL / Qwen2.5-VL's tower does not have, and has no Qwen port yet; it "
                f"does not run on Qwen. Methods that do: {QWEN_RUNNING_METHODS}")


class PromptsTogether:
    """A vision stage written once, for several prompts (`encode_prompts`): the engine's batch goes through it
    whole, and one prompt (`encode_image`, `encode_next`) is a batch of one. Listed before DropMethod."""

    def encode_prompts(self, model, pixel_values: list[torch.Tensor], image_sizes: list[torch.Tensor | None],
                       tiled: bool) -> list[VisionOutput]:
        """Every prompt's vision tokens: its image, or (`tiled`, LLaVA-NeXT) its base image and crops."""
        raise NotImplementedError

    def encode_images(self, model, pixel_values: list[torch.Tensor],
                      image_sizes: list[torch.Tensor | None]) -> list[VisionOutput]:
        return self.asked(self.encode_prompts(model, pixel_values, image_sizes, is_next(model)))

    def encode_image(self, model, pixel_values: torch.Tensor) -> VisionOutput:
        return self.encode_prompts(model, [pixel_values], [None], tiled=False)[0]

    def encode_next(self, model, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> VisionOutput:
        return self.encode_prompts(model, [pixel_values], [image_sizes], tiled=True)[0]
