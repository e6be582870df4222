"""Vision stage: run the CLIP tower layer by layer and project the selected features.

We drive the encoder layers ourselves (rather than calling the tower) so that the sequence can be
shortened between layers and only the needed attention row is computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

CLS_INDEX = 0


@dataclass
class VisionOutput:
    """Projected vision tokens for one image, plus what later stages need to know."""

    features: torch.Tensor  # [num_vision_tokens, llm_hidden]
    key_indices: torch.Tensor | None = None  # vision-token positions later stages must keep
    stats: dict = field(default_factory=dict)


def selected_layer_count(num_layers: int, feature_layer: int) -> int:
    """How many encoder layers to run so that the last output is `hidden_states[feature_layer]`.

    `hidden_states[0]` is the embedding output and `hidden_states[i]` the output of layer i-1.
    """
    index = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 0 <= index <= num_layers:
        raise ValueError(f"vision_feature_layer {feature_layer} is out of range for a {num_layers}-layer tower")
    return index


@torch.no_grad()
def encode_image(model, pixel_values: torch.Tensor) -> VisionOutput:
    """Features of one image exactly as LLaVA selects them, without any token dropping."""
    config = model.config
    tower = model.model.vision_tower
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError("multi-layer vision features are not supported")
    pixel_values = pixel_values.to(device=tower.embeddings.patch_embedding.weight.device, dtype=tower.embeddings.patch_embedding.weight.dtype)
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    for layer in tower.encoder.layers[: selected_layer_count(len(tower.encoder.layers), config.vision_feature_layer)]:
        hidden = layer(hidden, None)
    if config.vision_feature_select_strategy == "default":
        hidden = hidden[:, CLS_INDEX + 1 :]
    features = model.model.multi_modal_projector(hidden)[0]
    return VisionOutput(features=features, stats={"vision_tokens": features.shape[0]})
