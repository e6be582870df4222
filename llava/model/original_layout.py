"""Read an original-layout LLaVA checkpoint (`liuhaotian/llava-v1.5-7b`) into transformers' Llava model.

The original layout is a Llama checkpoint with `model.mm_projector.*` weights and `mm_*` config keys;
the CLIP tower lives in a separate checkpoint. We build transformers' `LlavaForConditionalGeneration`
on the meta device and stream every tensor into place under its transformers name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from llava.model.checkpoint_files import (
    CheckpointError,
    check_weight_files,
    iter_tensors,
    weight_files,
)

MLP_PROJECTOR = "mlp2x_gelu"
LINEAR_PROJECTOR = "linear"
SUPPORTED_PROJECTORS = (MLP_PROJECTOR, LINEAR_PROJECTOR)
PATCH_FEATURES = "patch"  # mm_vision_select_feature: drop CLS
CLS_PATCH_FEATURES = "cls_patch"
LLAVA_DEFAULTS = {
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": PATCH_FEATURES,
    "mm_projector_type": LINEAR_PROJECTOR,  # LLaVA's default when the key is absent
    "image_aspect_ratio": "square",
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
}
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)
SKIPPED_PREFIXES = ("model.vision_tower.",)  # fine-tuned copies of the tower; LLaVA reloads it too


def is_original_layout(config: dict) -> bool:
    """An original-layout config names its vision tower; a transformers one nests a vision_config."""
    return "mm_vision_tower" in config and "vision_config" not in config


def llava_options(config: dict) -> dict:
    """The LLaVA-specific options (with LLaVA's defaults) that our pipeline reads from model.config."""
    return {key: config.get(key, default) for key, default in LLAVA_DEFAULTS.items()}


class LinearProjector(nn.Module):
    """LLaVA's `linear` projector (LLaVA-1.0 style): one Linear from vision width to LLM width."""

    def __init__(self, vision_hidden: int, text_hidden: int):
        super().__init__()
        self.linear = nn.Linear(vision_hidden, text_hidden)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear(image_features)


def build_llava_config(config: dict, tower_dir: Path) -> LlavaConfig:
    """Translate an original-layout config.json (plus the tower's config) into a LlavaConfig."""
    projector = config.get("mm_projector_type", LLAVA_DEFAULTS["mm_projector_type"])
    if projector not in SUPPORTED_PROJECTORS:
        raise CheckpointError(f"mm_projector_type '{projector}' is not supported (supported: {SUPPORTED_PROJECTORS})")
    select_feature = config.get("mm_vision_select_feature", PATCH_FEATURES)
    if select_feature not in (PATCH_FEATURES, CLS_PATCH_FEATURES):
        raise CheckpointError(f"mm_vision_select_feature '{select_feature}' is not supported")
    llama_keys = set(LlamaConfig().to_dict()) - {"architectures", "model_type", "transformers_version"}
    text_config = LlamaConfig(**{k: v for k, v in config.items() if k in llama_keys})
    vision_config = CLIPVisionConfig.from_pretrained(tower_dir)
    llava_config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        vision_feature_layer=config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if select_feature == PATCH_FEATURES else "full",
        projector_hidden_act="gelu",
        image_token_index=text_config.vocab_size,  # unused: we splice vision tokens ourselves
    )
    for key, value in llava_options(config).items():
        setattr(llava_config, key, value)
    llava_config.mm_projector_type = projector
    return llava_config


def language_model_name(name: str, projector: str) -> str | None:
    """Map an original-layout tensor name to its transformers name (None: not used)."""
    if name.endswith(SKIPPED_SUFFIXES) or name.startswith(SKIPPED_PREFIXES):
        return None
    if name.startswith("model.mm_projector."):
        rest = name[len("model.mm_projector.") :]
        if projector == LINEAR_PROJECTOR:
            return "model.multi_modal_projector.linear." + rest
        index, _, param = rest.partition(".")
        return {"0": "model.multi_modal_projector.linear_1.", "2": "model.multi_modal_projector.linear_2."}[index] + param
    if name.startswith("model."):
        return "model.language_model." + name[len("model.") :]
    if name.startswith("lm_head."):
        return name
    return None


def vision_tower_name(name: str) -> str | None:
    """Map a CLIPModel / CLIPVisionModel tensor name to its place in the Llava model."""
    prefix = "vision_model."
    return "model.vision_tower." + name[len(prefix) :] if name.startswith(prefix) else None


def load_original_layout(
    model_dir: Path, tower_dir: Path, dtype: torch.dtype, base_dir: Path | None = None
) -> LlavaForConditionalGeneration:
    """Build the Llava model and stream the weights of `model_dir` (and the tower) into it.

    With `base_dir` (LLaVA's --model-base), the language model comes from the base checkpoint and
    the tensors in `model_dir` (e.g. a projector-only `mm_projector.bin`) override it.
    """
    raw_config = json.loads((model_dir / "config.json").read_text())
    config = build_llava_config(raw_config, tower_dir)
    with init_empty_weights():
        model = LlavaForConditionalGeneration(config)
    if config.mm_projector_type == LINEAR_PROJECTOR:
        with init_empty_weights():
            model.model.multi_modal_projector = LinearProjector(
                config.vision_config.hidden_size, config.text_config.hidden_size
            )
    expected = {name for name, _ in model.named_parameters()}
    loaded: set[str] = set()

    def place(name: str | None, tensor: torch.Tensor) -> None:
        if name is None or name not in expected:
            return
        set_module_tensor_to_device(model, name, "cpu", value=tensor, dtype=dtype)
        loaded.add(name)

    tower_files = weight_files(tower_dir)
    language_sources = [base_dir, model_dir] if base_dir is not None else [model_dir]
    language_files = [projector_only_files(source) or weight_files(source) for source in language_sources]
    check_weight_files(tower_files + [path for files in language_files for path in files])
    for name, tensor in iter_tensors(tower_files):
        place(vision_tower_name(name), tensor)
    for files in language_files:
        for name, tensor in iter_tensors(files):
            place(language_model_name(name, config.mm_projector_type), tensor)
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {model_dir} (tower {tower_dir}) is missing weights: {shown}")
    model.tie_weights()
    return model.eval()


def projector_only_files(checkpoint_dir: Path) -> list[Path]:
    """LLaVA's stage-1 checkpoints hold only `mm_projector.bin`; such a dir has no model shards."""
    projector = checkpoint_dir / "mm_projector.bin"
    has_shards = any(checkpoint_dir.glob("*.safetensors")) or any(checkpoint_dir.glob("pytorch_model*.bin"))
    return [projector] if projector.is_file() and not has_shards else []
