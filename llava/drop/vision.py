"""Vision stage building blocks: run the CLIP tower layer by layer and project the selected features.

We drive the encoder layers ourselves (rather than calling the tower) so that a method can shorten the
sequence between layers and compute only the one attention row it needs, leaving every layer on its
fast attention kernel. `encode_image` is the unpruned path; methods build theirs from these helpers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llava.model.builder import NEXT_MODEL_TYPE
from llava.model.qwen import check_qwen_inputs, is_qwen, position_span, vision_token_positions

CLS_INDEX = 0
PATCHES_START = CLS_INDEX + 1
DROP_CLS_STRATEGY = "default"  # transformers' name for LLaVA's `select_feature = patch`


@dataclass
class VisionOutput:
    """Projected vision tokens for one image, plus what later stages need to know."""

    features: torch.Tensor  # [num_vision_tokens, llm_hidden]
    key_indices: torch.Tensor | None = None  # vision-token positions later stages must keep
    stats: dict = field(default_factory=dict)
    # Per vision token, the row-major grid patches it stands for (CLS: none), so a picture can map tokens
    # back to the image. None means token i is patch i (or, with fewer tokens, that the mapping is unknown).
    patch_groups: list[list[int]] | None = None
    # Time the method spent choosing and merging tokens in this stage (its share of `scoring_seconds`).
    selection_seconds: float = 0.0
    # Qwen's 3-D positions (llava/model/qwen.py): each token's (t, row, column) offset from the image's first
    # position [3, num_vision_tokens], on the host, and how far the text after the image moves on. None for LLaVA.
    positions: torch.Tensor | None = None
    position_span: int = 0


def selected_layer_count(num_layers: int, feature_layer: int) -> int:
    """How many encoder layers to run so that the last output is `hidden_states[feature_layer]`.

    `hidden_states[0]` is the embedding output and `hidden_states[i]` the output of layer i-1.
    """
    index = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 0 <= index <= num_layers:
        raise ValueError(f"vision_feature_layer {feature_layer} is out of range for a {num_layers}-layer tower")
    return index


@torch.no_grad()
def cls_attention_to_patches(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention of the CLS query to every patch key of `layer`, given its input.

    Only the CLS row is computed (one query against N keys), so the layer itself keeps its fast
    attention kernel. Returns float32 [N - 1]: the softmax runs over all N keys, CLS included.
    """
    if hidden.shape[0] != 1:
        raise ValueError(f"the key-set scoring supports batch size 1, got {hidden.shape[0]}")
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden[0])
    query = attention.q_proj(normed[CLS_INDEX]).view(attention.num_heads, attention.head_dim)
    keys = attention.k_proj(normed).view(-1, attention.num_heads, attention.head_dim)
    logits = torch.einsum("hd,nhd->hn", query.float(), keys.float()) * attention.scale
    return logits.softmax(dim=-1).mean(dim=0)[PATCHES_START:]


def embed_patches(tower: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """`hidden_states[0]` of the tower: patch + position embeddings after the pre-layer norm."""
    weight = tower.embeddings.patch_embedding.weight
    pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
    return tower.pre_layrnorm(tower.embeddings(pixel_values))


def run_tower_to(layers, hidden: torch.Tensor, start: int, wanted: set[int]) -> dict[int, torch.Tensor]:
    """Hidden states at each `wanted` index, running layers from `hidden = hidden_states[start]` on."""
    found = {start: hidden} if start in wanted else {}
    for index in range(start, max(wanted)):
        hidden = layers[index](hidden, None)
        if index + 1 in wanted:
            found[index + 1] = hidden
    return found


def project_features(model, hidden: torch.Tensor) -> torch.Tensor:
    """Drop CLS when LLaVA does, then project into the LLM's embedding space (one image)."""
    return project_batch(model, hidden)[0]


def project_batch(model, hidden: torch.Tensor) -> torch.Tensor:
    """`project_features` for each image of a batch: [B, tokens per image, llm_hidden]."""
    if model.config.vision_feature_select_strategy == DROP_CLS_STRATEGY:
        hidden = hidden[:, PATCHES_START:]
    return model.model.multi_modal_projector(hidden)


def vision_token_offset(config) -> int:
    """Where patch 0 sits among the vision tokens: after CLS when the select strategy keeps it."""
    return 0 if config.vision_feature_select_strategy == DROP_CLS_STRATEGY else PATCHES_START


def check_feature_layer(config) -> None:
    """We select one layer's hidden states; LLaVA variants that stack several are not handled."""
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError("multi-layer vision features are not supported")


@torch.no_grad()
def encode_image(model, pixel_values: torch.Tensor) -> VisionOutput:
    """LLaVA's features, bit-identical to transformers' `get_image_features` (no token dropped)."""
    return encode_llava_images(model, [pixel_values])[0]


def encode_llava_images(model, pixel_values: list[torch.Tensor]) -> list[VisionOutput]:
    """LLaVA-1.5's unpruned features of several prompts' images ([1, 3, H, W] each), in one tower pass."""
    check_feature_layer(model.config)
    tower = model.model.vision_tower
    selected = selected_layer_count(len(tower.encoder.layers), model.config.vision_feature_layer)
    hidden = run_tower_to(tower.encoder.layers, embed_patches(tower, torch.cat(pixel_values)), 0, {selected})[selected]
    outputs = []
    for features in project_batch(model, hidden):
        count = features.shape[0]
        outputs.append(VisionOutput(features=features, stats={"vision_tokens_in": count, "vision_tokens": count}))
    return outputs


def encode_images_together(model, pixel_values: list[torch.Tensor],
                           image_sizes: list[torch.Tensor | None]) -> list[VisionOutput]:
    """The unpruned vision stage of several prompts, all their images through the tower as one batch."""
    if is_next(model):
        return encode_next_images(model, pixel_values, image_sizes)
    if is_qwen(model):
        return encode_qwen_images(model, pixel_values, image_sizes)
    return encode_llava_images(model, pixel_values)


@torch.no_grad()
def encode_qwen_images(model, pixel_values: list[torch.Tensor], grids: list[torch.Tensor]) -> list[VisionOutput]:
    """Qwen2-VL / Qwen2.5-VL: every prompt's image ([patches, patch values] and its grid [[t, h, w]]) through
    the tower in one pass (transformers' `get_image_features`), each token with its 3-D position offset."""
    for pixels, grid in zip(pixel_values, grids):
        check_qwen_inputs(pixels, grid)
    device = model.model.visual.patch_embed.proj.weight.device
    features = model.model.get_image_features(torch.cat(pixel_values).to(device), torch.cat(grids).to(device)).pooler_output
    outputs = []
    for image_features, grid in zip(features, grids):  # the host's grids: positions need no read from the device
        count = image_features.shape[0]
        outputs.append(VisionOutput(features=image_features, stats={"vision_tokens_in": count, "vision_tokens": count},
                                    positions=vision_token_positions(model, grid), position_span=position_span(model, grid)))
    return outputs


FLAT_MERGE = "flat"  # mm_patch_merge_type: every image's features in order, no unpad, no newline tokens


def is_next(model) -> bool:
    """A LLaVA-NeXT model: one image arrives as a base image plus crops, with its original size."""
    return getattr(model.config, "model_type", None) == NEXT_MODEL_TYPE


@torch.no_grad()
def encode_next_image(model, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> VisionOutput:
    """LLaVA-NeXT's vision tokens for one image ([1, 1 + crops, 3, H, W] and its [[height, width]]), laid
    out per the checkpoint's `mm_patch_merge_type`: "spatial_unpad" exactly as transformers'
    `LlavaNextModel` packs them (the base image's features, then the crops' features as one grid with
    the padding rows and columns removed and a newline token after each row), "flat" as the images'
    features one after the other."""
    return encode_next_images(model, [pixel_values], [image_sizes])[0]


def check_next_inputs(pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> None:
    """One image per prompt: its base image and crops [1, 1 + K, 3, H, W] and its [[height, width]]."""
    if pixel_values.dim() != 5 or pixel_values.shape[0] != 1 or image_sizes is None or image_sizes.shape[0] != 1:
        raise ValueError("LLaVA-NeXT takes one image per prompt: pixel values [1, 1 + crops, 3, H, W] and its size "
                         f"[[height, width]]; got {tuple(pixel_values.shape)} and {image_sizes}")


def encode_next_images(model, pixel_values: list[torch.Tensor], image_sizes: list[torch.Tensor]) -> list[VisionOutput]:
    """`encode_next_image` for several prompts, every prompt's base image and crops in one tower pass."""
    check_feature_layer(model.config)
    for pixels, sizes in zip(pixel_values, image_sizes):
        check_next_inputs(pixels, sizes)
    config = model.config
    weight = model.model.vision_tower.embeddings.patch_embedding.weight
    images = torch.cat([pixels[0] for pixels in pixel_values]).to(device=weight.device, dtype=weight.dtype)
    counts = [pixels.shape[1] for pixels in pixel_values]
    if getattr(config, "mm_patch_merge_type", None) == FLAT_MERGE:
        features = [per_image.flatten(0, 1) for per_image in flat_next_features(model, images).split(counts)]
    else:
        output = model.model.get_image_features(images, torch.cat(image_sizes).to(weight.device),
                                                vision_feature_layer=config.vision_feature_layer,
                                                vision_feature_select_strategy=config.vision_feature_select_strategy)
        features = list(output.pooler_output)
    outputs = []
    for prompt_features, images_count in zip(features, counts):
        count = prompt_features.shape[0]
        stats = {"vision_tokens_in": count, "vision_tokens": count, "images": images_count, "crops": images_count - 1}
        outputs.append(VisionOutput(features=prompt_features, stats=stats))
    return outputs


def flat_next_features(model, images: torch.Tensor) -> torch.Tensor:
    """Every tower image's projected patch features [images, tokens per image, llm_hidden]."""
    layers = model.model.vision_tower.encoder.layers
    selected = selected_layer_count(len(layers), model.config.vision_feature_layer)
    hidden = run_tower_to(layers, embed_patches(model.model.vision_tower, images), 0, {selected})[selected]
    return project_batch(model, hidden)
