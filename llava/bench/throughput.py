"""Throughput against batch size: what dropping vision tokens buys once several answers decode together.

At batch 1 a decode step is bound by reading the weights, so a smaller KV cache barely shows; with more
answers per step the caches' reads grow and dropping turns into throughput. For the unpruned model and
each method at one budget, for short and long answers, this measures questions per second (vision stage,
prefill and decoding of the whole batch), decode tokens per second and peak memory at each batch size,
for each way of running the decode step (`--decode`: eager, replayed as a CUDA graph, or compiled).
Settings are interleaved per repeat after a warm-up, as in the other benchmarks. The prompts of a batch
differ in length (each drops a few text tokens more than the one before), so batches are ragged as in a
real evaluation.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from llava.bench.compare import Setting, build_settings, checked_methods, parse_list
from llava.bench.output import save_results
from llava.bench.workload import RESULTS_DIR, Workload, add_workload_args, check_decode_length, load_workload, start_run
from llava.drop.batch import COMPILE_BACKEND, GenerationRequest, generate_batch
from llava.drop.generate import SamplingConfig

DEFAULT_BATCH_SIZES = (1, 4, 8, 16)
DEFAULT_ANSWER_LENGTHS = (3, 128)  # a short VQA answer, a long description
QUICK_BATCH_SIZES, QUICK_ANSWER_LENGTHS = (1, 2), (3, 6)
DEFAULT_BUDGET = 64
TEXT_TOKENS_DROPPED_PER_PROMPT = 3  # prompt n loses 3n text tokens: a ragged batch
OUTPUT_STEM = "throughput"
EAGER, CUDA_GRAPH, COMPILE = "eager", "cuda-graph", "compile"
DECODE_MODES = (EAGER, CUDA_GRAPH, COMPILE)
DEFAULT_OUT = RESULTS_DIR / "throughput"


def batch_requests(work: Workload, size: int) -> list[GenerationRequest]:
    """`size` prompts sharing the workload's image, prompt n shorter by 3n text tokens."""
    device = work.model.lm_head.weight.device
    requests = []
    for n in range(size):
        cut = (n * TEXT_TOKENS_DROPPED_PER_PROMPT) % max(work.input_ids.shape[1] // 4, 1)
        ids = work.input_ids[:, : work.input_ids.shape[1] - cut] if cut else work.input_ids
        image_sizes = None if work.image_sizes is None else work.image_sizes.to(device)
        requests.append(GenerationRequest(ids.to(device), work.pixel_values.to(device), image_sizes))
    return requests


def step_options(decode: str) -> dict:
    """`generate_batch`'s arguments for one decode mode."""
    return {"compile_backend": COMPILE_BACKEND if decode == COMPILE else None, "cuda_graph": decode == CUDA_GRAPH}


def run_batch(work: Workload, setting: Setting, size: int, answer_tokens: int, decode: str = EAGER) -> dict:
    """One batch with EOS off (every answer decodes `answer_tokens`), timed end to end."""
    device = work.model.lm_head.weight.device
    requests = batch_requests(work, size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    started = time.perf_counter()
    outputs = generate_batch(work.model, requests, SamplingConfig(max_new_tokens=answer_tokens), set(), setting.drop,
                             **step_options(decode))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    decode_seconds = outputs[0].stats["decode_seconds"]
    decoded = sum(len(output.token_ids) - 1 for output in outputs)  # the first token comes out of prefill
    return {
        "questions_per_s": size / seconds,
        "decode_tok_s": decoded / decode_seconds if decode_seconds > 0 else float("nan"),
        "seconds": seconds,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None,
        "avg_vision_tokens": statistics.mean(output.stats["avg_vision_tokens"] for output in outputs),
        "kv_cache_bytes": sum(output.stats["kv_cache_bytes"] for output in outputs),
        "token_ids": [output.token_ids for output in outputs],
    }


def measure(work: Workload, settings: list[Setting], batch_sizes: list[int], lengths: list[int],
            repeats: int, decodes: Sequence[str] = (EAGER,)) -> list[dict]:
    """Median over repeats of every (answer length, batch size, decode mode, setting), settings and modes
    interleaved (the warm-up also records or compiles each shape). `same_tokens` says whether a mode decoded
    exactly the first mode's tokens (EOS is off, so its speed holds either way, but a step that changes
    answers is no free speed-up)."""
    rows = []
    variants = [(decode, setting) for decode in decodes for setting in settings]
    for length in lengths:
        for size in batch_sizes:
            for decode, setting in variants:  # warm-up: every shape once, untimed
                run_batch(work, setting, size, length, decode)
            runs: dict[tuple[str, str], list[dict]] = {(decode, setting.label): [] for decode, setting in variants}
            for _ in range(repeats):
                for decode, setting in variants:
                    runs[decode, setting.label].append(run_batch(work, setting, size, length, decode))
            for decode, setting in variants:
                measured = runs[decode, setting.label]
                same = measured[0]["token_ids"] == runs[decodes[0], setting.label][0]["token_ids"]
                if not same:
                    print(f"warning: {setting.label} at batch {size}: the {decode} step decoded other tokens "
                          f"than {decodes[0]}")
                row = {key: statistics.median(run[key] for run in measured) if measured[0][key] is not None else None
                       for key in measured[0] if key != "token_ids"}
                rows.append({"setting": setting.label, "decode": decode, "answer_tokens": length, "batch_size": size,
                             "same_tokens": same, **row})
    return add_ratios(rows)


def add_ratios(rows: list[dict]) -> list[dict]:
    """Each row's decode tokens/s and questions/s against the unpruned model at the same batch size, length
    and decode mode, against the same setting at batch 1, and against the same setting decoded eagerly."""
    by_key = {(r["setting"], r["decode"], r["answer_tokens"], r["batch_size"]): r for r in rows}
    for row in rows:
        setting, decode, length, size = row["setting"], row["decode"], row["answer_tokens"], row["batch_size"]
        unpruned = by_key[("none", decode, length, size)]
        alone = by_key.get((setting, decode, length, 1))
        eager = by_key.get((setting, EAGER, length, size))
        row["decode_vs_none"] = row["decode_tok_s"] / unpruned["decode_tok_s"]
        row["questions_vs_batch1"] = row["questions_per_s"] / alone["questions_per_s"] if alone else None
        row["decode_vs_eager"] = row["decode_tok_s"] / eager["decode_tok_s"] if eager else None
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| answer tokens | batch | decode step | setting | vision tokens | questions/s (x batch 1) "
             "| decode tok/s (x none) (x eager) | KV cache MiB | peak MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        vs_one = "" if row["questions_vs_batch1"] is None else f" ({row['questions_vs_batch1']:.2f}x)"
        vs_eager = "" if row["decode_vs_eager"] is None else f" ({row['decode_vs_eager']:.2f}x)"
        peak = "-" if row["peak_memory_bytes"] is None else f"{row['peak_memory_bytes'] / 2**20:.0f}"
        differs = "" if row["same_tokens"] else " (other tokens!)"
        lines.append(f"| {row['answer_tokens']} | {row['batch_size']} | {row['decode']}{differs} | {row['setting']} "
                     f"| {row['avg_vision_tokens']:.1f} | {row['questions_per_s']:.3f}{vs_one} "
                     f"| {row['decode_tok_s']:.1f} ({row['decode_vs_none']:.2f}x){vs_eager} "
                     f"| {row['kv_cache_bytes'] / 2**20:.1f} | {peak} |")
    return "\n".join(lines)


def draw(rows: list[dict], title: str, path: Path) -> None:
    """Decode tokens/s and questions/s against batch size, one line per setting (dashed: eagerly decoded when
    a faster decode step is measured too), a column per answer length."""
    lengths = sorted({row["answer_tokens"] for row in rows})
    decodes = list(dict.fromkeys(row["decode"] for row in rows))
    settings = list(dict.fromkeys(row["setting"] for row in rows))
    fig, axes = plt.subplots(2, len(lengths), figsize=(max(6 * len(lengths), 9), 8), squeeze=False)
    for column, length in enumerate(lengths):
        for row_index, (key, metric) in enumerate((("decode_tok_s", "decode tokens/s"),
                                                    ("questions_per_s", "questions/s"))):
            ax = axes[row_index][column]
            for decode in decodes:
                for setting_index, setting in enumerate(settings):
                    points = [r for r in rows
                              if (r["setting"], r["decode"], r["answer_tokens"]) == (setting, decode, length)]
                    style = {"color": "black" if setting == "none" else f"C{setting_index}",
                             "linewidth": 2.5 if setting == "none" else 1.5,
                             "linestyle": "--" if decode == EAGER and len(decodes) > 1 else "-"}
                    label = setting if len(decodes) == 1 else f"{setting} ({decode})"
                    ax.plot([p["batch_size"] for p in points], [p[key] for p in points], marker="o", label=label,
                            **style)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.set_ylabel(metric)
            ax.set_title(f"{length}-token answers", fontsize=10)
            ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="quick-shape random model, batches 1-2, 3- and 6-token answers (CI)")
    add_workload_args(parser)
    parser.add_argument("--methods", type=parse_list, help="comma-separated; default: every registered method")
    parser.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="layer-averaged vision tokens (default 64)")
    parser.add_argument("--batch-sizes", type=lambda text: [int(b) for b in parse_list(text)])
    parser.add_argument("--answer-tokens", type=lambda text: [int(b) for b in parse_list(text)])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--decode", type=parse_list, default=[EAGER],
                        help=f"comma-separated decode steps to measure side by side: {', '.join(DECODE_MODES)} "
                             "(cuda-graph needs a CUDA device; compile uses torch.compile's inductor); default eager")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.batch_sizes = args.batch_sizes or list(QUICK_BATCH_SIZES if args.quick else DEFAULT_BATCH_SIZES)
    args.answer_tokens = args.answer_tokens or list(QUICK_ANSWER_LENGTHS if args.quick else DEFAULT_ANSWER_LENGTHS)
    if min(args.batch_sizes) < 1 or 1 not in args.batch_sizes:
        parser.error(f"--batch-sizes must be positive and include 1 (the reference), got {args.batch_sizes}")
    check_decode_length(parser, args.answer_tokens, "--answer-tokens")
    unknown = [mode for mode in args.decode if mode not in DECODE_MODES]
    if unknown or len(set(args.decode)) != len(args.decode):
        parser.error(f"--decode takes distinct modes among {', '.join(DECODE_MODES)}, got {','.join(args.decode)}")
    if CUDA_GRAPH in args.decode and not str(args.device).startswith("cuda"):
        parser.error(f"--decode {CUDA_GRAPH} needs a CUDA device, got --device {args.device}")
    args.methods = checked_methods(parser, args.methods)
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure, print the table and write throughput.{md,json,png}."""
    args = parse_args(argv)
    dtype, started = start_run(args)
    settings, skipped = build_settings(args.methods, [args.budget])
    work = load_workload(args, dtype)
    rows = measure(work, settings, args.batch_sizes, args.answer_tokens, args.repeats, args.decode)
    notes = "".join(f"\n\nSkipped {label}: {why}" for label, why in skipped.items())
    header = (f"Model: {work.description}.\n\nDevice {args.device} ({platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads), dtype {dtype}, decode step {' and '.join(args.decode)}; "
              f"each method built with budget={args.budget}; EOS off; "
              f"median of {args.repeats} repeat(s) after a warm-up per shape. questions/s: the whole batch (vision, "
              f"prefill one prompt at a time, decoding together) end to end; decode tok/s: tokens after the first "
              f"over the shared decode time. Peak: CUDA max allocated above the weights (not measured on CPU).{notes}")
    title = f"Throughput against batch size ({args.device}, {dtype}, budget {args.budget})"
    save_results(args, OUTPUT_STEM, header, markdown_table(rows), {"skipped": skipped, "rows": rows},
                 lambda path: draw(rows, title, path), started)
    return rows


if __name__ == "__main__":
    main()
