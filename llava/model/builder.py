"""`load_pretrained_model`: LLaVA's loading entry point, for both checkpoint layouts.

Returns `(tokenizer, model, image_processor, context_len)` like LLaVA's builder. The model is
transformers' own `LlavaForConditionalGeneration`, or `LlavaNextForConditionalGeneration` for LLaVA-NeXT
(v1.6) checkpoints; `model.config` additionally carries LLaVA's options (`image_aspect_ratio`,
`mm_use_im_start_end`, and for NeXT `mm_patch_merge_type`) that the prompt and image code read. A NeXT
config's `image_grid_pinpoints` are in transformers' [height, width] order (original checkpoints'
[width, height] pairs are swapped when they load).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from llava.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_PATCH_TOKEN,
)
from llava.model.checkpoint_files import (
    CheckpointError,
    check_field_types,
    check_weight_files,
    config_field_errors,
    read_json_object,
    weight_files,
)
from llava.model.image_processor import load_image_processor, load_next_image_processor
from llava.model.original_layout import (
    ANYRES,
    LLAVA_DEFAULTS,
    LLAVA_FIELD_TYPES,
    SPATIAL_UNPAD,
    is_original_layout,
    llava_options,
    load_original_layout,
)
from llava.model.qwen import is_qwen_config, load_qwen_image_processor
from llava.model.qwen import model_class_of as qwen_model_class
from llava.model.tokenizer import load_llava_tokenizer
from llava.model.vision_tower import resolve_vision_tower

DEFAULT_CONTEXT_LEN = 2048
HF_LAYOUT_DEFAULTS = {**LLAVA_DEFAULTS, "image_aspect_ratio": "pad"}  # LLaVA-1.5 evaluation pads
HF_NEXT_LAYOUT_DEFAULTS = {**LLAVA_DEFAULTS, "image_aspect_ratio": ANYRES}
NEXT_MODEL_TYPE = "llava_next"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """fp16 on CUDA and fp32 on CPU unless asked otherwise (LLaVA runs fp16 on GPUs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


RUNNABLE_DEVICE_TYPES = ("cpu", "cuda")
CUDA_TORCH_HINT = "install a CUDA build of torch (https://pytorch.org/get-started/locally/) or use --device cpu"


def check_device(device: str) -> None:
    """Refuse a device this machine's torch cannot run on, before any weight loads (else: a traceback
    after the load), saying what to install or choose instead."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device torch knows; choose cpu, cuda or cuda:N") from None
    if parsed.type not in RUNNABLE_DEVICE_TYPES:
        raise ValueError(f"--device {device}: this project runs on cpu or cuda (cuda:N), not {parsed.type}")
    if parsed.type == "cuda":
        check_cuda_device(device, parsed.index)


def check_cuda_device(device: str, index: int | None) -> None:
    if torch.version.cuda is None and torch.version.hip is None:
        raise ValueError(f"--device {device}: this torch ({torch.__version__}) has no CUDA support; {CUDA_TORCH_HINT}")
    count = torch.cuda.device_count()
    if count == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise ValueError(f"--device {device}: no CUDA GPU is visible{where}; use --device cpu")
    if index is not None and index >= count:
        raise ValueError(f"--device {device}: only {count} CUDA GPU(s) are visible (cuda:0 to cuda:{count - 1})")


def check_quantization(load_8bit: bool, load_4bit: bool) -> None:
    """8/4-bit loading goes through bitsandbytes on a CUDA GPU: refuse it before the load when either is missing."""
    if load_8bit and load_4bit:
        raise ValueError("--load-8bit and --load-4bit: choose one")
    if not (load_8bit or load_4bit):
        return
    flag = "--load-8bit" if load_8bit else "--load-4bit"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"{flag} needs bitsandbytes, which is not installed: pip install bitsandbytes")
    if not torch.cuda.is_available():
        raise ValueError(f"{flag} needs a CUDA GPU (bitsandbytes quantises on CUDA); load without it on this machine")


def read_config(model_dir: Path) -> dict:
    config_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise CheckpointError(
            f"model path {model_dir} is not a directory; download the checkpoint first "
            "(e.g. `hf download liuhaotian/llava-v1.5-7b --local-dir <dir>`)"
        )
    if not config_path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json; is this a LLaVA checkpoint?")
    config = read_json_object(config_path)
    check_field_types(config, LLAVA_FIELD_TYPES, config_path)
    return config


def resolve_model_dir(model_path: str) -> Path:
    """A local directory, or a hub id already in the local Hugging Face cache (never downloaded)."""
    path = Path(model_path).expanduser()
    if path.exists():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=model_path, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        raise CheckpointError(
            f"model '{model_path}' is neither a local directory nor in the Hugging Face cache; download it "
            f"first, e.g. `hf download {model_path}`"
        ) from None


def load_tokenizer(model_dir: Path, options: dict) -> PreTrainedTokenizerBase:
    """Load the tokenizer and add LLaVA's image start/end tokens when the checkpoint used them.

    Llama checkpoints get transformers 4.37's slow SentencePiece tokenizer, as LLaVA's `use_fast=False`
    did (see llava/model/tokenizer.py); others transformers' AutoTokenizer.
    """
    try:
        tokenizer = load_llava_tokenizer(model_dir)
    except CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"cannot load the tokenizer of {model_dir}: {error}") from None
    extra = []
    if options["mm_use_im_patch_token"]:
        extra.append(DEFAULT_IMAGE_PATCH_TOKEN)
    if options["mm_use_im_start_end"]:
        extra += [DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN]
    if extra:
        tokenizer.add_tokens(extra, special_tokens=True)
    return tokenizer


def load_pretrained_model(
    model_path: str,
    model_base: str | None = None,
    model_name: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map: str | dict | None = None,
    device: str | None = None,
    torch_dtype: str | torch.dtype | None = None,
    vision_tower: str | None = None,
    attn_implementation: str = "sdpa",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
):
    """Load a LLaVA-1.5 or LLaVA-NeXT checkpoint in either layout, or a Qwen2-VL / Qwen2.5-VL one; see the
    module docstring for what is returned. `min_pixels` / `max_pixels` override a Qwen checkpoint's image
    resolution limits.

    `model_name` is accepted for LLaVA compatibility (LLaVA dispatches on it; we read config.json).
    `device_map="auto"` spreads the model over the visible GPUs with accelerate.
    """
    device = device or default_device()
    check_device(device)
    check_quantization(load_8bit, load_4bit)
    dtype = resolve_dtype(torch_dtype, device)
    model_dir = resolve_model_dir(model_path)
    raw_config = read_config(model_dir)
    if (model_dir / "adapter_config.json").is_file():
        raise CheckpointError(f"{model_dir} is a LoRA adapter; merge it into its base model first")
    if is_original_layout(raw_config):
        if load_8bit or load_4bit:
            raise CheckpointError(
                "8/4-bit loading needs the transformers layout: convert first with "
                "`python -m llava.model.convert --model-path ... --out ...`"
            )
        tower_dir = resolve_vision_tower(raw_config["mm_vision_tower"], model_dir, vision_tower)
        base_dir = resolve_model_dir(model_base) if model_base else None
        tokenizer = load_tokenizer(base_dir or model_dir, llava_options(raw_config))  # before the (long) weight load
        model = load_original_layout(model_dir, tower_dir, dtype, base_dir=base_dir)
        placed = False
        image_processor = load_image_processor(tower_dir)
    elif is_qwen_config(raw_config):
        tokenizer = load_tokenizer(model_dir, LLAVA_DEFAULTS)
        image_processor = load_qwen_image_processor(model_dir, min_pixels, max_pixels)  # refuses min > max early
        model, placed = load_hf_layout(model_dir, dtype, load_8bit, load_4bit, device_map, attn_implementation)
        model.config.max_pixels = image_processor.size["longest_edge"]  # the most vision tokens an image brings
    else:
        is_next = is_next_hf_config(raw_config)
        defaults = HF_NEXT_LAYOUT_DEFAULTS if is_next else HF_LAYOUT_DEFAULTS
        options = {key: raw_config.get(key, default) for key, default in defaults.items()}
        tokenizer = load_tokenizer(model_dir, options)  # before the (long) weight load
        model, placed = load_hf_layout(model_dir, dtype, load_8bit, load_4bit, device_map, attn_implementation)
        for key, value in options.items():
            setattr(model.config, key, value)
        if is_next:
            model.config.mm_patch_merge_type = SPATIAL_UNPAD  # the only merging transformers implements
        image_processor = load_next_image_processor(model_dir) if is_next else load_image_processor(model_dir)
    model.config._attn_implementation = attn_implementation
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise CheckpointError(
            f"the tokenizer of {model_dir} has {len(tokenizer)} tokens but the model only "
            f"{model.get_input_embeddings().num_embeddings} embeddings"
        )
    model = place_model(model, device, device_map, already_placed=placed)
    return tokenizer, model, image_processor, context_length(raw_config)


def is_next_hf_config(config: dict) -> bool:
    return config.get("model_type") == NEXT_MODEL_TYPE


def context_length(raw_config: dict) -> int:
    """LLaVA's tokenizer limit; a transformers-layout NeXT config only knows its decoder's positions."""
    explicit = raw_config.get("tokenizer_model_max_length") or raw_config.get("max_sequence_length")
    if explicit:
        return explicit
    if is_next_hf_config(raw_config) or is_qwen_config(raw_config):
        return (raw_config.get("text_config", {}).get("max_position_embeddings")
                or raw_config.get("max_position_embeddings") or DEFAULT_CONTEXT_LEN)
    return DEFAULT_CONTEXT_LEN


def load_hf_layout(
    model_dir: Path, dtype: torch.dtype, load_8bit: bool, load_4bit: bool, device_map, attn_implementation: str
) -> tuple[LlavaForConditionalGeneration | LlavaNextForConditionalGeneration, bool]:
    """transformers' own loader (Llava or LlavaNext by model_type); quantisation through bitsandbytes when asked.

    Returns the model and whether transformers already placed it on devices (device_map given).
    """
    kwargs: dict = {"dtype": dtype, "attn_implementation": attn_implementation}
    if load_8bit or load_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=load_8bit, load_in_4bit=load_4bit, bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = device_map or "auto"
    elif device_map is not None:
        kwargs["device_map"] = device_map
    check_weight_files(weight_files(model_dir))
    raw_config = read_config(model_dir)
    if is_qwen_config(raw_config):
        model_class = qwen_model_class(raw_config)
    else:
        model_class = LlavaNextForConditionalGeneration if is_next_hf_config(raw_config) else LlavaForConditionalGeneration
    try:
        with config_field_errors(model_dir / "config.json"):
            model = model_class.from_pretrained(model_dir, **kwargs)
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"cannot load {model_dir}: {error}") from None
    return model.eval(), "device_map" in kwargs


def place_model(model, device: str, device_map, already_placed: bool):
    """Move the model to one device, or dispatch it over several GPUs with accelerate."""
    if not already_placed and device_map == "auto" and torch.cuda.device_count() > 1:
        from accelerate import dispatch_model, infer_auto_device_map

        no_split = ["LlamaDecoderLayer", "CLIPEncoderLayer", "Qwen2_5_VLDecoderLayer", "Qwen2VLDecoderLayer",
                    "Qwen2_5_VLVisionBlock", "Qwen2VLVisionBlock"]
        device_map = infer_auto_device_map(model, no_split_module_classes=no_split)
        return dispatch_model(model, device_map=device_map)
    if not already_placed:
        model = model.to(device)
    return model
