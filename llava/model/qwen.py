"""Qwen2.5-VL and Qwen2-VL: what differs from LLaVA, in one place.

- **Images at their own resolution.** The image processor resizes each image to a multiple of 28 px within
  the checkpoint's `min_pixels` / `max_pixels` and cuts it into 14 px patches (two frames per temporal
  patch); the vision tower merges 2 x 2 patches into one decoder token. An image of grid (t, h, w) patches
  gives t * h/2 * w/2 vision tokens. Its pixel values are [patches, channels * 2 * 14 * 14] and the grid
  [[t, h, w]] travels where LLaVA-NeXT's image size does (`image_sizes`).
- **3-D positions (M-RoPE).** Text tokens sit at one position on all three axes; a vision token sits at
  (start + t, start + row, start + column), and the text after an image continues at start + max(rows,
  columns). `vision_token_positions` gives a vision stage's tokens their (t, row, column) offsets with
  transformers' own `get_vision_position_ids`; `llava.drop.prefill` adds the start.
- **The prompt.** Qwen's chat format (the `qwen` conversation mode): a ChatML system turn, and the image as
  `<|vision_start|><image><|vision_end|>` in the user turn, where `<image>` is the one placeholder our engine
  splices the vision tokens into (the processor would repeat `<|image_pad|>` once per token instead).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

QWEN2_5_VL_MODEL_TYPE = "qwen2_5_vl"
QWEN2_VL_MODEL_TYPE = "qwen2_vl"
QWEN_MODEL_TYPES = (QWEN2_5_VL_MODEL_TYPE, QWEN2_VL_MODEL_TYPE)
QWEN_CONV_MODE = "qwen"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
POSITION_AXES = 3  # temporal, height, width


def is_qwen_config(raw_config: dict) -> bool:
    """A Qwen2.5-VL / Qwen2-VL `config.json` (transformers layout, as the hub ships them)."""
    return raw_config.get("model_type") in QWEN_MODEL_TYPES


def is_qwen(model) -> bool:
    return getattr(model.config, "model_type", None) in QWEN_MODEL_TYPES


def model_class_of(raw_config: dict):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    if raw_config["model_type"] == QWEN2_5_VL_MODEL_TYPE:
        return Qwen2_5_VLForConditionalGeneration
    return Qwen2VLForConditionalGeneration


def load_qwen_image_processor(model_dir: Path, min_pixels: int | None = None, max_pixels: int | None = None):
    """The checkpoint's image processor (transformers' PIL one: no torchvision needed), with `min_pixels` /
    `max_pixels` overriding the checkpoint's when given."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    overrides = {key: value for key, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels))
                 if value is not None}
    processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir, **overrides)
    low, high = processor.size["shortest_edge"], processor.size["longest_edge"]
    if low > high:
        raise ValueError(f"min_pixels {low} is above max_pixels {high}")
    return processor


def qwen_image_inputs(image: Image.Image, image_processor) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's patches [patches, channels * temporal * 14 * 14] and its grid [[t, h, w]]."""
    processed = image_processor(images=[image], return_tensors="pt")
    return processed["pixel_values"], processed["image_grid_thw"]


def merged_grid(model, grid: torch.Tensor) -> tuple[int, int, int]:
    """The decoder-token grid (t, rows, columns) of a patch grid [t, h, w] (or [[t, h, w]])."""
    merge = model.config.vision_config.spatial_merge_size
    t, h, w = (int(size) for size in grid.reshape(-1))
    return t, h // merge, w // merge


def vision_token_positions(model, grid: torch.Tensor) -> torch.Tensor:
    """[3, tokens] on the host: each vision token's (t, row, column) offset from the image's first position, in
    the order the tower emits them, as transformers' `get_rope_index` places them."""
    merge = model.config.vision_config.spatial_merge_size
    return model.model.get_vision_position_ids(0, grid.reshape(-1).cpu(), 1, merge, device="cpu")


def position_span(model, grid: torch.Tensor) -> int:
    """How far the text after an image moves on: max(rows, columns) of its decoder-token grid."""
    _, rows, columns = merged_grid(model, grid)
    return max(rows, columns)


def check_qwen_inputs(pixel_values: torch.Tensor, grid: torch.Tensor | None) -> None:
    """One image per prompt: its patches and its grid [[t, h, w]], whose product is the patch count."""
    if grid is None or grid.shape != (1, POSITION_AXES):
        raise ValueError(f"a Qwen2-VL / Qwen2.5-VL prompt takes one image with its grid [[t, h, w]]; got grid {grid}")
    if pixel_values.dim() != 2 or pixel_values.shape[0] != int(grid.prod()):
        raise ValueError(f"the image's grid {grid.tolist()} calls for {int(grid.prod())} patches, but its pixel "
                         f"values are {tuple(pixel_values.shape)}")
