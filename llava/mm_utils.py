"""Image loading, LLaVA's image preprocessing (1.5: pad to square; NeXT: anyres) and `<image>`-aware prompt tokenization."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase
from transformers.image_processing_utils import BaseImageProcessor

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.model.anyres import ANYRES_ASPECT_RATIO, process_anyres_batch

PIXEL_MAX = 255
HIGH_DEPTH_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")  # PIL's modes of more than 8 bits per pixel
PAD_ASPECT_RATIO = "pad"
SQUARE_ASPECT_RATIOS = ("square", None)  # no padding: the processor's resize + centre crop only


class ImageLoadError(ValueError):
    """An image file is missing or cannot be decoded; the message names the file."""


@contextmanager
def image_errors(name: str | Path | BinaryIO) -> Iterator[None]:
    """PIL's errors on opening or decoding image `name` as one ImageLoadError naming it."""
    try:
        yield
    except FileNotFoundError:
        raise ImageLoadError(f"image not found: {name}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageLoadError(f"cannot read image {name}: {error}") from None


def check_image_header(path: str | Path) -> None:
    """Open only the header of image `path` (cheap): it exists and PIL knows its format. Run over every
    question's image before the model loads, so that a missing file does not wait for a 7B load."""
    with image_errors(path), Image.open(path):
        pass


def load_image(path: str | Path | BinaryIO, name: str | None = None) -> Image.Image:
    """Open an image as RGB, decoding it now so a corrupt file fails here and not mid-batch. `path` may be
    an open binary file (a download), which error messages call `name`."""
    with image_errors(name or path), Image.open(path) as image:
        image.load()
        return as_rgb(image)


def as_rgb(image: Image.Image) -> Image.Image:
    """A decoded image as 8-bit RGB; one deeper than 8 bits is first scaled by its range (`to_8bit_by_range`)."""
    if image.mode in HIGH_DEPTH_MODES:
        image = to_8bit_by_range(image)
    return image.convert("RGB")


def to_8bit_by_range(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float single-channel image as 8-bit grey, its own lowest to highest
    value spread over 0..255: PIL's RGB conversion clips every value above 255, turning it white."""
    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    if high > low:
        values = (values - low) * (PIXEL_MAX / (high - low))
    grey = np.nan_to_num(values, nan=0.0, posinf=PIXEL_MAX, neginf=0.0).clip(0, PIXEL_MAX).round()
    return Image.fromarray(grey.astype(np.uint8))  # 2-D uint8: mode "L"


def expand2square(image: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    """Pad to a square of side max(w, h), image centred, so the CLIP centre crop keeps all of it."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background_color)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def mean_color(image_processor: BaseImageProcessor) -> tuple[int, ...]:
    """LLaVA-1.5's padding colour: the processor mean per channel, scaled to 0..255 and truncated."""
    return tuple(int(channel_mean * PIXEL_MAX) for channel_mean in image_processor.image_mean)


def process_images(
    images: Sequence[Image.Image],
    image_processor: BaseImageProcessor,
    image_aspect_ratio: str | None = PAD_ASPECT_RATIO,
    grid_pinpoints=None,
) -> torch.Tensor:
    """Preprocess RGB images the way LLaVA does for the checkpoint's `image_aspect_ratio`.

    'pad' (LLaVA-1.5) and 'square'/None give pixel values [N, 3, H, W]. 'anyres' (LLaVA-NeXT) gives
    [N, 1 + K, 3, H, W]: each image's base view and K crops, cut on the best of `grid_pinpoints`
    ([width, height] pairs). Images whose crop counts differ cannot share one tensor, so they are
    refused together and must be processed one call each.
    """
    if image_aspect_ratio == ANYRES_ASPECT_RATIO:
        return process_anyres_batch(images, image_processor, grid_pinpoints)
    if image_aspect_ratio == PAD_ASPECT_RATIO:
        background = mean_color(image_processor)
        images = [expand2square(image, background) for image in images]
    elif image_aspect_ratio not in SQUARE_ASPECT_RATIOS:
        raise ValueError(
            f"unsupported image_aspect_ratio {image_aspect_ratio!r}; "
            "expected 'pad', 'square', None or 'anyres'"
        )
    return image_processor(list(images), return_tensors="pt")["pixel_values"]


def tokenizer_image_token(
    prompt: str,
    tokenizer: PreTrainedTokenizerBase,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    return_tensors: str | None = None,
) -> list[int] | torch.Tensor:
    """Tokenize a prompt, putting `image_token_index` where each `<image>` placeholder stood.

    The placeholder is not a vocabulary token, so the text around it is tokenized piece by piece, as
    LLaVA does: every piece with the tokenizer's special tokens, and when the first piece starts with
    BOS, that BOS is dropped from the other pieces, so BOS appears once, at the start.
    With `return_tensors="pt"` the ids come back as a LongTensor of shape [1, L].
    """
    if return_tensors not in (None, "pt"):
        raise ValueError(f"unsupported return_tensors {return_tensors!r}; expected None or 'pt'")
    first, *rest = (list(tokenizer(chunk).input_ids) for chunk in prompt.split(DEFAULT_IMAGE_TOKEN))
    leading_bos = int(first[:1] == [tokenizer.bos_token_id])
    input_ids = first
    for chunk in rest:
        input_ids += [image_token_index, *chunk[leading_bos:]]
    if return_tensors == "pt":
        return torch.tensor([input_ids], dtype=torch.long)
    return input_ids
