"""The speed benchmarks' model, prompt and measurement, shared by `prefill_decode` and `compare`.

Without a checkpoint the model is a seeded random LLaVA-1.5 (real CLIP ViT-L/14-336 tower, real 32
decoder layers, narrow decoder) whose attention is peaked like a trained one's; with one, the prompt is
encoded as the answering CLIs encode it. One generation is timed with EOS off, so that every setting
decodes the same number of tokens, and its peak extra memory is measured in one more run.
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from llava.constants import IMAGE_TOKEN_INDEX
from llava.drop.generate import SamplingConfig, generate
from llava.drop.methods import DropConfig, DropMethod, as_method
from llava.mm_utils import load_image, process_images
from llava.model.builder import load_pretrained_model
from llava.model.image_processor import default_clip_image_processor
from llava.model.inputs import encode_question

CHECKOUT = Path(__file__).resolve().parents[2]  # the repository this package runs from (pip install -e .)
DEMO_IMAGES = CHECKOUT / "playground" / "data" / "eval" / "demo" / "images"
RESULTS_DIR = CHECKOUT / "benchmarks" / "results"
BASELINE = "none"  # the unpruned model's setting, which every ratio divides by
CONV_MODE = "vicuna_v1"

QUESTION = "What is written on the sign in the picture? Answer the question using a single word or phrase."

# Synthetic prompt for the random model: [BOS][system][<image>][question + "ASSISTANT:"].
BOS_ID = 1
SYSTEM_TOKENS = 35  # vicuna_v1's system prompt and "USER:" in the Llama tokenizer
TEXT_TOKENS = 60  # a TextVQA question with OCR tokens and the answer-format suffix
FIRST_WORD_ID = 259  # skip <unk>, <s>, </s> and the 256 byte pieces

# Random-model geometry shared by both sizes: the real LLaVA-1.5 layer counts, vocabulary and image.
IMAGE_SIZE = 336
PATCH_SIZE = 14
VISION_LAYERS = 24
LLM_LAYERS = 32
VOCAB_SIZE = 32000
MAX_POSITIONS = 4096
# Initialisation: fan-in scaled normals. A gain on q/k sharpens attention (std 0.02 everywhere gives
# near-uniform rows, and MustDrop's thresholds then drop almost nothing); small embeddings keep flat
# image regions similar after CLIP layer 0 so that the spatial merge sees realistic similarities.
# With QK_GAIN 4 (attention logits of std ~16) the settings 192 / 128 / 64 keep 196 / 196 / 136
# layer-averaged vision tokens on the quick model and 284 / 284 / 220 on the full one (more heads
# average out); at gain 2 the quick model keeps 360 / 360 / 257, barely below the merge's 360.
QK_GAIN = 4.0
EMBED_STD = 0.02
TOKEN_EMBED_STD = 1.0
BIAS_STD = 0.02
QK_NAMES = ("q_proj.weight", "k_proj.weight")
RESIDUAL_WRITE_NAMES = ("o_proj.weight", "down_proj.weight", "out_proj.weight", "fc2.weight")

DEFAULT_THREADS = 1
MIB = 2**20
PROFILER_MEMORY_EVENT = "[memory]"


@dataclass(frozen=True)
class ModelShape:
    """Widths of the random model; layer counts and token counts are always LLaVA-1.5's."""

    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    llm_hidden: int
    llm_intermediate: int
    llm_heads: int
    llm_kv_heads: int

    def describe(self) -> str:
        return (f"CLIP {VISION_LAYERS} layers x {self.vision_hidden} wide ({self.vision_heads} heads, "
                f"MLP {self.vision_intermediate}), {IMAGE_SIZE} px / patch {PATCH_SIZE}; mlp2x_gelu projector; "
                f"Llama {LLM_LAYERS} layers x {self.llm_hidden} wide ({self.llm_heads} heads, "
                f"{self.llm_kv_heads} KV heads, MLP {self.llm_intermediate}), vocab {VOCAB_SIZE}")


# Real ViT-L/14-336 tower; decoder at 1/8 of Vicuna-7B's width so that it runs on two CPU cores.
FULL_SHAPE = ModelShape(1024, 4096, 16, 512, 1376, 8, 8)
QUICK_SHAPE = ModelShape(128, 512, 4, 128, 344, 4, 4)


@dataclass
class Workload:
    """A model and one prompt to generate from."""

    model: LlavaForConditionalGeneration
    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    description: str


def random_llava(shape: ModelShape, seed: int, device: str, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    """A LLaVA-1.5-shaped model with seeded weights whose attention is peaked like a trained one's."""
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
        num_attention_heads=shape.vision_heads, num_hidden_layers=VISION_LAYERS,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_act="quick_gelu")
    text = LlamaConfig(
        hidden_size=shape.llm_hidden, intermediate_size=shape.llm_intermediate,
        num_attention_heads=shape.llm_heads, num_key_value_heads=shape.llm_kv_heads,
        num_hidden_layers=LLM_LAYERS, vocab_size=VOCAB_SIZE, max_position_embeddings=MAX_POSITIONS)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         image_token_id=VOCAB_SIZE)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    init_peaked(model, torch.Generator().manual_seed(seed))
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def init_peaked(model: nn.Module, gen: torch.Generator) -> None:
    """Overwrite every parameter from `gen` (see QK_GAIN and the other init constants)."""
    num_layers = {"vision_tower": VISION_LAYERS, "language_model": LLM_LAYERS}
    for name, param in model.named_parameters():
        depth = next((n for part, n in num_layers.items() if part in name), LLM_LAYERS)
        param.copy_(initial_value(name, param, depth, gen))


def initial_value(name: str, param: torch.Tensor, depth: int, gen: torch.Generator) -> torch.Tensor:
    """Norms 1/0, small embeddings and biases, fan-in scaled weights with q/k and residual gains."""
    if "norm" in name:  # CLIP pre_layrnorm / layer_norm*, Llama *_layernorm and final norm
        return torch.ones_like(param) if name.endswith("weight") else torch.zeros_like(param)
    if "embed_tokens" in name:
        return normal(param, TOKEN_EMBED_STD, gen)
    if "embedding" in name:  # CLIP class, patch and position embeddings
        return normal(param, EMBED_STD, gen)
    if name.endswith("bias"):
        return normal(param, BIAS_STD, gen)
    gain = QK_GAIN if name.endswith(QK_NAMES) else 1.0
    if name.endswith(RESIDUAL_WRITE_NAMES):
        gain = 1.0 / math.sqrt(2 * depth)  # keeps the residual stream bounded over all layers
    return normal(param, gain / math.sqrt(param[0].numel()), gen)


def normal(param: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(param.shape, generator=gen) * std


def first_demo_image() -> Image.Image:
    return load_image(sorted(DEMO_IMAGES.glob("*.png"))[0])


def synthetic_input_ids(seed: int) -> torch.Tensor:
    """[BOS][system][<image>][text] with seeded word-piece ids: the layout of a LLaVA-1.5 prompt."""
    gen = torch.Generator().manual_seed(seed)
    system = torch.randint(FIRST_WORD_ID, VOCAB_SIZE, (SYSTEM_TOKENS,), generator=gen)
    text = torch.randint(FIRST_WORD_ID, VOCAB_SIZE, (TEXT_TOKENS,), generator=gen)
    ids = torch.cat([torch.tensor([BOS_ID]), system, torch.tensor([IMAGE_TOKEN_INDEX]), text])
    return ids[None]


def random_workload(shape: ModelShape, seed: int, device: str, dtype: torch.dtype) -> Workload:
    model = random_llava(shape, seed, device, dtype)
    description = (f"random LLaVA-1.5-shaped model (seed {seed}): {shape.describe()}. Init: fan-in "
                   f"scaled normals, q/k gain {QK_GAIN} (CLIP and Llama) for peaked attention, residual writes scaled "
                   f"1/sqrt(2 x layers), CLIP embeddings std {EMBED_STD}. Prompt: BOS + {SYSTEM_TOKENS} "
                   f"system ids + <image> + {TEXT_TOKENS} text ids; image: first demo image")
    pixel_values = process_images([first_demo_image()], default_clip_image_processor())  # LLaVA-1.5: pad, 336 px
    return Workload(model, synthetic_input_ids(seed), pixel_values, description)


def checkpoint_workload(model_path: str, device: str, dtype: torch.dtype) -> Workload:
    """A real checkpoint with the vicuna_v1 prompt and the first demo image, encoded as the CLIs do."""
    tokenizer, model, image_processor, _ = load_pretrained_model(model_path, device=device, torch_dtype=dtype)
    inputs = encode_question(QUESTION, first_demo_image(), model, tokenizer, image_processor, CONV_MODE)
    return Workload(model.eval(), inputs.input_ids, inputs.pixel_values, f"checkpoint {model_path}")


def load_workload(args: argparse.Namespace, dtype: torch.dtype) -> Workload:
    """The checkpoint of `--model-path`, else the random model (narrow with `--quick`)."""
    if args.model_path:
        return checkpoint_workload(args.model_path, args.device, dtype)
    return random_workload(QUICK_SHAPE if args.quick else FULL_SHAPE, args.seed, args.device, dtype)


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The flags both benchmarks take: which model, where, in which precision."""
    parser.add_argument("--model-path", help="a LLaVA-1.5 checkpoint; default: a random model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", help="float32, float16 or bfloat16; default fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="torch intra-op threads (default 1: on a busy machine more threads oversubscribe "
                             "the cores and timings swing by 10x or more)")
    parser.add_argument("--seed", type=int, default=0)


def memory_note(device: str) -> str:
    """How peak extra memory was measured on `device`, for the results header."""
    if device.startswith("cuda"):
        return "torch.cuda.max_memory_allocated minus allocated before"
    return "running sum of torch CPU allocator events (torch.profiler), minus allocated before"


def run_once(work: Workload, drop: DropConfig | DropMethod, new_tokens: int) -> dict:
    """One generation with EOS disabled, so that every setting decodes exactly `new_tokens` tokens."""
    device = work.model.lm_head.weight.device
    output = generate(work.model, work.input_ids.to(device), work.pixel_values.to(device),
                      SamplingConfig(max_new_tokens=new_tokens, temperature=0), eos_token_ids=set(), drop=as_method(drop))
    stats = output.stats
    prefill_total = stats["vision_seconds"] + stats["prefill_seconds"]
    decoded = stats["new_tokens"] - 1  # the first token comes out of prefill
    return {
        "vision_s": stats["vision_seconds"],
        "llm_prefill_s": stats["prefill_seconds"],
        "prefill_total_s": prefill_total,
        "decode_tok_s": decoded / stats["decode_seconds"] if decoded else math.nan,
        "scoring_share": stats["scoring_seconds"] / prefill_total,
        "kv_cache_bytes": stats["kv_cache_bytes"],
        "avg_vision_tokens": stats["avg_vision_tokens"],
        "vision_tokens_after_merge": stats["vision_tokens"],
        "flops_ratio": stats["prefill_flops_ratio"],
    }


def peak_extra_memory(work: Workload, drop: DropConfig | DropMethod, new_tokens: int) -> int:
    """Peak bytes allocated during one generation on top of what was allocated before it (weights).

    CUDA: the caching allocator's own peak counter. CPU: torch's CPU allocator reports every
    allocation and free to the profiler; the running sum of those events gives the same quantity.
    """
    device = work.model.lm_head.weight.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run_once(work, drop, new_tokens)
        return torch.cuda.max_memory_allocated(device) - before
    return cpu_peak_extra_memory(work, drop, new_tokens)


def cpu_peak_extra_memory(work: Workload, drop: DropConfig | DropMethod, new_tokens: int) -> int:
    """Replay the profiler's raw allocator events (+bytes on alloc, -bytes on free) in time order.

    The public `key_averages()` only sums memory per operator, so the peak needs the raw event list.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run_once(work, drop, new_tokens)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == PROFILER_MEMORY_EVENT]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def measure(work: Workload, settings: dict[str, DropConfig | DropMethod], repeats: int,
            new_tokens: int) -> dict[str, list[dict]]:
    """Time the (warmed-up) settings interleaved per repeat, so that a busy machine slows them alike;
    peak memory in one extra pass each."""
    runs: dict[str, list[dict]] = {label: [] for label in settings}
    for _ in range(repeats):
        for label, drop in settings.items():
            runs[label].append(run_once(work, drop, new_tokens))
    for label, drop in settings.items():
        peak = peak_extra_memory(work, drop, new_tokens)
        for run in runs[label]:
            run["peak_memory_bytes"] = peak
    return runs


RATIO_OF = {  # ratio column -> the median it divides by the baseline's
    "prefill_total_ratio": "prefill_total_s",
    "vision_ratio": "vision_s",
    "llm_prefill_ratio": "llm_prefill_s",
    "decode_tok_s_ratio": "decode_tok_s",
    "kv_cache_ratio": "kv_cache_bytes",
    "peak_memory_ratio": "peak_memory_bytes",
    "avg_vision_tokens_ratio": "avg_vision_tokens",
}


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """Per setting: the median of every metric over repeats, and its ratio to the baseline's median."""
    medians = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    rows = []
    for name, values in medians.items():
        ratios = {ratio: values[key] / medians[BASELINE][key] for ratio, key in RATIO_OF.items()}
        rows.append({"setting": name, **values, **ratios})
    return rows
