"""The few numbers of a model that dropping settings depend on, read once from its configuration.

Decoder depth, vision tokens per image and context length decide whether a setting can work at all
(a drop layer beyond the last layer, a budget below what the first layers alone average, a prompt
longer than the context). Reading them from config.json lets the CLIs refuse such settings before
the weights load; the engine reads the same numbers from a loaded model. LLaVA-NeXT configs (either
layout) also say how many crops one image can be tiled into.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, LlavaConfig, LlavaNextConfig

from llava.model.builder import is_next_hf_config, read_config, resolve_model_dir
from llava.model.checkpoint_files import config_field_errors
from llava.model.original_layout import (
    build_llava_config,
    build_llava_next_config,
    is_next_config,
    is_original_layout,
)
from llava.model.qwen import QWEN_MODEL_TYPES, is_qwen_config, load_qwen_image_processor
from llava.model.vision_tower import resolve_vision_tower

FULL_FEATURES = "full"  # vision_feature_select_strategy that keeps CLIP's CLS token
LLAVA_FAMILY = "llava"
QWEN_FAMILY = "qwen"
DEFAULT_QWEN_MAX_PIXELS = 28 * 28 * 1280  # transformers' Qwen image processor default (1280 tokens)


@dataclass(frozen=True)
class ModelGeometry:
    decoder_layers: int
    vision_tokens: int  # per image, as the vision tower hands them to the projector
    patch_tokens: int  # the square grid of patches among them (no CLS)
    context_length: int  # positions the decoder was trained for (max_position_embeddings)
    max_crops: int = 0  # most grid crops one image can be tiled into (LLaVA-NeXT); 0 without tiling
    max_vision_tokens: int = 0  # most vision tokens one image can bring (see `most_vision_tokens`)
    family: str = LLAVA_FAMILY  # QWEN_FAMILY: images at their own resolution, 3-D positions, no CLS token

    def __post_init__(self):
        if not self.max_vision_tokens:
            object.__setattr__(self, "max_vision_tokens", self.vision_tokens)


def geometry_of_config(config: LlavaConfig | LlavaNextConfig) -> ModelGeometry:
    """The geometry of a transformers Llava/LlavaNext config (what a loaded model carries as `model.config`)."""
    if getattr(config, "model_type", None) in QWEN_MODEL_TYPES:
        return qwen_geometry(config, getattr(config, "max_pixels", None))
    vision = config.vision_config
    patch_tokens = (vision.image_size // vision.patch_size) ** 2
    with_cls = config.vision_feature_select_strategy == FULL_FEATURES
    return ModelGeometry(
        decoder_layers=config.text_config.num_hidden_layers,
        vision_tokens=patch_tokens + int(with_cls),
        patch_tokens=patch_tokens,
        context_length=config.text_config.max_position_embeddings,
        max_crops=max_crops(config),
        max_vision_tokens=most_vision_tokens(config, patch_tokens + int(with_cls)),
    )


def most_vision_tokens(config: LlavaConfig | LlavaNextConfig, per_image: int) -> int:
    """An upper bound on one image's vision tokens, for budget checks made before any image is seen:
    `per_image` for LLaVA-1.5; for LLaVA-NeXT the base image plus the largest crop grid, with one newline
    token per grid row in either orientation (spatial_unpad only removes tokens; flat adds no newlines)."""
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    if not pinpoints:
        return per_image
    side = config.vision_config.image_size
    grid_side = side // config.vision_config.patch_size
    return max((1 + (first // side) * (second // side)) * per_image + max(first, second) // side * grid_side
               for first, second in pinpoints)


def qwen_geometry(config, max_pixels: int | None) -> ModelGeometry:
    """Qwen2-VL / Qwen2.5-VL: an image brings as many tokens as its resolution gives, at most `max_pixels`
    (the image processor's limit; the loader records it on the config) over one merged token's 28 x 28 px."""
    vision = config.vision_config
    token_side = vision.patch_size * vision.spatial_merge_size
    most = (max_pixels or DEFAULT_QWEN_MAX_PIXELS) // token_side**2
    return ModelGeometry(decoder_layers=config.text_config.num_hidden_layers, vision_tokens=most, patch_tokens=most,
                         context_length=config.text_config.max_position_embeddings, max_vision_tokens=most,
                         family=QWEN_FAMILY)


def max_crops(config: LlavaConfig | LlavaNextConfig) -> int:
    """Crops of the largest grid pinpoint: each crop is one tower image (`image_size` square)."""
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    if not pinpoints:
        return 0
    side = config.vision_config.image_size
    return max((first // side) * (second // side) for first, second in pinpoints)


def geometry_of_model(model) -> ModelGeometry:
    return geometry_of_config(model.config)


def decoder_layer_count(model) -> int:
    """Decoder layers of a loaded model, as the engine runs them."""
    return len(model.model.language_model.layers)


def read_geometry(model_path: str, vision_tower: str | None = None, max_pixels: int | None = None) -> ModelGeometry:
    """The geometry of a checkpoint in either layout, from its config files alone (no weights read).

    Raises `CheckpointError` with the loader's own message when the checkpoint or its tower is missing.
    """
    model_dir: Path = resolve_model_dir(model_path)
    raw_config = read_config(model_dir)
    with config_field_errors(model_dir / "config.json"):
        if is_original_layout(raw_config):
            tower_dir = resolve_vision_tower(raw_config["mm_vision_tower"], model_dir, vision_tower)
            build = build_llava_next_config if is_next_config(raw_config) else build_llava_config
            return geometry_of_config(build(raw_config, tower_dir))
        if is_qwen_config(raw_config):
            config = AutoConfig.from_pretrained(model_dir)
            return qwen_geometry(config, load_qwen_image_processor(model_dir, max_pixels=max_pixels).size["longest_edge"])
        config_class = LlavaNextConfig if is_next_hf_config(raw_config) else LlavaConfig
        return geometry_of_config(config_class.from_pretrained(model_dir))
