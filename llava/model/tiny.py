"""Tiny LLaVA-1.5 and LLaVA-NeXT (v1.6) checkpoints with random weights, for tests and the offline demo.

The checkpoint has the real architecture and the real file formats of `liuhaotian/llava-v1.5-7b`
(original LLaVA layout: `config.json` with `mm_*` keys, sharded weights with `model.mm_projector.*`,
a Llama SentencePiece tokenizer) and of `openai/clip-vit-large-patch14-336` (the vision tower, in
its own sub-directory), only with small widths, so that nothing needs a download. With `--arch next`
the checkpoint is shaped like `liuhaotian/llava-v1.6-vicuna-7b` instead: anyres settings, a 4096
context, a `model.image_newline` weight and a fine-tuned copy of the tower inside the shards.

    python -m llava.model.tiny --out DIR [--arch llava|next] [--layout original|hf] [--seed 0]
                               [--weights-format safetensors|bin]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file

from llava.model.qwen import QWEN_MODEL_TYPES as QWEN_ARCHS
from llava.model.random_llava import (
    BOS_ID,
    EOS_ID,
    FIRST_WORD_ID,
    IMAGE_SIZE,
    LLM_LAYERS,
    NEXT_MERGE_TYPE,
    PAD_ID,
    PROJECTOR_TYPE,
    VISION_ACT,
    VISION_FEATURE_LAYER,
    VISION_LAYER_NORM_EPS,
    ModelShape,
    original_llm_shapes,
)
from llava.model.random_weights import TINY_INIT, init_peaked, normal

if TYPE_CHECKING:  # transformers is imported lazily: it is slow to import and only the tower needs it
    from transformers import CLIPConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

# --- Widths: LLaVA-1.5's depths and image geometry (`llava.model.random_llava`), narrow everywhere ---
TINY_SHAPE = ModelShape(vision_hidden=64, vision_intermediate=128, vision_heads=4, llm_hidden=64,
                        llm_intermediate=176, llm_heads=4, llm_kv_heads=2)

# --- CLIP vision tower: a whole CLIPModel, saved like openai/clip-vit-large-patch14-336 ---
VISION_TOWER_DIRNAME = "clip-vision-tower"
CLIP_TEXT_LAYERS = 2
CLIP_TEXT_HIDDEN = 32
CLIP_TEXT_INTERMEDIATE = 64
CLIP_TEXT_HEADS = 2
CLIP_TEXT_VOCAB = 64
CLIP_TEXT_MAX_POSITIONS = 77
CLIP_PROJECTION_DIM = 32
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# --- Llama language model ---
MAX_POSITIONS = 2048
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0

# --- Weights: `TINY_INIT` (llava.model.random_weights), and output rows that favour word pieces ---
EOS_ROW_SCALE = 0.5  # shrinks the EOS logit so EOS does not end every answer at once
NON_WORD_ROW_SCALE = 0.25  # <unk>, <s> and byte pieces rarely win: greedy answers decode to readable text

# --- Tokenizer (Llama-style SentencePiece BPE, trained here) ---
TOKENIZER_VOCAB_SIZE = 1000
TOKENIZER_CORPUS_SEED = 1234  # fixed: every checkpoint seed shares one tokenizer
TOKENIZER_CORPUS_LINES = 3000
OCR_NUMBER_SHARE, OCR_PRICE_SHARE = 0.15, 0.15  # the rest of the OCR tokens are words
MAX_OCR_NUMBER, MAX_OCR_PRICE = 9999, 99

# --- LLaVA-NeXT (v1.6): anyres tiling on a 2x2 grid at most, so tests stay fast ---
NEXT_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672]]  # LLaVA writes [width, height]
NEXT_MAX_POSITIONS = 4096  # a 2x2 grid gives up to 5 x 576 vision tokens plus newline tokens
NEXT_TOWER_LR = 2e-06  # v1.6 fine-tunes the tower, so its weights ship inside the shards
TOWER_TUNING_STD = 0.01  # how far the fine-tuned tower copy moves from the stand-alone tower
ORIGINAL_TOWER_PREFIX = "model.vision_tower.vision_tower."  # LLaVA's CLIPVisionTower wraps CLIPVisionModel

# --- Files ---
NUM_SHARDS = 2
COMPLETE_MARKER = ".tiny-checkpoint-complete.json"
LAYOUTS = ("original", "hf")
ARCHS = ("llava", "next", *QWEN_ARCHS)
WEIGHTS_FORMATS = ("safetensors", "bin")
SEED_STREAMS = 2  # independent RNG streams per seed: language model, vision tower
LLM_STREAM, VISION_STREAM = 0, 1

SYSTEM_PROMPTS = [
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language.",
]
PROMPT_SUFFIXES = [
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "When the provided information is insufficient, respond with 'Unanswerable'.",
    "Reference OCR token:",
]
QUESTION_STARTS = ["What is", "What color is", "Where is", "Which", "Who is", "How many", "Is there",
                   "Are there", "Why is", "When was", "What does", "What brand is", "What number is",
                   "What time is", "What kind of", "Does", "Can you see", "What is written on"]
COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown",
           "gray", "silver", "gold"]
OBJECTS = ["man", "woman", "child", "dog", "cat", "car", "bus", "sign", "bottle", "book", "phone",
           "table", "chair", "shirt", "hat", "street", "building", "tree", "sky", "train", "clock",
           "plate", "pizza", "screen", "label", "box", "can", "door", "window", "bag", "ball", "boat",
           "bicycle", "horse", "bird", "cup", "laptop", "keyboard", "banner", "poster", "jersey"]
PLACES = ["on the left", "on the right", "in the image", "in the picture", "behind the", "next to the",
          "under the", "above the", "in front of the", "on top of the"]
OCR_WORDS = ["STOP", "EXIT", "OPEN", "SALE", "Coca-Cola", "Pepsi", "Nike", "Adidas", "Samsung",
             "Apple", "Google", "Heineken", "Budweiser", "Canon", "Sony", "Toyota", "Ford", "London",
             "Paris", "New", "York", "Street", "Avenue", "Road", "Hotel", "Cafe", "Bank", "Police",
             "Taxi", "Menu", "Price", "Total", "Page", "Chapter", "Volume", "Edition", "Model", "No.",
             "$", "%", "kg", "cm", "mph", "AM", "PM", "www", ".com", "@", "#"]
ANSWERS = ["yes", "no", "unanswerable", "A", "B", "C", "D", "one", "two", "three", "four", "five",
           "left", "right", "top", "bottom", "nothing", "unknown", "it is", "there are", "the"]


def write_tiny_checkpoint(out_dir: str | os.PathLike, layout: str = "original", seed: int = 0,
                          weights_format: str = "safetensors", arch: str = "llava") -> Path:
    """Write a tiny checkpoint to `out_dir` (no-op when a complete one with these settings is there).

    Everything is built in a hidden sibling directory and renamed into place only after the completion
    marker is written, so a killed run never leaves a directory that looks complete.
    """
    _check_choice("layout", layout, LAYOUTS)
    _check_choice("weights_format", weights_format, WEIGHTS_FORMATS)
    _check_choice("arch", arch, ARCHS)
    if arch in QWEN_ARCHS and layout != "hf":
        raise ValueError(f"arch={arch!r} comes in the transformers layout only (layout='hf'), as Qwen ships it")
    out = Path(out_dir)
    settings = {"layout": layout, "seed": seed, "weights_format": weights_format, "arch": arch}
    if _is_complete(out, settings):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        built = _build(staging, layout, seed, weights_format, arch)
        _write_json(built / COMPLETE_MARKER, settings)
        _move_into_place(built, out, settings)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _build(staging: Path, layout: str, seed: int, weights_format: str, arch: str = "llava") -> Path:
    """Write the original layout under `staging`; convert it when the transformers layout is asked. Qwen
    checkpoints are written in the transformers layout directly (llava/model/tiny_qwen.py)."""
    if arch in QWEN_ARCHS:
        from llava.model.tiny_qwen import write_qwen_checkpoint  # lazy: it imports transformers

        write_qwen_checkpoint(staging / "hf", arch, seed)
        return staging / "hf"
    original = staging / "original"
    _write_original(original, seed, weights_format, arch)
    if layout == "original":
        return original
    from llava.model.convert import (
        convert_checkpoint,  # lazy: only the hf layout needs it
    )

    converted = staging / "hf"
    convert_checkpoint(original, converted)
    return converted


def _write_original(model_dir: Path, seed: int, weights_format: str, arch: str = "llava") -> None:
    """Write every file of the original layout into `model_dir`: LLaVA-1.5's, or LLaVA-NeXT's for
    arch "next". The language model and projector are the same for both at one seed; NeXT adds the
    newline weight and the fine-tuned tower copy, drawn afterwards from the same stream."""
    is_next = arch == "next"
    max_positions = NEXT_MAX_POSITIONS if is_next else MAX_POSITIONS
    model_dir.mkdir(parents=True)
    vocab_size = write_tokenizer(model_dir, max_positions)
    _write_json(model_dir / "config.json", llava_next_config(vocab_size) if is_next else llava_config(vocab_size))
    _write_json(model_dir / "generation_config.json",
                {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
                 "max_length": max_positions})
    tower_dir = model_dir / VISION_TOWER_DIRNAME
    write_vision_tower(tower_dir, _generator(seed, VISION_STREAM))
    gen = _generator(seed, LLM_STREAM)
    tensors = llm_tensors(vocab_size, gen)
    if is_next:
        newline = torch.empty(TINY_SHAPE.llm_hidden)
        extra = {"model.image_newline": TINY_INIT.value("model.image_newline", newline, gen)}
        extra.update(fine_tuned_tower_tensors(tower_dir, gen))
        tensors = next_tensor_order(tensors, extra)
    _write_shards(model_dir, tensors, weights_format)


def llava_next_config(vocab_size: int) -> dict:
    """The `config.json` of a v1.6 checkpoint: LLaVA-1.5's keys plus the anyres settings."""
    return {
        **llava_config(vocab_size),
        "_name_or_path": "tiny-llava-v1.6",
        "max_position_embeddings": NEXT_MAX_POSITIONS,
        "tokenizer_model_max_length": NEXT_MAX_POSITIONS,
        "image_aspect_ratio": "anyres",
        "image_grid_pinpoints": NEXT_GRID_PINPOINTS,
        "mm_patch_merge_type": NEXT_MERGE_TYPE,
        "unfreeze_mm_vision_tower": True,
        "mm_vision_tower_lr": NEXT_TOWER_LR,
    }


def fine_tuned_tower_tensors(tower_dir: Path, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The tower's vision weights, slightly moved, under the names LLaVA saves them inside its shards."""
    tower = load_file(str(tower_dir / "model.safetensors"))
    return {ORIGINAL_TOWER_PREFIX + name: tensor + normal(tensor, TOWER_TUNING_STD, gen)
            for name, tensor in tower.items() if name.startswith("vision_model.")}


def next_tensor_order(llm: dict[str, torch.Tensor], extra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Order as LLaVA's model saves them: Llama body, then tower, projector, newline, then lm_head."""
    body = {name: t for name, t in llm.items() if not name.startswith(("model.mm_projector.", "lm_head."))}
    tower = {name: t for name, t in extra.items() if name.startswith(ORIGINAL_TOWER_PREFIX)}
    projector = {name: t for name, t in llm.items() if name.startswith("model.mm_projector.")}
    return {**body, **tower, **projector, "model.image_newline": extra["model.image_newline"],
            "lm_head.weight": llm["lm_head.weight"]}


# ---------------------------------------------------------------------------------------------------
# Language model and projector
# ---------------------------------------------------------------------------------------------------

def llava_config(vocab_size: int, shape: ModelShape = TINY_SHAPE) -> dict:
    """The `config.json` of the original layout at `shape`, with `mm_vision_tower` relative to the model dir."""
    return {
        "_name_or_path": "tiny-llava-v1.5",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        **shape.llama_settings(),
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": ROPE_THETA,
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "initializer_range": 0.02,
        "mm_vision_tower": VISION_TOWER_DIRNAME,
        "mm_projector_type": PROJECTOR_TYPE,
        "mm_hidden_size": shape.vision_hidden,
        "mm_vision_select_layer": VISION_FEATURE_LAYER,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_patch_merge_type": "flat",
        "tokenizer_model_max_length": MAX_POSITIONS,
        "tokenizer_padding_side": "right",
        "use_mm_proj": True,
        "freeze_mm_mlp_adapter": False,
        "tune_mm_mlp_adapter": False,
        "use_cache": True,
    }


def llm_tensors(vocab_size: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Llama + projector weights under the original LLaVA names, in the order LLaVA saves them, drawn by
    `TINY_INIT` with damped residual writes."""
    tensors = {name: TINY_INIT.value(name, torch.empty(dims), gen, LLM_LAYERS)
               for name, dims in original_llm_shapes(TINY_SHAPE, vocab_size).items()}
    tensors["lm_head.weight"] *= _lm_head_row_scales(vocab_size)
    return tensors


def _lm_head_row_scales(vocab_size: int) -> torch.Tensor:
    """Smaller rows for the special and byte pieces, and for EOS, so that answers run several word pieces."""
    row_scale = torch.ones(vocab_size, 1)
    row_scale[:FIRST_WORD_ID] = NON_WORD_ROW_SCALE
    row_scale[EOS_ID] = EOS_ROW_SCALE
    return row_scale


def _write_shards(model_dir: Path, tensors: dict[str, torch.Tensor], weights_format: str) -> None:
    """Split `tensors` (in order) into NUM_SHARDS files of about equal size, plus HF's index file."""
    stem, ext = ("model", "safetensors") if weights_format == "safetensors" else ("pytorch_model", "bin")
    shards = _split_in_order(tensors, NUM_SHARDS)
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        filename = f"{stem}-{k:05d}-of-{len(shards):05d}.{ext}"
        _save_shard(shard, model_dir / filename, weights_format)
        weight_map.update(dict.fromkeys(shard, filename))
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(model_dir / f"{stem}.{ext}.index.json",
                {"metadata": {"total_size": total_size}, "weight_map": weight_map})


def _split_in_order(tensors: dict[str, torch.Tensor], num_shards: int) -> list[dict[str, torch.Tensor]]:
    """Greedy in-order split like HF's `max_shard_size`: start a new shard once the quota is reached."""
    quota = sum(t.numel() * t.element_size() for t in tensors.values()) / num_shards
    shards: list[dict[str, torch.Tensor]] = [{}]
    filled = 0
    for name, tensor in tensors.items():
        if filled >= quota and len(shards) < num_shards:
            shards.append({})
            filled = 0
        shards[-1][name] = tensor
        filled += tensor.numel() * tensor.element_size()
    return shards


def _save_shard(shard: dict[str, torch.Tensor], path: Path, weights_format: str) -> None:
    """safetensors with HF's `format: pt` metadata, or a pickled dict like `torch.save(state_dict)`."""
    if weights_format == "safetensors":
        save_file(shard, str(path), metadata={"format": "pt"})
    else:
        torch.save(shard, path)


# ---------------------------------------------------------------------------------------------------
# CLIP vision tower
# ---------------------------------------------------------------------------------------------------

def clip_config() -> CLIPConfig:
    """A `CLIPModel` config with ViT-L/14-336 geometry (layers, patches) and narrow widths."""
    from transformers import CLIPConfig

    text = {"num_hidden_layers": CLIP_TEXT_LAYERS, "hidden_size": CLIP_TEXT_HIDDEN,
            "intermediate_size": CLIP_TEXT_INTERMEDIATE, "num_attention_heads": CLIP_TEXT_HEADS,
            "vocab_size": CLIP_TEXT_VOCAB, "max_position_embeddings": CLIP_TEXT_MAX_POSITIONS,
            "hidden_act": VISION_ACT, "layer_norm_eps": VISION_LAYER_NORM_EPS,
            "projection_dim": CLIP_PROJECTION_DIM, "pad_token_id": PAD_ID, "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID}
    vision = {**TINY_SHAPE.clip_vision_settings(), "projection_dim": CLIP_PROJECTION_DIM}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=CLIP_PROJECTION_DIM)


def write_vision_tower(tower_dir: Path, gen: torch.Generator) -> None:
    """Save a random `CLIPModel` and its PIL image processor like `openai/clip-vit-large-patch14-336`; its
    weights are drawn by `TINY_INIT`, residual writes undamped."""
    from transformers import CLIPModel

    with torch.random.fork_rng(devices=[]):  # transformers' own init must not move the caller's RNG
        model = CLIPModel(clip_config())
    init_peaked(model, gen, TINY_INIT)
    model.save_pretrained(tower_dir)
    clip_image_processor().save_pretrained(tower_dir)


def clip_image_processor() -> CLIPImageProcessorPil:
    """CLIP preprocessing at 336 px: resize shortest edge (bicubic), centre crop, CLIP mean/std."""
    from transformers.image_utils import PILImageResampling
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=PILImageResampling.BICUBIC, image_mean=CLIP_MEAN, image_std=CLIP_STD,
        do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True, do_convert_rgb=True)


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------

def write_tokenizer(model_dir: Path, model_max_length: int = MAX_POSITIONS) -> int:
    """Train the SentencePiece model and write LLaVA's tokenizer files; returns the vocab size."""
    model_bytes = train_sentencepiece()
    (model_dir / "tokenizer.model").write_bytes(model_bytes)
    _write_json(model_dir / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<unk>", "clean_up_tokenization_spaces": False,
        "legacy": False, "model_max_length": model_max_length, "padding_side": "right",
        "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer"})
    _write_json(model_dir / "special_tokens_map.json", {
        "bos_token": _special_token("<s>"), "eos_token": _special_token("</s>"),
        "unk_token": _special_token("<unk>"), "pad_token": "<unk>"})
    return _sentencepiece_vocab_size(model_bytes)


def train_sentencepiece() -> bytes:
    """Llama-style BPE (byte fallback, digits split, no normalisation) on a generated corpus."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=tokenizer_corpus(), model_writer=buffer, model_type="bpe",
        vocab_size=TOKENIZER_VOCAB_SIZE, hard_vocab_limit=False, byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", add_dummy_prefix=True,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, num_threads=1, shuffle_input_sentence=False,
        input_sentence_size=0, minloglevel=2)
    return buffer.getvalue()


def tokenizer_corpus() -> Iterator[str]:
    """Deterministic English-ish lines covering the prompts, questions and OCR words LLaVA sees."""
    rng = random.Random(TOKENIZER_CORPUS_SEED)
    yield from SYSTEM_PROMPTS + PROMPT_SUFFIXES
    for _ in range(TOKENIZER_CORPUS_LINES):
        yield _corpus_line(rng)


def _corpus_line(rng: random.Random) -> str:
    """One conversation-like line: system prompt, question, optional OCR tokens, answer."""
    question = (f"{rng.choice(QUESTION_STARTS)} the {rng.choice(COLOURS)} {rng.choice(OBJECTS)} "
                f"{rng.choice(PLACES)} {rng.choice(OBJECTS)}?")
    ocr = ", ".join(_ocr_token(rng) for _ in range(rng.randint(1, 4)))
    answer = rng.choice(ANSWERS + COLOURS + OBJECTS)
    return (f"{rng.choice(SYSTEM_PROMPTS)} USER: {question} {rng.choice(PROMPT_SUFFIXES)} "
            f"Reference OCR token: {ocr} ASSISTANT: {answer}")


def _ocr_token(rng: random.Random) -> str:
    """An OCR-ish word or number, e.g. `SALE`, `$12.99`, `2019`."""
    kind = rng.random()
    if kind < OCR_NUMBER_SHARE:
        return str(rng.randint(0, MAX_OCR_NUMBER))
    if kind < OCR_NUMBER_SHARE + OCR_PRICE_SHARE:
        return f"${rng.randint(1, MAX_OCR_PRICE)}.{rng.randint(0, 99):02d}"
    return rng.choice(OCR_WORDS)


def _sentencepiece_vocab_size(model_bytes: bytes) -> int:
    """The trainer may stop short of TOKENIZER_VOCAB_SIZE (hard_vocab_limit=False): read the real size."""
    return spm.SentencePieceProcessor(model_proto=model_bytes).get_piece_size()


def _special_token(content: str) -> dict:
    """The AddedToken dict LLaVA's `special_tokens_map.json` uses for <s>, </s> and <unk>."""
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------

def _generator(seed: int, stream: int) -> torch.Generator:
    """One independent RNG per part, so the LLM and the tower do not shift when the other changes."""
    return torch.Generator().manual_seed(seed * SEED_STREAMS + stream)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{what}={value!r}: expected one of {choices}")


def _is_complete(out: Path, settings: dict) -> bool:
    """A checkpoint is complete when its marker (written last) records the same settings."""
    marker = out / COMPLETE_MARKER
    return marker.is_file() and json.loads(marker.read_text()) == settings


def _move_into_place(built: Path, out: Path, settings: dict) -> None:
    """Swap `built` in for `out`; an existing `out` is deleted only when it is one of ours."""
    if out.exists():
        _check_replaceable(out, built)
        shutil.rmtree(out)
    try:
        os.replace(built, out)
    except OSError:
        if not _is_complete(out, settings):  # a concurrent writer finishing first is fine
            raise


def _check_replaceable(out: Path, built: Path) -> None:
    """Refuse to delete a directory that has no marker and holds files a tiny checkpoint never writes."""
    ours = {p.name for p in built.iterdir()}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
    if foreign and not (out / COMPLETE_MARKER).exists():
        raise FileExistsError(f"{out} holds files that are not part of a tiny checkpoint: {foreign}")


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: print the checkpoint directory once it is complete."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write the checkpoint to")
    parser.add_argument("--layout", choices=LAYOUTS, default=None,
                        help="original (LLaVA's) or hf (transformers'); default: original, hf for Qwen")
    parser.add_argument("--arch", choices=ARCHS, default="llava",
                        help="llava: LLaVA-1.5; next: LLaVA-NeXT (v1.6); qwen2_5_vl / qwen2_vl: Qwen (with --layout hf)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights-format", choices=WEIGHTS_FORMATS, default="safetensors")
    args = parser.parse_args(argv)
    if args.layout is None:
        args.layout = "hf" if args.arch in QWEN_ARCHS else "original"
    elif args.arch in QWEN_ARCHS and args.layout != "hf":
        parser.error(f"--arch {args.arch} comes in the transformers layout only: --layout hf")
    print(write_tiny_checkpoint(args.out, args.layout, args.seed, args.weights_format, args.arch))


if __name__ == "__main__":
    main()
