"""The speed benchmarks' Qwen2.5-VL: a seeded random model at Qwen2.5-VL-7B's layer counts (28 decoder
layers, a 32-block vision tower with window attention; 4 blocks at the quick shape) and chosen widths, and
a 1024 x 768 image seen at its own resolution (999 vision tokens; the 7B checkpoint's pixel limit leaves
it as it is), prompted as the CLIs prompt it.

`7b` is Qwen2.5-VL-7B's real widths (for a GPU), `7b-proportioned` every width divided by 4 (head sizes
kept), so that the vision:decoder cost split of the real model holds on a CPU; `quick` is for CI.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from llava.bench.workload import Workload, first_demo_image, synthetic_text_ids
from llava.constants import IMAGE_TOKEN_INDEX
from llava.model.qwen import qwen_image_inputs
from llava.model.random_llava import ModelShape
from llava.model.random_weights import BENCHMARK_INIT, init_peaked

VOCAB_SIZE = 152064
DECODER_LAYERS = 28
VISION_BLOCKS = 32
FULL_ATTENTION_EVERY = 8  # blocks 7, 15, 23, 31 attend globally, the others within windows
MAX_POSITIONS = 128000
MROPE_SECTION = [16, 24, 24]  # over a head size of 128
# Residual writes in the tower and the decoder are damped as for LLaVA-1.5's 32 layers (the decoder has 28):
# the weights the recorded timings were measured on.
RESIDUAL_DEPTH = 32
IMAGE_SIZE = (1024, 768)  # (width, height): 37 x 27 tokens of 28 px at the 7B checkpoint's limit
QUICK_IMAGE_SIZE = (448, 336)  # the quick shape's (CI): 16 x 12 tokens
MIN_PIXELS = 3136  # Qwen2.5-VL-7B-Instruct's preprocessor_config.json (its max_pixels, 12845056, leaves
# 1024 x 768 px as it is); the model's max_pixels is the image's own, so that budgets and their floors are
# checked against this image rather than against the 16,384 tokens the largest image could bring
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
SYSTEM_TOKENS = 20  # "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
TEXT_TOKENS = 40  # "<|vision_end|>" + a TextVQA question with its suffix + the assistant turn's opening


@dataclass(frozen=True)
class QwenShape(ModelShape):
    """The LLaVA shapes' widths, and how many blocks the vision tower has."""

    vision_blocks: int = VISION_BLOCKS

    @property
    def full_attention_blocks(self) -> list[int]:
        return list(range(FULL_ATTENTION_EVERY - 1, self.vision_blocks, FULL_ATTENTION_EVERY)) or [self.vision_blocks - 1]

    def describe(self) -> str:
        return (f"vision tower {self.vision_blocks} blocks x {self.vision_hidden} wide ({self.vision_heads} heads, MLP "
                f"{self.vision_intermediate}, window attention but blocks {self.full_attention_blocks}), 2 x 2 patch merger; "
                f"decoder {DECODER_LAYERS} layers x {self.llm_hidden} wide ({self.llm_heads} heads, {self.llm_kv_heads} "
                f"KV heads, MLP {self.llm_intermediate}), vocab {VOCAB_SIZE}")


QWEN_SHAPES = {
    "quick": QwenShape(64, 128, 1, 128, 344, 1, 1, vision_blocks=4),  # CI: a short tower (its window loop is slow)
    "7b-proportioned": QwenShape(320, 856, 4, 896, 4736, 7, 1),
    "7b": QwenShape(1280, 3420, 16, 3584, 18944, 28, 4),
}


def qwen_config(shape: QwenShape) -> Qwen2_5_VLConfig:
    text = {"vocab_size": VOCAB_SIZE, "hidden_size": shape.llm_hidden, "intermediate_size": shape.llm_intermediate,
            "num_hidden_layers": DECODER_LAYERS, "num_attention_heads": shape.llm_heads,
            "num_key_value_heads": shape.llm_kv_heads, "max_position_embeddings": MAX_POSITIONS,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": MROPE_SECTION}}
    vision = {"depth": shape.vision_blocks, "hidden_size": shape.vision_hidden,
              "intermediate_size": shape.vision_intermediate, "num_heads": shape.vision_heads,
              "out_hidden_size": shape.llm_hidden, "fullatt_block_indexes": shape.full_attention_blocks}
    if shape.llm_head_dim != sum(MROPE_SECTION) * 2:
        raise ValueError(f"shape's decoder head size {shape.llm_head_dim} does not fit M-RoPE sections {MROPE_SECTION}")
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=VOCAB_SIZE - 1)


def random_qwen(shape: QwenShape, seed: int, device: str, dtype: torch.dtype,
                max_pixels: int) -> Qwen2_5_VLForConditionalGeneration:
    """Seeded weights by the LLaVA benchmarks' `BENCHMARK_INIT` (peaked attention), built where it runs."""
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(qwen_config(shape), attn_implementation="sdpa",
                                                               dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    init_peaked(model, gen, BENCHMARK_INIT, depth_of=lambda name: RESIDUAL_DEPTH)
    model.config.max_pixels = max_pixels
    return model.eval()


def qwen_image_processor(max_pixels: int) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=max_pixels, image_mean=IMAGE_MEAN,
                                    image_std=IMAGE_STD)


def resized_pixels(width: int, height: int) -> int:
    """The pixels Qwen's image processor resizes an image of this size to when nothing limits it."""
    height, width = smart_resize(height, width, factor=28, min_pixels=MIN_PIXELS, max_pixels=width * height * 4)
    return height * width


def qwen_workload(shape_name: str, seed: int, device: str, dtype: torch.dtype) -> Workload:
    """The random Qwen2.5-VL at `shape_name` and one prompt about the first demo image resized to 1024 x 768
    (448 x 336 at the quick shape, which CI runs on two cores)."""
    shape = QWEN_SHAPES[shape_name]
    size = QUICK_IMAGE_SIZE if shape_name == "quick" else IMAGE_SIZE
    max_pixels = resized_pixels(*size)
    model = random_qwen(shape, seed, device, dtype, max_pixels)
    image = first_demo_image().resize(size)
    pixel_values, grid = qwen_image_inputs(image, qwen_image_processor(max_pixels))
    system, text = synthetic_text_ids(seed, VOCAB_SIZE - 1, (SYSTEM_TOKENS, TEXT_TOKENS))
    input_ids = torch.cat([system, torch.tensor([IMAGE_TOKEN_INDEX]), text])[None]
    tokens = int(grid.prod()) // 4
    description = (f"random Qwen2.5-VL-shaped model, shape {shape_name!r} (seed {seed}): {shape.describe()}. Init: "
                   f"fan-in scaled normals, q/k gain {BENCHMARK_INIT.qk_gain}. Prompt: {SYSTEM_TOKENS} system ids + "
                   f"<image> + {TEXT_TOKENS} text ids; image: the first demo image resized to {size[0]} x {size[1]} "
                   f"px, patch grid {grid[0].tolist()} -> {tokens} vision tokens (max_pixels {max_pixels}: this image's)")
    return Workload(model, input_ids, pixel_values, description, grid)
