"""The speed benchmarks' model, prompt and measurement, shared by `prefill_decode` and `compare`.

Without a checkpoint the model is a seeded random LLaVA-1.5 (or, with `next_model`, LLaVA-NeXT) of one
of `SHAPES` (real layer counts and token counts, chosen widths) whose attention is peaked like a
trained one's; with one, the prompt is encoded as the answering CLIs encode it. One generation is
timed with EOS off, so that every setting decodes the same number of tokens, and its peak extra
memory is measured in one more run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

from llava.constants import IMAGE_TOKEN_INDEX
from llava.drop.generate import SamplingConfig, generate
from llava.drop.methods import DropConfig, DropMethod, as_method
from llava.mm_utils import load_image
from llava.model.anyres import anyres_grid
from llava.model.builder import check_device, load_pretrained_model, resolve_dtype
from llava.model.image_processor import default_clip_image_processor
from llava.model.inputs import encode_question, image_inputs
from llava.model.original_layout import swap_pairs
from llava.model.qwen import QWEN_CONV_MODE, is_qwen
from llava.model.random_llava import (
    BOS_ID,
    FIRST_WORD_ID,
    IMAGE_SIZE,
    NEXT_MERGE_TYPE,
    PATCH_SIZE,
    VOCAB_SIZE,
    ModelShape,
    random_llava,
)
from llava.model.random_weights import BENCHMARK_INIT, EMBED_STD
from llava.output_paths import check_output_folder

CHECKOUT = Path(__file__).resolve().parents[2]  # the repository this package runs from (pip install -e .)
DEMO_IMAGES = CHECKOUT / "playground" / "data" / "eval" / "demo" / "images"
RESULTS_DIR = CHECKOUT / "benchmarks" / "results"
BASELINE = "none"  # the unpruned model's setting, which every ratio divides by
CONV_MODE = "vicuna_v1"

QUESTION = "What is written on the sign in the picture? Answer the question using a single word or phrase."

# Synthetic prompt for the random model: [BOS][system][<image>][question + "ASSISTANT:"].
SYSTEM_TOKENS = 35  # vicuna_v1's system prompt and "USER:" in the Llama tokenizer
TEXT_TOKENS = 60  # a TextVQA question with OCR tokens and the answer-format suffix

# LLaVA-NeXT's image: a square that the 2 x 2 grid fits exactly, so that every view is used and
# spatial_unpad removes nothing.
NEXT_IMAGE_SIDE = 672
# The NeXT image: black, with one strip of seeded noise per quadrant. MustDrop's stage 1 merges the 3 x 3
# patch windows (42 px in a crop, 84 px of the image in the squashed base view) that are flat. A strip
# of 252 x 84 px placed on multiples of 84 px covers 6 x 2 windows of its crop and 3 x 1 windows of
# the base view (x 4 strips), so every view keeps 12 of its 64 windows: 5 x (52 merged + 12 x 9) = 800
# tokens after the merge at every model shape. That puts the paper's 640 / 320 / 160 all within reach
# of the thresholds; a photo upscaled to 672 px merges to ~600 tokens (640 out of reach), a detailed
# one keeps most of 2880 (160 out of reach: layers 0-2 and the 8 % key set alone average more).
STRIP_SIZE = (252, 84)  # (width, height)
STRIP_OFFSET = (84, 168)  # (left, top) inside each 336 px quadrant

DEFAULT_THREADS = 1
MIB = 2**20
PROFILER_MEMORY_EVENT = "[memory]"


SHAPES = {  # random LLaVA-1.5 widths (`ModelShape`): its layer counts and token counts are always the real ones
    # Real ViT-L/14-336 tower; decoder at 1/8 of Vicuna-7B's width so that it runs on two CPU cores.
    "narrow": ModelShape(1024, 4096, 16, 512, 1376, 8, 8),
    "quick": ModelShape(128, 512, 4, 128, 344, 4, 4),  # CI: every width narrowed to 128
    # Every width of LLaVA-1.5-7B divided by 4 (head size kept: CLIP 64, Llama 128).
    "7b-proportioned": ModelShape(256, 1024, 4, 1024, 2752, 8, 8),
    # LLaVA-1.5-7B's real widths: CLIP ViT-L/14-336 and Vicuna-7B (multi-head attention, no GQA).
    "7b": ModelShape(1024, 4096, 16, 4096, 11008, 32, 32),
}
DEFAULT_SHAPE = "7b-proportioned"  # the vision:decoder cost split of LLaVA-1.5-7B, on a CPU
QUICK_SHAPE = "quick"  # what --quick picks when --shape is not given


@dataclass
class Workload:
    """A model and one prompt to generate from (`image_sizes`: LLaVA-NeXT's [[height, width]])."""

    model: LlavaForConditionalGeneration | LlavaNextForConditionalGeneration
    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    description: str
    image_sizes: torch.Tensor | None = None


def first_demo_image() -> Image.Image:
    return load_image(sorted(DEMO_IMAGES.glob("*.png"))[0])


def next_image(seed: int) -> Image.Image:
    """The NeXT prompt's image (see STRIP_SIZE): it fills the 2 x 2 grid and merges to the same count
    at every shape."""
    gen = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", (NEXT_IMAGE_SIDE, NEXT_IMAGE_SIDE))
    quadrant = NEXT_IMAGE_SIDE // 2
    for top in range(0, NEXT_IMAGE_SIDE, quadrant):
        for left in range(0, NEXT_IMAGE_SIDE, quadrant):
            noise = torch.randint(0, 256, (STRIP_SIZE[1], STRIP_SIZE[0], 3), generator=gen, dtype=torch.uint8)
            image.paste(Image.fromarray(noise.numpy()), (left + STRIP_OFFSET[0], top + STRIP_OFFSET[1]))
    return image


@dataclass(frozen=True)
class NextTokenCounts:
    """Vision tokens of one NeXT image, worked out from the config (before anything runs)."""

    grid: tuple[int, int]  # (columns, rows) of crops
    images: int  # the base image and the crops
    flat: int  # every view's patch tokens one after the other: MustDrop's (the reference's) layout
    spatial: int  # the model's own spatial_unpad layout: base image, crop grid rows + one newline each

    def describe(self) -> str:
        per_image = self.flat // self.images
        rows = self.grid[1] * IMAGE_SIZE // PATCH_SIZE
        return (f"{self.grid[0]} x {self.grid[1]} crop grid, 1 + {self.images - 1} images x {per_image} = "
                f"{self.flat} flat tokens (MustDrop's layout); {per_image} + {rows} rows x "
                f"({self.grid[0] * IMAGE_SIZE // PATCH_SIZE} + 1 newline) = {self.spatial} in the model's "
                f"{NEXT_MERGE_TYPE} layout (nothing unpadded)")


def next_token_counts(config: LlavaNextConfig, image: Image.Image) -> NextTokenCounts:
    """The flat and spatial_unpad counts of an image that fills its grid (no unpadding)."""
    columns, rows = anyres_grid(image.size, swap_pairs(config.image_grid_pinpoints), IMAGE_SIZE)
    side = IMAGE_SIZE // PATCH_SIZE
    per_image = side * side
    images = 1 + columns * rows
    return NextTokenCounts((columns, rows), images, images * per_image,
                           per_image + rows * side * (columns * side + 1))


def synthetic_input_ids(seed: int) -> torch.Tensor:
    """[BOS][system][<image>][text] with seeded word-piece ids: the layout of a LLaVA-1.5 prompt."""
    system, text = synthetic_text_ids(seed, VOCAB_SIZE, (SYSTEM_TOKENS, TEXT_TOKENS))
    ids = torch.cat([torch.tensor([BOS_ID]), system, torch.tensor([IMAGE_TOKEN_INDEX]), text])
    return ids[None]


def synthetic_text_ids(seed: int, vocab_size: int, lengths: tuple[int, ...]) -> list[torch.Tensor]:
    """Seeded word-piece ids (no special or byte tokens), one run per length."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(FIRST_WORD_ID, vocab_size, (length,), generator=gen) for length in lengths]


def random_workload(shape_name: str, seed: int, device: str, dtype: torch.dtype, next_model: bool = False) -> Workload:
    """The seeded random model at `shape_name` with the synthetic prompt: LLaVA-1.5 with the first demo
    image padded to 336 px, or LLaVA-NeXT with `next_image`, which fills its 2 x 2 grid."""
    model = random_llava(SHAPES[shape_name], BENCHMARK_INIT, seed, device, dtype, next_model)
    image = next_image(seed) if next_model else first_demo_image()
    pixel_values, image_sizes = image_inputs(image, model.config, default_clip_image_processor())
    arch = "LLaVA-NeXT (v1.6)" if next_model else "LLaVA-1.5"
    description = (f"random {arch}-shaped model, shape {shape_name!r} (seed {seed}): {SHAPES[shape_name].describe()}. "
                   f"Init: fan-in scaled normals, q/k gain {BENCHMARK_INIT.qk_gain} (CLIP and Llama) for peaked "
                   f"attention, residual writes scaled 1/sqrt(2 x layers), CLIP embeddings std {EMBED_STD}. Prompt: "
                   f"BOS + {SYSTEM_TOKENS} system ids + <image> + {TEXT_TOKENS} text ids; image: "
                   f"{image_note(image, model.config)}")
    return Workload(model, synthetic_input_ids(seed), pixel_values, description, image_sizes)


def image_note(image: Image.Image, config: LlavaConfig | LlavaNextConfig) -> str:
    """Which image the prompt shows and, on NeXT, its grid and token counts."""
    if not isinstance(config, LlavaNextConfig):
        return "first demo image"
    return (f"{image.width} x {image.height} px, black with a {STRIP_SIZE[0]} x {STRIP_SIZE[1]} px noise strip per "
            f"quadrant (MustDrop's stage 1 keeps 12 of 64 windows per view); grid pinpoints [h, w] "
            f"{config.image_grid_pinpoints}, {next_token_counts(config, image).describe()}")


def checkpoint_workload(model_path: str, device: str, dtype: torch.dtype, next_model: bool = False,
                        seed: int = 0) -> Workload:
    """A real checkpoint with the vicuna_v1 prompt and the first demo image (NeXT: `next_image`),
    encoded as the CLIs do."""
    tokenizer, model, image_processor, _ = load_pretrained_model(model_path, device=device, torch_dtype=dtype)
    image = next_image(seed) if next_model else first_demo_image()
    conv_mode = QWEN_CONV_MODE if is_qwen(model) else CONV_MODE
    inputs = encode_question(QUESTION, image, model, tokenizer, image_processor, conv_mode)
    return Workload(model.eval(), inputs.input_ids, inputs.pixel_values, f"checkpoint {model_path}",
                    inputs.image_sizes)


def shape_name(args: argparse.Namespace) -> str:
    """`--shape`, else the quick shape with `--quick`, else the default."""
    return args.shape or (QUICK_SHAPE if args.quick else DEFAULT_SHAPE)


def load_workload(args: argparse.Namespace, dtype: torch.dtype, next_model: bool = False, qwen: bool = False) -> Workload:
    """The checkpoint of `--model-path`, else the random model at `shape_name(args)` (Qwen2.5-VL's with `qwen`)."""
    if args.model_path:
        return checkpoint_workload(args.model_path, args.device, dtype, next_model, args.seed)
    if qwen:
        from llava.bench.qwen_model import qwen_workload  # it imports this module

        return qwen_workload(shape_name(args), args.seed, args.device, dtype)
    return random_workload(shape_name(args), args.seed, args.device, dtype, next_model)


def check_decode_length(parser: argparse.ArgumentParser, tokens: list[int], flag: str) -> None:
    """Every run must decode at least one token after the first, which comes out of prefill."""
    if min(tokens) < 2:
        parser.error(f"{flag} must be >= 2: the first token comes from prefill, decode needs one more")


def start_run(args: argparse.Namespace) -> tuple[torch.dtype, float]:
    """Check the device and the output folder (before minutes of measuring), set torch's threads; the run's
    dtype and its start time."""
    try:
        check_device(args.device)
        check_output_folder(args.out, "--out")
    except ValueError as error:
        sys.exit(f"error: {error}")
    torch.set_num_threads(args.threads)
    return resolve_dtype(args.dtype, args.device), time.perf_counter()


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The flags both benchmarks take: which model, where, in which precision."""
    parser.add_argument("--model-path", help="a LLaVA checkpoint; default: a random model")
    parser.add_argument("--shape", choices=SHAPES, help=f"random model widths (default {DEFAULT_SHAPE}, {QUICK_SHAPE} "
                        "with --quick; 7b-proportioned: LLaVA-1.5-7B's widths / 4; 7b: its real widths)")
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
                      SamplingConfig(max_new_tokens=new_tokens, temperature=0), eos_token_ids=set(), drop=as_method(drop),
                      image_sizes=work.image_sizes)
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
        "avg_vision_tokens_per_image": stats.get("avg_vision_tokens_per_image", stats["avg_vision_tokens"]),
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
    "avg_vision_tokens_per_image_ratio": "avg_vision_tokens_per_image",
}


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """Per setting: the median of every metric over repeats, and its ratio to the baseline's median."""
    medians = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    rows = []
    for name, values in medians.items():
        ratios = {ratio: values[key] / medians[BASELINE][key] for ratio, key in RATIO_OF.items()}
        rows.append({"setting": name, **values, **ratios})
    return rows
