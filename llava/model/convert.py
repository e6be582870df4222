"""Save an original-layout LLaVA checkpoint in the transformers layout (`llava-hf/...` style).

    python -m llava.model.convert --model-path checkpoints/llava-v1.5-7b --out checkpoints/llava-v1.5-7b-hf

The transformers layout needs an `<image>` token in the vocabulary (and a `<pad>` token); we add both
and pad the vocabulary to a multiple of 64 as llava-hf does. New embedding rows are the mean of the
existing ones, so the converted model gives the same logits on every original token.

LLaVA-NeXT (v1.6) checkpoints become `llava-hf/llava-v1.6-*-hf` style ones: a LlavaNext config, the
newline weight, and a LlavaNext processor whose anyres image processor keeps the tower's CLIP settings.
The grid pinpoints are written in transformers' [height, width] order (llava-hf copied LLaVA's
[width, height] pairs unswapped), so the converted checkpoint tiles and lays out every image as the
original does, ties included.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

import torch
from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor, LlavaProcessor

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.model.builder import load_pretrained_model
from llava.model.checkpoint_files import CheckpointError
from llava.model.image_processor import next_image_processor_from_clip
from llava.model.original_layout import LINEAR_PROJECTOR, LLAVA_DEFAULTS
from llava.output_paths import OutputPathError, check_output_folder

PAD_TOKEN = "<pad>"
VOCAB_MULTIPLE = 64
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT  # 130, what a shell reports for a Ctrl-C'd command


def grow_embeddings(model, new_size: int) -> None:
    """Resize input and output embeddings to new_size, filling new rows with the mean row."""
    old_size = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(new_size, mean_resizing=False)
    with torch.no_grad():
        for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            matrix[old_size:] = matrix[:old_size].mean(dim=0, keepdim=True)


def convert_checkpoint(src_dir: str | Path, dst_dir: str | Path, vision_tower: str | None = None) -> Path:
    """Convert `src_dir` (original layout) into `dst_dir` (transformers layout); returns dst_dir."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if not (src_dir / "config.json").is_file() or "mm_vision_tower" not in json.loads((src_dir / "config.json").read_text()):
        raise CheckpointError(f"{src_dir} is not an original-layout LLaVA checkpoint (no mm_vision_tower in config.json)")
    tokenizer, model, image_processor, _ = load_pretrained_model(
        str(src_dir), device="cpu", torch_dtype=torch.float32, vision_tower=vision_tower
    )
    if model.config.mm_projector_type == LINEAR_PROJECTOR:
        raise CheckpointError("the transformers layout has no 'linear' projector; only mlp2x_gelu checkpoints convert")
    tokenizer.add_tokens([DEFAULT_IMAGE_TOKEN], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    padded = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    grow_embeddings(model, padded)
    model.config.image_token_id = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.text_config.pad_token_id = tokenizer.pad_token_id
    for key in [*LLAVA_DEFAULTS, "mm_projector_type", "mm_patch_merge_type"]:
        if hasattr(model.config, key):
            delattr(model.config, key)
    dst_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst_dir)
    build_processor(model, tokenizer, image_processor).save_pretrained(dst_dir)
    return dst_dir


def build_processor(model, tokenizer, image_processor) -> LlavaProcessor | LlavaNextProcessor:
    """The processor llava-hf ships beside the weights: Llava's, or LlavaNext's with an anyres image processor."""
    kwargs = {
        "tokenizer": tokenizer,
        "patch_size": model.config.vision_config.patch_size,
        "vision_feature_select_strategy": model.config.vision_feature_select_strategy,
        "num_additional_image_tokens": 1,
    }
    if isinstance(model, LlavaNextForConditionalGeneration):
        next_processor = next_image_processor_from_clip(image_processor, model.config.image_grid_pinpoints)
        return LlavaNextProcessor(image_processor=next_processor, **kwargs)
    return LlavaProcessor(image_processor=image_processor, **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True, help="original-layout checkpoint directory")
    parser.add_argument("--out", required=True, help="directory to write the transformers-layout checkpoint to")
    parser.add_argument("--vision-tower", default=None, help="local CLIP tower directory (overrides mm_vision_tower)")
    args = parser.parse_args(argv)
    try:
        check_output_folder(args.out, "--out")
        out = convert_checkpoint(args.model_path, args.out, args.vision_tower)
    except (CheckpointError, OutputPathError) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:  # as llava/eval/cli_errors.py reports it (this layer does not import eval)
        print(f"interrupted: {args.out} may hold part of a checkpoint; run the same command again", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
