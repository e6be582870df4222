"""Random LLaVA-1.5 and LLaVA-NeXT models: LLaVA-1.5's depths, image and vocabulary layout at the widths
of a `ModelShape`, as a transformers config and model, or as the tensors of LLaVA's original file layout.

The tiny checkpoints (`llava.model.tiny`: files in LLaVA's layouts, with a trained tokenizer) and the
benchmarks' models (`llava.bench.workload`: built in memory at real or proportioned widths;
`llava.bench.load_memory`: a 7B checkpoint on disk) take their shapes from here, and their weights from
`llava.model.random_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llava.model.anyres import ANYRES_ASPECT_RATIO
from llava.model.random_weights import PeakedInit, init_peaked

if TYPE_CHECKING:  # transformers is imported lazily: it is slow to import, and the tiny checkpoints need only shapes
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

# LLaVA-1.5's geometry, the same at every width: CLIP ViT-L/14-336's depth and image, Vicuna-7B's depth.
IMAGE_SIZE = 336
PATCH_SIZE = 14
VISION_LAYERS = 24
LLM_LAYERS = 32
VISION_ACT = "quick_gelu"
VISION_LAYER_NORM_EPS = 1e-5
VISION_FEATURE_LAYER = -2  # LLaVA-1.5 and v1.6 take the penultimate CLIP layer
VISION_SELECT_STRATEGY = "default"  # transformers' name for dropping CLS (LLaVA's "patch")
PROJECTOR_TYPE = "mlp2x_gelu"
# Llama's SentencePiece vocabulary: <unk> (LLaVA's padding), <s>, </s>, 256 byte pieces, then word pieces.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
NUM_BYTE_PIECES = 256
FIRST_WORD_ID = EOS_ID + 1 + NUM_BYTE_PIECES
VOCAB_SIZE = 32000  # LLaVA-1.5's (the tiny checkpoints train a smaller vocabulary)
MAX_POSITIONS = 4096  # v1.6's context, for both models (NeXT's 2928 vision tokens need it)
# LLaVA-NeXT (v1.6): its real grid pinpoints, in transformers' [height, width] order.
NEXT_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
NEXT_MERGE_TYPE = "spatial_unpad"


@dataclass(frozen=True)
class ModelShape:
    """Widths of a random LLaVA; its layer counts and token counts are always LLaVA-1.5's."""

    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    llm_hidden: int
    llm_intermediate: int
    llm_heads: int
    llm_kv_heads: int

    @property
    def llm_head_dim(self) -> int:
        return self.llm_hidden // self.llm_heads

    def describe(self) -> str:
        return (f"CLIP {VISION_LAYERS} layers x {self.vision_hidden} wide ({self.vision_heads} heads, "
                f"MLP {self.vision_intermediate}), {IMAGE_SIZE} px / patch {PATCH_SIZE}; {PROJECTOR_TYPE} projector; "
                f"Llama {LLM_LAYERS} layers x {self.llm_hidden} wide ({self.llm_heads} heads, "
                f"{self.llm_kv_heads} KV heads, MLP {self.llm_intermediate}), vocab {VOCAB_SIZE}")

    def clip_vision_settings(self) -> dict:
        """`CLIPVisionConfig`'s arguments for the tower at these widths."""
        return {"num_hidden_layers": VISION_LAYERS, "hidden_size": self.vision_hidden,
                "intermediate_size": self.vision_intermediate, "num_attention_heads": self.vision_heads,
                "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "hidden_act": VISION_ACT,
                "layer_norm_eps": VISION_LAYER_NORM_EPS}

    def llama_settings(self) -> dict:
        """`LlamaConfig`'s widths and depth, under the keys (and in the order) LLaVA's config.json has them."""
        return {"hidden_size": self.llm_hidden, "intermediate_size": self.llm_intermediate,
                "num_attention_heads": self.llm_heads, "num_key_value_heads": self.llm_kv_heads,
                "num_hidden_layers": LLM_LAYERS}


def original_llm_shapes(shape: ModelShape, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """The language model's and projector's tensors in LLaVA's original layout (`model.mm_projector.*`),
    in the order LLaVA saves them: embeddings, decoder layers, final norm, projector, output rows."""
    hidden, heads_width = shape.llm_hidden, shape.llm_heads * shape.llm_head_dim
    kv_width = shape.llm_kv_heads * shape.llm_head_dim
    shapes = {"model.embed_tokens.weight": (vocab_size, hidden)}
    for layer in range(LLM_LAYERS):
        prefix = f"model.layers.{layer}."
        shapes.update({
            prefix + "self_attn.q_proj.weight": (heads_width, hidden),
            prefix + "self_attn.k_proj.weight": (kv_width, hidden),
            prefix + "self_attn.v_proj.weight": (kv_width, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, heads_width),
            prefix + "mlp.gate_proj.weight": (shape.llm_intermediate, hidden),
            prefix + "mlp.up_proj.weight": (shape.llm_intermediate, hidden),
            prefix + "mlp.down_proj.weight": (hidden, shape.llm_intermediate),
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes.update({  # mlp2x_gelu: Linear(vision hidden, hidden) -> GELU -> Linear(hidden, hidden)
        "model.mm_projector.0.weight": (hidden, shape.vision_hidden),
        "model.mm_projector.0.bias": (hidden,),
        "model.mm_projector.2.weight": (hidden, hidden),
        "model.mm_projector.2.bias": (hidden,),
    })
    shapes["lm_head.weight"] = (vocab_size, hidden)
    return shapes


def transformers_config(shape: ModelShape, next_model: bool = False) -> LlavaConfig | LlavaNextConfig:
    """LLaVA-1.5's transformers config at `shape`, or LLaVA-NeXT's (v1.6: anyres grid pinpoints, spatial_unpad)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(**shape.clip_vision_settings())
    text = LlamaConfig(**shape.llama_settings(), vocab_size=VOCAB_SIZE, max_position_embeddings=MAX_POSITIONS)
    shared = dict(vision_config=vision, text_config=text, vision_feature_layer=VISION_FEATURE_LAYER,
                  vision_feature_select_strategy=VISION_SELECT_STRATEGY, projector_hidden_act="gelu",
                  image_token_id=VOCAB_SIZE)
    if not next_model:
        return LlavaConfig(**shared)
    config = LlavaNextConfig(**shared, image_grid_pinpoints=NEXT_GRID_PINPOINTS,
                             image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2)
    config.image_aspect_ratio = ANYRES_ASPECT_RATIO  # what `image_inputs` tiles by, as for an original checkpoint
    config.mm_patch_merge_type = NEXT_MERGE_TYPE
    return config


def layer_count(name: str) -> int:
    """How many layers the stack holding parameter `name` has: CLIP's for the tower, Llama's elsewhere."""
    return VISION_LAYERS if "vision_tower" in name else LLM_LAYERS


def random_llava(shape: ModelShape, init: PeakedInit, seed: int, device: str, dtype: torch.dtype,
                 next_model: bool = False) -> LlavaForConditionalGeneration | LlavaNextForConditionalGeneration:
    """A LLaVA-1.5 (or NeXT) transformers model at `shape` with weights drawn by `init` from `seed`.

    Built and initialised on `device` in `dtype`, so that the 7B shape never needs an fp32 copy in CPU
    memory; the same seed gives the same weights on the same kind of device.
    """
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    model_class = LlavaNextForConditionalGeneration if next_model else LlavaForConditionalGeneration
    config = transformers_config(shape, next_model)
    with torch.device(device):
        model = model_class._from_config(config, attn_implementation="sdpa", dtype=dtype)
    init_peaked(model, torch.Generator(device=device).manual_seed(seed), init, layer_count)
    return model.eval()

