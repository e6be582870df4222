"""Read an original-layout LLaVA checkpoint (`liuhaotian/llava-v1.5-7b`) into transformers' Llava model.

The original layout is a Llama checkpoint with `model.mm_projector.*` weights and `mm_*` config keys;
the CLIP tower lives in a separate checkpoint. We build transformers' `LlavaForConditionalGeneration`
on the meta device and stream every tensor into place under its transformers name.

LLaVA-NeXT (v1.6, `liuhaotian/llava-v1.6-*`) checkpoints use the same layout plus anyres settings and a
`model.image_newline` weight; they become transformers' `LlavaNextForConditionalGeneration`. v1.6
fine-tuned its tower, so the tower weights inside its shards replace those of the stand-alone tower.
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
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

from llava.model.checkpoint_files import (
    CheckpointError,
    check_weight_files,
    config_field_errors,
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
# The types config.json's LLaVA fields may have (transformers checks its own fields); a wrong one is
# refused naming the field, before it fails somewhere inside the load.
LLAVA_FIELD_TYPES = {
    "mm_vision_tower": (str,),
    "mm_vision_select_layer": (int,),
    "mm_vision_select_feature": (str,),
    "mm_projector_type": (str,),
    "image_aspect_ratio": (str, type(None)),
    "mm_use_im_start_end": (bool,),
    "mm_use_im_patch_token": (bool,),
    "mm_patch_merge_type": (str, type(None)),
    "image_grid_pinpoints": (list, type(None)),
    "tokenizer_model_max_length": (int, type(None)),
    "max_sequence_length": (int, type(None)),
    "model_type": (str,),
    "text_config": (dict,),
    "vision_config": (dict,),
}
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)
SKIPPED_PREFIXES = ("model.vision_tower.",)  # fine-tuned copies of the tower; LLaVA reloads it too
ANYRES = "anyres"
SPATIAL_UNPAD = "spatial_unpad"  # crops re-assembled, padding removed, a newline after each row
FLAT = "flat"  # every crop's tokens one after another, no newline
SUPPORTED_MERGE_TYPES = (SPATIAL_UNPAD, FLAT)
CLIP_VISION_PREFIX = "vision_model."
CLIP_NON_VISION_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
EMBEDDED_TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."  # v1.6's fine-tuned tower


def is_original_layout(config: dict) -> bool:
    """An original-layout config names its vision tower; a transformers one nests a vision_config."""
    return "mm_vision_tower" in config and "vision_config" not in config


def is_next_config(config: dict) -> bool:
    """A LLaVA-NeXT original config tiles images (anyres) or merges crops spatially."""
    merge_type = config.get("mm_patch_merge_type") or FLAT
    return config.get("image_aspect_ratio") == ANYRES or merge_type.startswith("spatial")


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
    llava_config = LlavaConfig(**shared_config_kwargs(config, tower_dir))
    return with_llava_options(llava_config, config)


def build_llava_next_config(config: dict, tower_dir: Path) -> LlavaNextConfig:
    """Translate a LLaVA-NeXT original config.json into a LlavaNextConfig.

    LLaVA writes the grid pinpoints as [width, height], transformers reads them as [height, width]:
    they are swapped here, so that transformers' feature layout (grid shape, unpad) follows the grid
    LLaVA's preprocessing chose. Copying them unswapped (as llava-hf's checkpoints do) would give the
    same set of grids but break ties the other way: a small tall image would be tiled in a column by
    LLaVA and have its features laid out in a row.
    """
    merge_type = config.get("mm_patch_merge_type") or FLAT
    if merge_type not in SUPPORTED_MERGE_TYPES:
        raise CheckpointError(
            f"mm_patch_merge_type '{merge_type}' is not supported (supported: {SUPPORTED_MERGE_TYPES})"
        )
    if not config.get("image_grid_pinpoints"):
        raise CheckpointError("a LLaVA-NeXT config.json needs image_grid_pinpoints")
    kwargs = shared_config_kwargs(config, tower_dir)
    vision = kwargs["vision_config"]
    next_config = LlavaNextConfig(
        **kwargs,
        image_grid_pinpoints=swap_pairs(config["image_grid_pinpoints"]),
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
    )
    next_config = with_llava_options(next_config, config)
    next_config.mm_patch_merge_type = merge_type
    return next_config


def swap_pairs(pinpoints) -> list[list[int]]:
    """[width, height] pairs as [height, width] pairs, and back."""
    return [[second, first] for first, second in pinpoints]


def shared_config_kwargs(config: dict, tower_dir: Path) -> dict:
    """The LlavaConfig / LlavaNextConfig arguments both architectures take from an original config."""
    projector = config.get("mm_projector_type", LLAVA_DEFAULTS["mm_projector_type"])
    if projector not in SUPPORTED_PROJECTORS:
        raise CheckpointError(f"mm_projector_type '{projector}' is not supported (supported: {SUPPORTED_PROJECTORS})")
    select_feature = config.get("mm_vision_select_feature", PATCH_FEATURES)
    if select_feature not in (PATCH_FEATURES, CLS_PATCH_FEATURES):
        raise CheckpointError(f"mm_vision_select_feature '{select_feature}' is not supported")
    llama_keys = set(LlamaConfig().to_dict()) - {"architectures", "model_type", "transformers_version"}
    text_config = LlamaConfig(**{k: v for k, v in config.items() if k in llama_keys})
    with config_field_errors(tower_dir / "config.json"):
        vision_config = CLIPVisionConfig.from_pretrained(tower_dir)
    return {
        "vision_config": vision_config,
        "text_config": text_config,
        "vision_feature_layer": config.get("mm_vision_select_layer", -2),
        "vision_feature_select_strategy": "default" if select_feature == PATCH_FEATURES else "full",
        "projector_hidden_act": "gelu",
        "image_token_index": text_config.vocab_size,  # unused: we splice vision tokens ourselves
    }


def with_llava_options(model_config, config: dict):
    """Put LLaVA's own options (and the projector type) on a transformers config."""
    for key, value in llava_options(config).items():
        setattr(model_config, key, value)
    model_config.mm_projector_type = config.get("mm_projector_type", LLAVA_DEFAULTS["mm_projector_type"])
    return model_config


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
    """Map a CLIP tower's tensor name to its place in the Llava model. `CLIPModel` (and `CLIPVisionModel`
    before transformers 5) prefix the tower's names with `vision_model.`; transformers 5's
    `CLIPVisionModel.save_pretrained` writes them bare, as transformers itself loads them."""
    if name.startswith(CLIP_VISION_PREFIX):
        return "model.vision_tower." + name[len(CLIP_VISION_PREFIX) :]
    if name.startswith(CLIP_NON_VISION_PREFIXES):
        return None
    return "model.vision_tower." + name


def next_tensor_name(name: str, projector: str) -> str | None:
    """Map a LLaVA-NeXT tensor name: the newline and the fine-tuned tower, else as for LLaVA-1.5."""
    if name == "model.image_newline":
        return name
    if name.startswith(EMBEDDED_TOWER_PREFIX):
        return "model.vision_tower." + name[len(EMBEDDED_TOWER_PREFIX) :]
    return language_model_name(name, projector)


def build_empty_model(raw_config: dict, tower_dir: Path):
    """The Llava or LlavaNext model of an original config, on the meta device."""
    if is_next_config(raw_config):
        config = build_llava_next_config(raw_config, tower_dir)
        model_class = LlavaNextForConditionalGeneration
    else:
        config = build_llava_config(raw_config, tower_dir)
        model_class = LlavaForConditionalGeneration
    with init_empty_weights():
        model = model_class(config)
    if config.mm_projector_type == LINEAR_PROJECTOR:
        with init_empty_weights():
            model.model.multi_modal_projector = LinearProjector(
                config.vision_config.hidden_size, config.text_config.hidden_size
            )
    return model


def load_original_layout(
    model_dir: Path, tower_dir: Path, dtype: torch.dtype, base_dir: Path | None = None
) -> LlavaForConditionalGeneration | LlavaNextForConditionalGeneration:
    """Build the Llava (or LlavaNext) model and stream the weights of `model_dir` (and the tower) into it.

    With `base_dir` (LLaVA's --model-base), the language model comes from the base checkpoint and
    the tensors in `model_dir` (e.g. a projector-only `mm_projector.bin`) override it.
    """
    raw_config = json.loads((model_dir / "config.json").read_text())
    with config_field_errors(model_dir / "config.json"):
        model = build_empty_model(raw_config, tower_dir)
    config = model.config
    is_next = isinstance(model, LlavaNextForConditionalGeneration)
    rename = next_tensor_name if is_next else language_model_name
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
            place(rename(name, config.mm_projector_type), tensor)
    if is_next and config.mm_patch_merge_type == FLAT and "model.image_newline" not in loaded:
        place("model.image_newline", torch.zeros(config.text_config.hidden_size))  # flat merging never reads it
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
