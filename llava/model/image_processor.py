"""Loading the CLIP image processor that LLaVA-1.5's vision tower expects (and LLaVA-NeXT's anyres one).

We always use transformers' PIL-based processors: LLaVA-1.5 is evaluated on the pixels of the PIL
("slow") processor (docs/algorithm.md, "Evaluation conventions"), and the torchvision-based fast one
cannot be imported beside our torch build. A transformers-layout LLaVA-NeXT checkpoint gets
`LlavaNextImageProcessorPil`, which tiles each image into crops on the checkpoint's grid pinpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers.image_utils import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PILImageResampling,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
PROCESSOR_CONFIG_NAME = "processor_config.json"  # transformers 5 nests the image processor here
LLAVA_1_5_IMAGE_SIZE = 336
CLIP_SETTINGS = ("size", "crop_size", "resample", "image_mean", "image_std", "rescale_factor", "do_resize",
                 "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb")


def load_image_processor(path: str | Path) -> CLIPImageProcessorPil:
    """Load the processor from a CLIP tower directory or an llava-hf checkpoint directory.

    Hub checkpoints ship `preprocessor_config.json`; transformers 5's `save_pretrained` of a
    processor writes the same settings under "image_processor" in `processor_config.json`.
    """
    return load_processor_class(CLIPImageProcessorPil, path)


def load_next_image_processor(path: str | Path) -> LlavaNextImageProcessorPil:
    """Load the anyres processor of a transformers-layout LLaVA-NeXT checkpoint (same files as above)."""
    return load_processor_class(LlavaNextImageProcessorPil, path)


def load_processor_class(processor_class, path: str | Path):
    """Build `processor_class` from whichever of the two settings files the directory holds."""
    directory = Path(path)
    if (directory / PREPROCESSOR_CONFIG_NAME).is_file():
        return processor_class.from_pretrained(directory)
    nested_file = directory / PROCESSOR_CONFIG_NAME
    if nested_file.is_file():
        nested = json.loads(nested_file.read_text()).get("image_processor")
        if nested:
            return processor_class.from_dict(nested)
    raise FileNotFoundError(
        f"no image processor settings in {directory}: expected {PREPROCESSOR_CONFIG_NAME} "
        f"(or an image_processor entry in {PROCESSOR_CONFIG_NAME})"
    )


def next_image_processor_from_clip(
    clip_processor: CLIPImageProcessorPil, grid_pinpoints: list[list[int]]
) -> LlavaNextImageProcessorPil:
    """The anyres processor of a NeXT checkpoint: its tower's CLIP settings plus the grid pinpoints."""
    settings = {key: getattr(clip_processor, key) for key in CLIP_SETTINGS}
    return LlavaNextImageProcessorPil(
        **settings, image_grid_pinpoints=[list(pair) for pair in grid_pinpoints], do_pad=True
    )


def default_clip_image_processor(image_size: int = LLAVA_1_5_IMAGE_SIZE) -> CLIPImageProcessorPil:
    """Build OpenAI CLIP's preprocessing in code, for writing test checkpoints without a download."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
    )
