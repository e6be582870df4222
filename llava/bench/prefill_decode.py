"""Prefill time, decode speed and memory of MustDrop's published settings against no dropping.

All settings run in one process on one model, interleaved per repeat after a warm-up, so that a busy
machine slows them alike; ratios to "none" are what to read. Without `--model-path` the model is a
seeded random LLaVA-1.5 (real CLIP ViT-L/14-336 tower, real 32 decoder layers, widths of `--shape`).
With `--next` it is LLaVA-NeXT (v1.6) on an image that fills the 2 x 2 grid, and MustDrop runs at the
paper's NeXT settings, 640 / 320 / 160 layer-averaged vision tokens (thresholds found on the prompt). With
`--qwen` it is Qwen2.5-VL (llava/bench/qwen_model.py) on a 1024 x 768 image, FastV keeping 0.333 / 0.222 /
0.111 of its vision tokens.

    python -m llava.bench.prefill_decode [--quick] [--next | --qwen] [--shape S] [--model-path P] [--device cpu|cuda]
                                         [--dtype D] [--repeats N] [--new-tokens N] [--threads N] [--out DIR]
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from llava.bench.limit import LIMIT_PREFIX, add_limit_ratios, limit_settings
from llava.bench.next_settings import FoundPair, find_pairs, pairs_record
from llava.bench.output import ratio_bars, save_results
from llava.bench.qwen_model import QWEN_SHAPES
from llava.bench.workload import (
    BASELINE,
    MIB,
    RESULTS_DIR,
    Workload,
    add_workload_args,
    check_decode_length,
    load_workload,
    measure,
    memory_note,
    run_once,
    shape_name,
    start_run,
    summarize,
)
from llava.drop.methods import DropConfig, DropMethod, create_method
from llava.eval.cli_errors import interruptible
from llava.eval.thresholds import PUBLISHED, REFERENCE_BENCHMARK

# The published LLaVA-1.5-7B TextVQA settings (target tokens -> thresholds), after the unpruned baseline.
SETTINGS: dict[str, DropConfig] = {
    BASELINE: DropConfig.disabled(),
    **{str(tokens): DropConfig(global_thr=pair.global_thr, individual_thr=pair.individual_thr)
       for tokens, pair in PUBLISHED[REFERENCE_BENCHMARK].items()},
}
OUTPUT_STEM = "results"
NEXT_RESULTS_DIR = RESULTS_DIR / "next"  # --next's default --out, so that it keeps LLaVA-1.5's results
QWEN_RESULTS_DIR = RESULTS_DIR / "qwen"
# Qwen2.5-VL: an image brings as many tokens as its resolution gives, so settings are kept shares (the
# 192 / 128 / 64 of 576 shares), by FastV (no thresholds are published for Qwen).
QWEN_KEEPS = (0.333, 0.222, 0.111)
QWEN_METHOD = "fastv"


def qwen_settings() -> dict[str, DropMethod | None]:
    return {BASELINE: None, **{f"{QWEN_METHOD}@{keep}": create_method(QWEN_METHOD, {"keep_fraction": str(keep)})
                               for keep in QWEN_KEEPS}}


def next_settings(work: Workload) -> tuple[dict[str, DropConfig], list[FoundPair]]:
    """The unpruned NeXT model, then MustDrop at each NeXT target with the pair found on this prompt."""
    pairs = find_pairs(work)
    for pair in pairs:
        print(f"MustDrop NeXT setting {pair.describe()}")
    return {BASELINE: DropConfig.disabled(), **{str(pair.target): pair.config() for pair in pairs}}, pairs


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
        ("per image", "avg_vision_tokens_per_image", "avg_vision_tokens_per_image_ratio", "{:.1f}"),
    ]
    header = ["setting", *(c[0] for c in columns), "tokens after merge", "FLOPs ratio", "scoring share",
              "prefill vs limit (LLM only)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [row["setting"]]
        for _, key, ratio, fmt in columns:
            value = row[key] / MIB if key.endswith("bytes") else row[key]
            cells.append(f"{fmt.format(value)} ({row[ratio]:.2f}x)")
        cells += [f"{row['vision_tokens_after_merge']:.0f}", f"{row['flops_ratio']:.3f}", f"{100 * row['scoring_share']:.2f} %",
                  "-" if row["prefill_vs_limit"] is None
                  else f"{row['prefill_vs_limit']:.2f}x ({row['llm_prefill_vs_limit']:.2f}x)"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="quick-shape random model, 1 repeat, 4 new tokens (CI)")
    family = parser.add_mutually_exclusive_group()
    family.add_argument("--next", action="store_true",
                        help="LLaVA-NeXT (v1.6) at 640 / 320 / 160 vision tokens instead of LLaVA-1.5 at 192 / 128 / 64")
    family.add_argument("--qwen", action="store_true",
                        help=f"Qwen2.5-VL on a 1024 x 768 image, {QWEN_METHOD} keeping {' / '.join(map(str, QWEN_KEEPS))} "
                             "of its vision tokens")
    add_workload_args(parser)
    parser.add_argument("--repeats", type=int, help="timed runs per setting (default 3, quick 1)")
    parser.add_argument("--new-tokens", type=int, help="tokens decoded per run (default 32, quick 4)")
    parser.add_argument("--out", type=Path, help=f"default {RESULTS_DIR}, with --next {NEXT_RESULTS_DIR}")
    args = parser.parse_args(argv)
    args.out = args.out or (NEXT_RESULTS_DIR if args.next else QWEN_RESULTS_DIR if args.qwen else RESULTS_DIR)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.new_tokens = args.new_tokens or (4 if args.quick else 32)
    check_decode_length(parser, [args.new_tokens], "--new-tokens")
    if args.qwen and args.shape is not None and args.shape not in QWEN_SHAPES:
        parser.error(f"--qwen takes --shape {', '.join(QWEN_SHAPES)}, not {args.shape}")
    return args


@interruptible
def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, print the table and write results.json, results.md and results.png."""
    args = parse_args(argv)
    dtype, started = start_run(args)
    work = load_workload(args, dtype, next_model=args.next, qwen=args.qwen)
    settings, pairs = next_settings(work) if args.next else (qwen_settings() if args.qwen else SETTINGS, [])
    reached = {label: run_once(work, drop, args.new_tokens)["avg_vision_tokens"]  # warm-up
               for label, drop in settings.items()}
    limits = limit_settings({label: tokens for label, tokens in reached.items() if label != BASELINE})
    for drop in limits.values():
        run_once(work, drop, args.new_tokens)
    rows = summarize(measure(work, {**settings, **limits}, args.repeats, args.new_tokens))
    add_limit_ratios(rows)
    header = (f"Model: {work.description}.\n\n{settings_note(pairs, args.qwen)}Device {args.device} "
              f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), dtype {dtype}, "
              f"{args.new_tokens} new tokens (EOS off), median of {args.repeats} interleaved repeat(s) after a warm-up. "
              f"Ratios to \"none\" in parentheses. Peak extra memory: {memory_note(args.device)}, one extra run per "
              f"setting. Scoring share: stage-1 merge + key set + stage-2 scoring, over vision + LLM prefill time. "
              f"{LIMIT_PREFIX}X: the same model fed only X's layer-averaged count of vision tokens (the unpruned vision "
              f"stage's first ones, nothing scored or merged), the floor X can reach; 'vs limit' = X's time / that floor.")
    table = markdown_table(rows)
    family = "LLaVA-NeXT" if args.next else "Qwen2.5-VL" if args.qwen else "LLaVA-1.5"
    source = args.model_path or f"random {family} model, shape {shape_name(args)}"
    method = QWEN_METHOD if args.qwen else "MustDrop"
    title = f"{method} vs no dropping: {source} ({args.device}, {dtype}, {args.new_tokens} new tokens)"
    save_results(args, OUTPUT_STEM, header, table, {"rows": rows, "next_pairs": pairs_record(pairs)},
                 lambda path: ratio_bars([r for r in rows if not r["setting"].startswith(LIMIT_PREFIX)], title, path),
                 started)
    return rows


def settings_note(pairs: list[FoundPair], qwen: bool = False) -> str:
    """Where the MustDrop settings come from: the published LLaVA-1.5 pairs, or the pairs found on NeXT; on
    Qwen, the kept shares."""
    if qwen:
        return (f"Settings: {QWEN_METHOD} with keep_fraction {', '.join(map(str, QWEN_KEEPS))} (the shares of "
                "LLaVA-1.5's 192 / 128 / 64 of 576 tokens).\n\n")
    if not pairs:
        return f"Settings: the published LLaVA-1.5-7B {REFERENCE_BENCHMARK} thresholds.\n\n"
    found = "; ".join(pair.describe() for pair in pairs)
    return ("Settings: unpruned NeXT (its own spatial_unpad layout) and MustDrop (flat layout) at the paper's NeXT "
            f"targets, total layer-averaged vision tokens, thresholds found on this prompt: {found}.\n\n")


if __name__ == "__main__":
    main()
