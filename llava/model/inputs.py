"""One question (text + optional image) as the model's inputs, with LLaVA's prompt and image rules
(LLaVA-1.5: one padded square image; LLaVA-NeXT: the base image and its anyres crops, with the image size).

Answering, calibration, the stage pictures and the speed benchmarks all encode through `encode_question`,
so that a prompt and its pixels are built the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from llava.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
)
from llava.conversation import get_conv_template
from llava.mm_utils import PAD_ASPECT_RATIO, process_images, tokenizer_image_token
from llava.model.anyres import ANYRES_ASPECT_RATIO
from llava.model.original_layout import swap_pairs
from llava.model.qwen import QWEN_MODEL_TYPES, VISION_END, VISION_START, qwen_image_inputs


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [1, L], IMAGE_TOKEN_INDEX where the image goes
    pixel_values: torch.Tensor | None  # [1, 3, H, W] (NeXT: [1, 1 + crops, 3, H, W]; Qwen: [patches, values])
    prompt: str  # the full templated prompt, as the model sees it
    stop_str: str  # the string that ends the answer in this template
    image_sizes: torch.Tensor | None = None  # NeXT: [[height, width]] of the original image; Qwen: [[t, h, w]] patches


def image_placeholder(model_config=None) -> str:
    """What stands for the image in a user turn: `<image>`, wrapped in `<im_start>`/`<im_end>` when the
    model config's `mm_use_im_start_end` says so, or in Qwen's vision start and end tokens."""
    if getattr(model_config, "model_type", None) in QWEN_MODEL_TYPES:
        return VISION_START + DEFAULT_IMAGE_TOKEN + VISION_END
    if getattr(model_config, "mm_use_im_start_end", False):
        return DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    return DEFAULT_IMAGE_TOKEN


def with_image(message: str, model_config=None) -> str:
    """A user message with the image before it: on its own line, as LLaVA's CLIs put it; right before the
    text in Qwen's chat template."""
    separator = "" if getattr(model_config, "model_type", None) in QWEN_MODEL_TYPES else "\n"
    return image_placeholder(model_config) + separator + message


def templated_prompt(question: str, conv_mode: str, image_given: bool, model_config=None) -> tuple[str, str]:
    """The conversation template's prompt for one user turn, and the template's stop string.

    With an image, its placeholder goes on its own line before the question, as LLaVA's CLIs put it.
    """
    if image_given:
        question = with_image(question, model_config)
    conversation = get_conv_template(conv_mode)
    conversation.append_message(conversation.roles[0], question)
    conversation.append_message(conversation.roles[1], None)
    return conversation.get_prompt(), conversation.stop_str


def encode_question(question: str, image: Image.Image | None, model, tokenizer, image_processor,
                    conv_mode: str) -> ModelInputs:
    """Token ids and pixel values for one question, following the model config's
    `mm_use_im_start_end` and `image_aspect_ratio` (LLaVA-1.5: no im_start/end, pad to square)."""
    prompt, stop_str = templated_prompt(question, conv_mode, image is not None, model.config)
    return encode_prompt(prompt, stop_str, image, model, tokenizer, image_processor)


def encode_prompt(prompt: str, stop_str: str, image: Image.Image | None, model, tokenizer,
                  image_processor) -> ModelInputs:
    """Token ids and pixel values for an already templated prompt (a whole chat, say) holding the image's
    placeholder once, or not at all without an image."""
    input_ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")
    if image is None:
        return ModelInputs(input_ids, None, prompt, stop_str)
    pixel_values, image_sizes = image_inputs(image, model.config, image_processor)
    return ModelInputs(input_ids, pixel_values, prompt, stop_str, image_sizes)


def image_inputs(image: Image.Image, config, image_processor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pixel values (and, for LLaVA-NeXT, the image size) as the checkpoint's own code prepares them:
    an original NeXT checkpoint tiles with LLaVA's anyres rules (its processor is CLIP's), a
    transformers one with its own LLaVA-NeXT image processor, which knows the grid pinpoints."""
    if getattr(config, "model_type", None) in QWEN_MODEL_TYPES:
        return qwen_image_inputs(image, image_processor)
    aspect_ratio = getattr(config, "image_aspect_ratio", PAD_ASPECT_RATIO)
    if aspect_ratio != ANYRES_ASPECT_RATIO:
        return process_images([image], image_processor, aspect_ratio), None
    if hasattr(image_processor, "image_grid_pinpoints"):
        processed = image_processor([image], return_tensors="pt")
        return processed["pixel_values"], processed["image_sizes"]
    pinpoints = swap_pairs(config.image_grid_pinpoints)  # LLaVA's [width, height] order
    pixel_values = process_images([image], image_processor, ANYRES_ASPECT_RATIO, pinpoints)
    return pixel_values, torch.tensor([[image.height, image.width]])
