"""Throughput against batch size: what dropping vision tokens buys once several answers decode together.

At batch 1 a decode step is bound by reading the weights, so a smaller KV cache barely shows; with more
answers per step the caches' reads grow and dropping turns into throughput. For the unpruned model and
each method at one budget, for short and long answers, this measures questions per second (vision stage,
prefill and decoding of the whole batch), decode tokens per second and peak memory at each batch size.
Settings are interleaved per repeat after a warm-up, as in the other benchmarks. The prompts of a batch
differ in length (each drops a few text tokens more than the one before), so batches are ragged as in a
real evaluation.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from llava.bench.compare import Setting, build_settings, checked_methods, parse_list
from llava.bench.output import save_results
from llava.bench.workload import RESULTS_DIR, Workload, add_workload_args, check_decode_length, load_workload, start_run
from llava.drop.batch import GenerationRequest, generate_batch
from llava.drop.generate import SamplingConfig

DEFAULT_BATCH_SIZES = (1, 4, 8, 16)
DEFAULT_ANSWER_LENGTHS = (3, 128)  # a short VQA answer, a long description
QUICK_BATCH_SIZES, QUICK_ANSWER_LENGTHS = (1, 2), (3, 6)
DEFAULT_BUDGET = 64
TEXT_TOKENS_DROPPED_PER_PROMPT = 3  # prompt n loses 3n text tokens: a ragged batch
OUTPUT_STEM = "throughput"
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


def run_batch(work: Workload, setting: Setting, size: int, answer_tokens: int, compile_backend: str | None = None) -> dict:
    """One batch with EOS off (every answer decodes `answer_tokens`), timed end to end."""
    device = work.model.lm_head.weight.device
    requests = batch_requests(work, size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    started = time.perf_counter()
    outputs = generate_batch(work.model, requests, SamplingConfig(max_new_tokens=answer_tokens), set(), setting.drop,
                             compile_backend)
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
    }


def measure(work: Workload, settings: list[Setting], batch_sizes: list[int], lengths: list[int],
            repeats: int, compile_backend: str | None = None) -> list[dict]:
    """Median over repeats of every (answer length, batch size, setting), settings interleaved (the warm-up
    also compiles each shape when `compile_backend` is set)."""
    rows = []
    for length in lengths:
        for size in batch_sizes:
            for setting in settings:  # warm-up: every shape once, untimed
                run_batch(work, setting, size, length, compile_backend)
            runs: dict[str, list[dict]] = {setting.label: [] for setting in settings}
            for _ in range(repeats):
                for setting in settings:
                    runs[setting.label].append(run_batch(work, setting, size, length, compile_backend))
            for setting in settings:
                measured = runs[setting.label]
                row = {key: statistics.median(run[key] for run in measured) if measured[0][key] is not None else None
                       for key in measured[0]}
                rows.append({"setting": setting.label, "answer_tokens": length, "batch_size": size, **row})
    return add_ratios(rows)


def add_ratios(rows: list[dict]) -> list[dict]:
    """Each row's decode tokens/s and questions/s against the unpruned model at the same batch size and length,
    and against the same setting at batch 1."""
    def find(setting: str, length: int, size: int) -> dict | None:
        return next((r for r in rows if (r["setting"], r["answer_tokens"], r["batch_size"]) == (setting, length, size)),
                    None)

    for row in rows:
        unpruned = find("none", row["answer_tokens"], row["batch_size"])
        alone = find(row["setting"], row["answer_tokens"], 1)
        row["decode_vs_none"] = row["decode_tok_s"] / unpruned["decode_tok_s"]
        row["questions_vs_batch1"] = row["questions_per_s"] / alone["questions_per_s"] if alone else None
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| answer tokens | batch | setting | vision tokens | questions/s (x batch 1) | decode tok/s (x none) "
             "| KV cache MiB | peak MiB |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        vs_one = "" if row["questions_vs_batch1"] is None else f" ({row['questions_vs_batch1']:.2f}x)"
        peak = "-" if row["peak_memory_bytes"] is None else f"{row['peak_memory_bytes'] / 2**20:.0f}"
        lines.append(f"| {row['answer_tokens']} | {row['batch_size']} | {row['setting']} | {row['avg_vision_tokens']:.1f} "
                     f"| {row['questions_per_s']:.3f}{vs_one} | {row['decode_tok_s']:.1f} ({row['decode_vs_none']:.2f}x) "
                     f"| {row['kv_cache_bytes'] / 2**20:.1f} | {peak} |")
    return "\n".join(lines)


def draw(rows: list[dict], title: str, path: Path) -> None:
    """Decode tokens/s and questions/s against batch size, one line per setting, a column per answer length."""
    lengths = sorted({row["answer_tokens"] for row in rows})
    settings = list(dict.fromkeys(row["setting"] for row in rows))
    fig, axes = plt.subplots(2, len(lengths), figsize=(6 * len(lengths), 8), squeeze=False)
    for column, length in enumerate(lengths):
        for row_index, (key, label) in enumerate((("decode_tok_s", "decode tokens/s"),
                                                   ("questions_per_s", "questions/s"))):
            ax = axes[row_index][column]
            for setting in settings:
                points = [r for r in rows if r["setting"] == setting and r["answer_tokens"] == length]
                style = {"color": "black", "linewidth": 2.5} if setting == "none" else {}
                ax.plot([p["batch_size"] for p in points], [p[key] for p in points], marker="o", label=setting, **style)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.set_ylabel(label)
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
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (inductor)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.batch_sizes = args.batch_sizes or list(QUICK_BATCH_SIZES if args.quick else DEFAULT_BATCH_SIZES)
    args.answer_tokens = args.answer_tokens or list(QUICK_ANSWER_LENGTHS if args.quick else DEFAULT_ANSWER_LENGTHS)
    if min(args.batch_sizes) < 1 or 1 not in args.batch_sizes:
        parser.error(f"--batch-sizes must be positive and include 1 (the reference), got {args.batch_sizes}")
    check_decode_length(parser, args.answer_tokens, "--answer-tokens")
    args.methods = checked_methods(parser, args.methods)
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure, print the table and write throughput.{md,json,png}."""
    args = parse_args(argv)
    dtype, started = start_run(args)
    settings, skipped = build_settings(args.methods, [args.budget])
    work = load_workload(args, dtype)
    rows = measure(work, settings, args.batch_sizes, args.answer_tokens, args.repeats,
                   "inductor" if args.compile else None)
    notes = "".join(f"\n\nSkipped {label}: {why}" for label, why in skipped.items())
    header = (f"Model: {work.description}.\n\nDevice {args.device} ({platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads), dtype {dtype}{', decode step compiled' if args.compile else ''}; each method built with budget={args.budget}; EOS off; "
              f"median of {args.repeats} repeat(s) after a warm-up per shape. questions/s: the whole batch (vision, "
              f"prefill one prompt at a time, decoding together) end to end; decode tok/s: tokens after the first "
              f"over the shared decode time. Peak: CUDA max allocated above the weights (not measured on CPU).{notes}")
    title = f"Throughput against batch size ({args.device}, {dtype}, budget {args.budget})"
    save_results(args, OUTPUT_STEM, header, markdown_table(rows), {"skipped": skipped, "rows": rows},
                 lambda path: draw(rows, title, path), started)
    return rows


if __name__ == "__main__":
    main()
