"""Time to first token and questions/s against batch size: what dropping vision tokens buys on a GPU.

The main mode answers as a VQA benchmark asks: short answers (3 new tokens, EOS off). At each batch size,
for every setting, it measures the batch's time to first token (TTFT: every prompt's vision stage and
prefill and its first token; the wall time of `generate_batch` with one new token), questions/s (the wall
time of the whole batch with 3-token answers) and peak memory. Settings: the unpruned model ("none"), the
limit at each budget (`limit@K`: the model fed only the unpruned vision stage's first K tokens, the floor
any dropping method can reach; see `llava.bench.limit`) and every method at each budget (LLaVA-1.5: 64;
`--next`, LLaVA-NeXT: 320 and 160 in total over the base image and its crops; `--qwen`, Qwen2.5-VL: 222 and
111, the 0.222 and 0.111 shares of its image's 999 tokens; methods that do not run on Qwen are skipped with
the reason). Each row reads against
"none" and against the limit at its budget, both at the same batch size, and against itself at batch 1.

Long answers (`--answer-tokens 128`) measure the decode loop too: decode tokens/s for each way of running
the decode step (`--decode`: eager, replayed as a CUDA graph, or compiled), also against the eager step.
Settings are interleaved per repeat after a warm-up per batch size, as in the other benchmarks. The
prompts of a batch differ in length (each drops a few text tokens more than the one before), so batches
are ragged as in a real evaluation.
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

from llava.bench.compare import Setting, budget_label, build_settings, checked_methods, parse_list, skip
from llava.bench.limit import LIMIT_PREFIX, VisionPrefix
from llava.bench.output import save_results
from llava.bench.qwen_model import QWEN_SHAPES
from llava.bench.workload import (
    BASELINE,
    RESULTS_DIR,
    Workload,
    add_workload_args,
    check_decode_length,
    load_workload,
    start_run,
)
from llava.drop.generate import COMPILE_BACKEND, GenerationRequest, SamplingConfig, generate_batch
from llava.eval.cli_errors import interruptible

SHORT_ANSWER_TOKENS = 3  # a VQA answer: the main mode
DEFAULT_BATCH_SIZES = (1, 16, 64)
QUICK_BATCH_SIZES = (1, 2)
DEFAULT_BUDGETS = (64,)  # layer-averaged vision tokens on LLaVA-1.5
NEXT_BUDGETS = (320, 160)  # on LLaVA-NeXT: the total over the base image and its crops
QWEN_BUDGETS = (222, 111)  # on Qwen2.5-VL: 0.222 and 0.111 of the 999 tokens of its 1024 x 768 image
TEXT_TOKENS_DROPPED_PER_PROMPT = 3  # prompt n loses 3n text tokens: a ragged batch
OUTPUT_STEM = "throughput"
EAGER, CUDA_GRAPH, COMPILE = "eager", "cuda-graph", "compile"
DECODE_MODES = (EAGER, CUDA_GRAPH, COMPILE)
DEFAULT_OUT = RESULTS_DIR / "throughput"
NEXT_OUT = RESULTS_DIR / "throughput-next"
QWEN_OUT = RESULTS_DIR / "throughput-qwen"
MARKERS = ("o", "s", "^")  # one per decode mode in the chart


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


def time_to_first_token(work: Workload, setting: Setting, size: int) -> float:
    """Wall time until every prompt of the batch has its first token: vision stage, prefill, first token."""
    return run_batch(work, setting, size, 1)["seconds"]


def warmed_up(work: Workload, setting: Setting, size: int, variants: list[tuple[int, str]], skipped: dict[str, str],
              first_size: int) -> bool:
    """Run every (answer length, decode mode) once at this batch size, untimed (a compiled or graph-replayed
    step compiles or records here; the TTFT run's shapes are the same prefills). A setting that fails, such as
    a budget its method refuses on this model or a batch beyond the GPU's memory, is left out from this
    batch size on, with a note; the unpruned model must run at the first size."""
    try:
        for length, decode in variants:
            run_batch(work, setting, size, length, decode)
        return True
    except Exception as error:  # one setting's failure must not hide the others
        if setting.budget is None and size == first_size:
            raise
        where = setting.label if size == first_size else f"{setting.label} at batch {size} and above"
        skip(skipped, where, f"failed: {type(error).__name__}: {error}")
    torch.cuda.empty_cache()  # the failed batch's blocks go back, for the next setting (a no-op without CUDA)
    return False


def measure(work: Workload, settings: list[Setting], batch_sizes: list[int], lengths: list[int], repeats: int,
            decodes: Sequence[str] = (EAGER,), skipped: dict[str, str] | None = None) -> list[dict]:
    """Per batch size (ascending), setting, answer length and decode mode: the median over repeats of TTFT and
    of the whole batch's run, settings and modes interleaved after a warm-up. `same_tokens` says whether a
    mode decoded exactly the first mode's tokens (EOS is off, so its speed holds either way, but a step that
    changes answers is no free speed-up). Failing settings are left out and noted in `skipped`."""
    skipped = {} if skipped is None else skipped
    variants = [(length, decode) for length in lengths for decode in decodes]
    rows, active = [], list(settings)
    for size in batch_sizes:
        active = [setting for setting in active if warmed_up(work, setting, size, variants, skipped, batch_sizes[0])]
        ttft: dict[str, list[float]] = {setting.label: [] for setting in active}
        runs: dict[tuple[str, int, str], list[dict]] = {(s.label, *variant): [] for s in active for variant in variants}
        for _ in range(repeats):
            for setting in active:
                ttft[setting.label].append(time_to_first_token(work, setting, size))
                for length, decode in variants:
                    runs[setting.label, length, decode].append(run_batch(work, setting, size, length, decode))
        for length, decode in variants:
            for setting in active:
                measured = runs[setting.label, length, decode]
                same = measured[0]["token_ids"] == runs[setting.label, length, decodes[0]][0]["token_ids"]
                if not same:
                    print(f"warning: {setting.label} at batch {size}: the {decode} step decoded other tokens "
                          f"than {decodes[0]}")
                row = {key: statistics.median(run[key] for run in measured) if measured[0][key] is not None else None
                       for key in measured[0] if key != "token_ids"}
                rows.append({"setting": setting.label, "budget": setting.budget, "decode": decode,
                             "answer_tokens": length, "batch_size": size, "same_tokens": same,
                             "ttft_s": statistics.median(ttft[setting.label]), **row})
    return add_ratios(rows)


def ratio(row: dict, other: dict | None, key: str) -> float | None:
    return row[key] / other[key] if other is not None else None


def add_ratios(rows: list[dict]) -> list[dict]:
    """Each row's TTFT, questions/s and decode tokens/s against the unpruned model and against the limit at
    its budget, both at the same batch size, answer length and decode mode; its questions/s against the same
    setting at batch 1; its decode tokens/s against the same setting decoded eagerly. None where that row is
    missing (skipped; no limit for "none" or a method that picks its own count)."""
    by_key = {(r["setting"], r["decode"], r["answer_tokens"], r["batch_size"]): r for r in rows}
    for row in rows:
        setting, decode, length, size = row["setting"], row["decode"], row["answer_tokens"], row["batch_size"]
        unpruned = by_key.get((BASELINE, decode, length, size))
        limit = by_key.get((budget_label(VisionPrefix.name, row["budget"]), decode, length, size))
        for name, key in (("ttft", "ttft_s"), ("questions", "questions_per_s"), ("decode", "decode_tok_s")):
            row[f"{name}_vs_none"] = ratio(row, unpruned, key)
            row[f"{name}_vs_limit"] = ratio(row, limit, key)
        row["questions_vs_batch1"] = ratio(row, by_key.get((setting, decode, length, 1)), "questions_per_s")
        row["decode_vs_eager"] = ratio(row, by_key.get((setting, EAGER, length, size)), "decode_tok_s")
    return rows


def with_ratios(value: str, *ratios: float | None) -> str:
    """A value and its ratios, "-" for a missing one: 12.3 (0.50x, -)."""
    return f"{value} ({', '.join('-' if r is None else f'{r:.2f}x' for r in ratios)})"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| answer tokens | batch | decode step | setting | vision tokens | TTFT ms (x none, x limit) "
             "| questions/s (x none, x limit, x batch 1) | decode tok/s (x none, x eager) | KV cache MiB | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        peak = "-" if row["peak_memory_bytes"] is None else f"{row['peak_memory_bytes'] / 2**20:.0f}"
        differs = "" if row["same_tokens"] else " (other tokens!)"
        ttft = with_ratios(f"{row['ttft_s'] * 1e3:.1f}", row["ttft_vs_none"], row["ttft_vs_limit"])
        questions = with_ratios(f"{row['questions_per_s']:.3f}", row["questions_vs_none"], row["questions_vs_limit"],
                                row["questions_vs_batch1"])
        decode = with_ratios(f"{row['decode_tok_s']:.1f}", row["decode_vs_none"], row["decode_vs_eager"])
        lines.append(f"| {row['answer_tokens']} | {row['batch_size']} | {row['decode']}{differs} | {row['setting']} "
                     f"| {row['avg_vision_tokens']:.1f} | {ttft} | {questions} | {decode} "
                     f"| {row['kv_cache_bytes'] / 2**20:.1f} | {peak} |")
    return "\n".join(lines)


def draw(rows: list[dict], title: str, path: Path) -> None:
    """TTFT and questions/s (and decode tokens/s once answers are longer than short ones) against batch size:
    a column per answer length, a line per setting (a marker per decode mode), the limits dashed, the
    unpruned model thick and black."""
    lengths = sorted({row["answer_tokens"] for row in rows})
    decodes = list(dict.fromkeys(row["decode"] for row in rows))
    settings = list(dict.fromkeys(row["setting"] for row in rows))
    sizes = sorted({row["batch_size"] for row in rows})
    metrics = [("ttft_s", "time to first token of the batch (s)"), ("questions_per_s", "questions/s")]
    if max(lengths) > SHORT_ANSWER_TOKENS:
        metrics.append(("decode_tok_s", "decode tokens/s"))
    fig, axes = plt.subplots(len(metrics), len(lengths), figsize=(max(6 * len(lengths), 9), 4 * len(metrics)),
                             squeeze=False)
    for column, length in enumerate(lengths):
        for row_index, (key, metric) in enumerate(metrics):
            ax = axes[row_index][column]
            if key == "ttft_s" and column > 0:  # the same for every answer length: drawn once
                ax.remove()
                continue
            for decode_index, decode in enumerate(decodes[:1] if key == "ttft_s" else decodes):  # TTFT: no decode step
                for setting_index, setting in enumerate(settings):
                    points = [r for r in rows
                              if (r["setting"], r["decode"], r["answer_tokens"]) == (setting, decode, length)]
                    style = {"color": "black" if setting == BASELINE else f"C{setting_index}",
                             "linewidth": 2.5 if setting == BASELINE else 1.5,
                             "linestyle": "--" if setting.startswith(LIMIT_PREFIX) else "-",
                             "marker": MARKERS[decode_index]}
                    label = setting if len(decodes) == 1 or key == "ttft_s" else f"{setting} ({decode})"
                    ax.plot([p["batch_size"] for p in points], [p[key] for p in points], label=label, **style)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(size) for size in sizes], minor=False)
            ax.minorticks_off()
            ax.set_xlabel("batch size")
            ax.set_ylabel(metric)
            ax.set_title("every answer's first token" if key == "ttft_s" else f"{length}-token answers", fontsize=10)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
    axes[1][0].legend(fontsize=8)  # questions/s: every setting and decode mode
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def int_list(text: str) -> list[int]:
    return [int(part) for part in parse_list(text)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="quick-shape random model, batches 1 and 2 (CI)")
    add_workload_args(parser)
    family = parser.add_mutually_exclusive_group()
    family.add_argument("--next", action="store_true", help="LLaVA-NeXT (v1.6); budgets 320,160 unless --budgets")
    family.add_argument("--qwen", action="store_true",
                        help="Qwen2.5-VL on a 1024 x 768 image (999 vision tokens); budgets 222,111 unless --budgets")
    parser.add_argument("--methods", type=parse_list, help="comma-separated; default: every registered method")
    parser.add_argument("--budgets", type=int_list,
                        help="comma-separated layer-averaged vision tokens, a limit row each (default 64; "
                             "--next 320,160)")
    parser.add_argument("--batch-sizes", type=int_list, help="comma-separated, with 1 (default 1,16,64; quick 1,2)")
    parser.add_argument("--answer-tokens", type=int_list, default=[SHORT_ANSWER_TOKENS],
                        help=f"comma-separated answer lengths (default {SHORT_ANSWER_TOKENS}, a VQA answer; "
                             "e.g. 128 for long answers, whose decode step --decode measures)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--decode", type=parse_list, default=[EAGER],
                        help=f"comma-separated decode steps to measure side by side: {', '.join(DECODE_MODES)} "
                             "(cuda-graph needs a CUDA device; compile uses torch.compile's inductor); default eager")
    parser.add_argument("--out", type=Path, help=f"default {DEFAULT_OUT}, with --next {NEXT_OUT}, --qwen {QWEN_OUT}")
    args = parser.parse_args(argv)
    args.batch_sizes = sorted(set(args.batch_sizes or (QUICK_BATCH_SIZES if args.quick else DEFAULT_BATCH_SIZES)))
    args.budgets = args.budgets or list(NEXT_BUDGETS if args.next else QWEN_BUDGETS if args.qwen else DEFAULT_BUDGETS)
    args.out = args.out or (NEXT_OUT if args.next else QWEN_OUT if args.qwen else DEFAULT_OUT)
    if args.qwen and args.shape is not None and args.shape not in QWEN_SHAPES:
        parser.error(f"--qwen takes --shape {', '.join(QWEN_SHAPES)}, not {args.shape}")
    if args.batch_sizes[0] != 1:
        parser.error(f"--batch-sizes must be positive and include 1 (the reference), got {args.batch_sizes}")
    if min(args.budgets) < 1:
        parser.error(f"--budgets must be positive token counts, got {args.budgets}")
    check_decode_length(parser, args.answer_tokens, "--answer-tokens")
    unknown = [mode for mode in args.decode if mode not in DECODE_MODES]
    if unknown or len(set(args.decode)) != len(args.decode):
        parser.error(f"--decode takes distinct modes among {', '.join(DECODE_MODES)}, got {','.join(args.decode)}")
    if CUDA_GRAPH in args.decode and not str(args.device).startswith("cuda"):
        parser.error(f"--decode {CUDA_GRAPH} needs a CUDA device, got --device {args.device}")
    args.methods = checked_methods(parser, args.methods)
    return args


def describe_run(args: argparse.Namespace, work: Workload, dtype: torch.dtype, skipped: dict[str, str]) -> str:
    notes = "".join(f"\n\nSkipped {label}: {why}" for label, why in skipped.items())
    budgets = ", ".join(map(str, args.budgets))
    return (f"Model: {work.description}.\n\nDevice {args.device} ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads), dtype {dtype}, decode step {' and '.join(args.decode)}; "
            f"answers of {' and '.join(map(str, args.answer_tokens))} new tokens, EOS off; each method built with "
            f"budget={budgets}; limit@K: the model fed only the unpruned vision stage's first K vision tokens; "
            f"median of {args.repeats} repeat(s) after a warm-up per batch size. TTFT: wall time until every "
            f"question of the batch has its first token (vision stage and prefill of the whole batch, first "
            f"tokens); questions/s: the whole batch end to end; decode tok/s: tokens after the first over the "
            f"batch's decode time. x none, x limit: against the unpruned model and the limit at the row's budget, "
            f"at the same batch size; x batch 1: the same setting alone; x eager: the same setting decoded "
            f"eagerly. Peak: CUDA max allocated above the weights (not measured on CPU).{notes}")


@interruptible
def main(argv: list[str] | None = None) -> list[dict]:
    """Measure, print the table and write throughput.{md,json,png}."""
    args = parse_args(argv)
    dtype, started = start_run(args)
    methods, skipped = build_settings(args.methods, args.budgets)
    limits = [Setting(VisionPrefix.name, budget, VisionPrefix(budget)) for budget in args.budgets]
    settings = methods[:1] + limits + methods[1:]  # none, the limits, the methods
    work = load_workload(args, dtype, next_model=args.next, qwen=args.qwen)
    rows = measure(work, settings, args.batch_sizes, args.answer_tokens, args.repeats, args.decode, skipped)
    model = "LLaVA-NeXT" if args.next else "Qwen2.5-VL" if args.qwen else "LLaVA-1.5"
    title = (f"{model}, {args.device}, {dtype}: time to first token and questions/s against batch size\n"
             f"budgets {', '.join(map(str, args.budgets))}; dashed: the limit, the model fed only K vision tokens")
    save_results(args, OUTPUT_STEM, describe_run(args, work, dtype, skipped), markdown_table(rows),
                 {"skipped": skipped, "rows": rows}, lambda path: draw(rows, title, path), started)
    return rows


if __name__ == "__main__":
    main()
