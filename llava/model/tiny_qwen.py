"""Tiny Qwen2.5-VL and Qwen2-VL checkpoints: random weights, the real architecture, a byte-level BPE
tokenizer trained here with Qwen's special tokens and chat template, and Qwen's image processor settings,
written by transformers' own `save_pretrained` in the layout the hub checkpoints use.

Like the tiny LLaVA checkpoints (`llava.model.tiny`), they let tests and the demo run every code path a real
`Qwen/Qwen2.5-VL-7B-Instruct` takes, on a CPU, with nothing downloaded. The decoder has Qwen2.5-VL-7B's
depth (28 layers), so dropping layers sit where they sit on the real model; widths are small.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from llava.model.qwen import QWEN2_5_VL_MODEL_TYPE as QWEN2_5_VL

# Decoder: Qwen2.5-VL-7B's depth, tiny widths. head_dim 16 -> 8 rotary frequencies split over (t, h, w).
LLM_LAYERS = 28
LLM_HIDDEN = 64
LLM_INTERMEDIATE = 176
LLM_HEADS = 4
LLM_KV_HEADS = 2
MROPE_SECTION = [2, 3, 3]
MAX_POSITIONS = 4096
ROPE_THETA = 1000000.0
# Vision tower: 14 px patches, 2 frames per temporal patch, 2x2 patches merged into one decoder token.
VISION_DEPTH = 4
VISION_HIDDEN = 64
VISION_INTERMEDIATE = 128
VISION_HEADS = 4
FULL_ATTENTION_BLOCKS = [1, 3]  # Qwen2.5-VL: window attention except these blocks
WINDOW_SIZE = 112
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
# Images resize to within [MIN_PIXELS, MAX_PIXELS] (multiples of 28 px): 4 to 256 decoder tokens each.
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 256 * 28 * 28
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

TOKENIZER_VOCAB_SIZE = 1000
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
DEFAULT_SYSTEM = "You are a helpful assistant."
# Qwen's chat format: a default system turn, each turn framed by <|im_start|>role ... <|im_end|>, an image
# as <|vision_start|><|image_pad|><|vision_end|> (the processor repeats <|image_pad|> once per token).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

EMBED_STD = 1.0  # token embeddings
LM_HEAD_STD = 0.5  # a peaked next-token distribution: greedy answers do not hinge on rounding
BYTE_PIECES = 256  # the byte alphabet opens the vocabulary
BYTE_ROW_SCALE = 0.25  # single bytes rarely win: greedy answers decode to readable words
QK_GAIN = 2.0  # sharper attention, so answers depend on the image and the question
BIAS_STD = 0.02


def write_qwen_checkpoint(model_dir: Path, arch: str, seed: int) -> None:
    """Every file of a tiny `arch` checkpoint in `model_dir` (which must not exist yet)."""
    model_dir.mkdir(parents=True)
    tokenizer = train_tokenizer()
    tokenizer.save_pretrained(model_dir)
    image_processor().save_pretrained(model_dir)
    config = qwen_config(arch, tokenizer)
    model_class = Qwen2_5_VLForConditionalGeneration if arch == QWEN2_5_VL else Qwen2VLForConditionalGeneration
    model = model_class(config)
    draw_weights(model, torch.Generator().manual_seed(seed))
    model.generation_config.update(eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                                 tokenizer.convert_tokens_to_ids("<|endoftext|>")],
                                   pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(model_dir, max_shard_size="1MB")


def qwen_config(arch: str, tokenizer) -> Qwen2VLConfig | Qwen2_5_VLConfig:
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = {"vocab_size": len(tokenizer), "hidden_size": LLM_HIDDEN, "intermediate_size": LLM_INTERMEDIATE,
            "num_hidden_layers": LLM_LAYERS, "num_attention_heads": LLM_HEADS, "num_key_value_heads": LLM_KV_HEADS,
            "max_position_embeddings": MAX_POSITIONS, "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA, "mrope_section": MROPE_SECTION},
            "bos_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>")}
    vision = {"hidden_size": VISION_HIDDEN, "num_heads": VISION_HEADS, "patch_size": PATCH_SIZE,
              "spatial_merge_size": MERGE_SIZE, "temporal_patch_size": TEMPORAL_PATCH_SIZE}
    if arch == QWEN2_5_VL:
        vision.update(depth=VISION_DEPTH, intermediate_size=VISION_INTERMEDIATE, out_hidden_size=LLM_HIDDEN,
                      fullatt_block_indexes=FULL_ATTENTION_BLOCKS, window_size=WINDOW_SIZE)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    vision.update(depth=VISION_DEPTH, embed_dim=VISION_HIDDEN, mlp_ratio=VISION_INTERMEDIATE // VISION_HIDDEN)
    vision["hidden_size"] = LLM_HIDDEN  # Qwen2-VL's vision hidden_size is the merger's output width
    return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)


def draw_weights(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Seeded weights (the same seed gives the same files anywhere): norms at one, small biases,
    1/sqrt(fan-in) matrices with sharper query/key projections, unit-scale token embeddings."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(_draw(name, param, gen))


def _draw(name: str, param: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if "norm" in name or name.endswith("ln_q.weight"):
        return torch.ones_like(param) if name.endswith("weight") else torch.zeros_like(param)
    if name.endswith("bias"):
        return torch.randn(param.shape, generator=gen) * BIAS_STD
    if name.endswith("embed_tokens.weight"):
        return torch.randn(param.shape, generator=gen) * EMBED_STD
    if name.startswith("lm_head"):
        rows = torch.randn(param.shape, generator=gen) * LM_HEAD_STD
        rows[:BYTE_PIECES] *= BYTE_ROW_SCALE
        return rows
    gain = QK_GAIN if any(part in name for part in ("q_proj", "k_proj")) else 1.0
    fan_in = math.prod(param.shape[1:]) if param.dim() > 1 else param.shape[0]
    return torch.randn(param.shape, generator=gen) * gain / math.sqrt(fan_in)


def train_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2/Qwen style: any text encodes, nothing is unknown) on the tiny LLaVA corpus,
    with Qwen's special tokens after the learned pieces and its chat template."""
    from llava.model.tiny import tokenizer_corpus  # lazy: tiny.py imports sentencepiece

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB_SIZE, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(tokenizer_corpus(), trainer)
    bpe.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=MAX_POSITIONS, chat_template=CHAT_TEMPLATE,
                                   clean_up_tokenization_spaces=False)


def image_processor() -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH_SIZE,
                                    merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE,
                                    image_mean=CLIP_MEAN, image_std=CLIP_STD)
