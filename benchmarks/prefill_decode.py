"""Prefill time, decode speed and memory of MustDrop's published settings against no dropping.

All settings run in one process on one model, interleaved per repeat after a warm-up, so that a busy
machine slows them alike; ratios to "none" are what to read. Without `--model-path` the model is a
seeded random LLaVA-1.5 (real CLIP ViT-L/14-336 tower, real 32 decoder layers, narrow decoder).

    python benchmarks/prefill_decode.py [--quick] [--model-path P] [--device cpu|cuda] [--dtype D]
                                        [--repeats N] [--new-tokens N] [--threads N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: the benchmark runs headless (CI, remote GPU boxes)
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/prefill_decode.py` from a plain checkout
    sys.path.insert(0, str(REPO_ROOT))

from llava.constants import IMAGE_TOKEN_INDEX  # noqa: E402
from llava.conversation import get_conv_template  # noqa: E402
from llava.drop.config import DropConfig  # noqa: E402
from llava.drop.generate import SamplingConfig, generate  # noqa: E402
from llava.mm_utils import load_image, process_images, tokenizer_image_token  # noqa: E402
from llava.model.builder import load_pretrained_model, resolve_dtype  # noqa: E402
from llava.model.image_processor import default_clip_image_processor  # noqa: E402

# Published LLaVA-1.5-7B TextVQA settings (target tokens -> thresholds), plus the unpruned baseline.
BASELINE = "none"
SETTINGS: dict[str, DropConfig] = {
    BASELINE: DropConfig.disabled(),
    "192": DropConfig(global_thr=0.001, individual_thr=0.001),
    "128": DropConfig(global_thr=0.0012, individual_thr=0.001),
    "64": DropConfig(global_thr=0.011, individual_thr=0.01),
}

DEMO_IMAGES = REPO_ROOT / "playground" / "data" / "eval" / "demo" / "images"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"
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
PLOT_METRICS = (  # (row key, label) of the ratio bars in the chart
    ("prefill_total_ratio", "prefill time (vision + LLM)"),
    ("llm_prefill_ratio", "LLM prefill time"),
    ("decode_tok_s_ratio", "decode tokens/s"),
    ("kv_cache_ratio", "KV-cache bytes"),
    ("peak_memory_ratio", "peak extra memory"),
    ("avg_vision_tokens_ratio", "avg vision tokens"),
)


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


def demo_pixels(image_processor) -> torch.Tensor:
    """The first demo image, preprocessed as LLaVA-1.5 does (pad to square, CLIP at 336 px)."""
    image = load_image(sorted(DEMO_IMAGES.glob("*.png"))[0])
    return process_images([image], image_processor)


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
    return Workload(model, synthetic_input_ids(seed), demo_pixels(default_clip_image_processor()), description)


def checkpoint_workload(model_path: str, device: str, dtype: torch.dtype) -> Workload:
    """A real checkpoint with the vicuna_v1 prompt and the first demo image."""
    tokenizer, model, image_processor, _ = load_pretrained_model(model_path, device=device, torch_dtype=dtype)
    conv = get_conv_template("vicuna_v1")
    conv.append_message(conv.roles[0], "<image>\n" + QUESTION)
    conv.append_message(conv.roles[1], None)
    input_ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")
    return Workload(model.eval(), input_ids, demo_pixels(image_processor), f"checkpoint {model_path}")


def run_once(work: Workload, drop: DropConfig, new_tokens: int) -> dict:
    """One generation with EOS disabled, so that every setting decodes exactly `new_tokens` tokens."""
    device = work.model.lm_head.weight.device
    output = generate(work.model, work.input_ids.to(device), work.pixel_values.to(device),
                      SamplingConfig(max_new_tokens=new_tokens, temperature=0), eos_token_ids=set(), drop=drop)
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


def peak_extra_memory(work: Workload, drop: DropConfig, new_tokens: int) -> int:
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


def cpu_peak_extra_memory(work: Workload, drop: DropConfig, new_tokens: int) -> int:
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


def measure(work: Workload, repeats: int, new_tokens: int) -> dict[str, list[dict]]:
    """Warm up every setting, then time them interleaved per repeat; memory in one extra pass each."""
    for drop in SETTINGS.values():
        run_once(work, drop, new_tokens)
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for _ in range(repeats):
        for name, drop in SETTINGS.items():
            runs[name].append(run_once(work, drop, new_tokens))
    for name, drop in SETTINGS.items():
        peak = peak_extra_memory(work, drop, new_tokens)
        for run in runs[name]:
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


def markdown_table(rows: list[dict]) -> str:
    """Absolute medians with the ratio to "none" in parentheses."""
    columns = [
        ("prefill (vision+LLM) s", "prefill_total_s", "prefill_total_ratio", "{:.3f}"),
        ("vision s", "vision_s", "vision_ratio", "{:.3f}"),
        ("LLM prefill s", "llm_prefill_s", "llm_prefill_ratio", "{:.3f}"),
        ("decode tok/s", "decode_tok_s", "decode_tok_s_ratio", "{:.1f}"),
        ("KV cache MiB", "kv_cache_bytes", "kv_cache_ratio", "{:.2f}"),
        ("peak extra MiB", "peak_memory_bytes", "peak_memory_ratio", "{:.1f}"),
        ("avg vision tokens", "avg_vision_tokens", "avg_vision_tokens_ratio", "{:.1f}"),
    ]
    header = ["setting", *(c[0] for c in columns), "tokens after merge", "FLOPs ratio", "scoring share"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [row["setting"]]
        for _, key, ratio, fmt in columns:
            value = row[key] / MIB if key.endswith("bytes") else row[key]
            cells.append(f"{fmt.format(value)} ({row[ratio]:.2f}x)")
        cells += [f"{row['vision_tokens_after_merge']:.0f}", f"{row['flops_ratio']:.3f}", f"{100 * row['scoring_share']:.2f} %"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], title: str, path: Path) -> None:
    """Grouped bars: one group per metric, one bar per setting, each labelled with its ratio."""
    fig, ax = plt.subplots(figsize=(12, 5.5))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs = [m + (i - (len(rows) - 1) / 2) * width for m in range(len(PLOT_METRICS))]
        values = [row[key] for key, _ in PLOT_METRICS]
        label = "none (no dropping)" if row["setting"] == BASELINE else f"MustDrop {row['setting']}"
        bars = ax.bar(xs, values, width, label=f"{label}: {row['avg_vision_tokens']:.0f} avg vision tokens")
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=2)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(PLOT_METRICS)), [label for _, label in PLOT_METRICS])
    ax.set_xlabel("metric (lower is better, except decode tokens/s)")
    ax.set_ylabel('ratio to "none" (median over repeats)')
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_ylim(0, 1.2 * max(max(row[key] for key, _ in PLOT_METRICS) for row in rows))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="narrow random model, 1 repeat, 4 new tokens (CI)")
    parser.add_argument("--model-path", help="a LLaVA-1.5 checkpoint; default: a random model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", help="float32, float16 or bfloat16; default fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--repeats", type=int, help="timed runs per setting (default 3, quick 1)")
    parser.add_argument("--new-tokens", type=int, help="tokens decoded per run (default 32, quick 4)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="torch intra-op threads (default 1: on a busy machine more threads oversubscribe "
                             "the cores and timings swing by 10x or more)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.new_tokens = args.new_tokens or (4 if args.quick else 32)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2: the first token comes from prefill, decode needs one more")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, print the table and write results.json, results.md and results.png."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, args.device)
    started = time.perf_counter()
    if args.model_path:
        work = checkpoint_workload(args.model_path, args.device, dtype)
    else:
        work = random_workload(QUICK_SHAPE if args.quick else FULL_SHAPE, args.seed, args.device, dtype)
    rows = summarize(measure(work, args.repeats, args.new_tokens))
    memory_note = ("torch.cuda.max_memory_allocated minus allocated before" if args.device.startswith("cuda")
                   else "running sum of torch CPU allocator events (torch.profiler), minus allocated before")
    header = (f"Model: {work.description}.\n\nDevice {args.device} ({platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads), dtype {dtype}, {args.new_tokens} new tokens (EOS off), "
              f"median of {args.repeats} interleaved repeat(s) after a warm-up. Ratios to \"none\" in "
              f"parentheses. Peak extra memory: {memory_note}, one extra run per setting. Scoring share: "
              f"stage-1 merge + key set + stage-2 scoring, over vision + LLM prefill time.")
    table = markdown_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(f"{header}\n\n{table}\n")
    (args.out / "results.json").write_text(json.dumps(
        {"header": header, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2) + "\n")
    title = "MustDrop vs no dropping: " + ("random model" if not args.model_path else args.model_path)
    plot(rows, f"{title} ({args.device}, {dtype}, {args.new_tokens} new tokens)", args.out / "results.png")
    print(header + "\n\n" + table)
    print(f"\nwrote {args.out}/results.{{md,json,png}} in {time.perf_counter() - started:.1f} s")
    return rows


if __name__ == "__main__":
    main()
