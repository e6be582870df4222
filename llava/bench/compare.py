"""Every registered dropping method at the same token budgets, against no dropping, in one run.

Each method is built with `budget=<target layer-averaged vision tokens>` (one that picks its own count,
such as PruMerge+, once with its defaults: budget "own") and timed on one model and one prompt,
interleaved per repeat after a warm-up (the model, prompt and measurement of `llava.bench.workload`,
as in `prefill_decode`), so that a busy machine slows every setting alike; read the ratios to "none".
The table names each method's family: where it drops (encoder, prefill, multi-stage) or baseline.

    python -m llava.bench.compare [--quick] [--shape S] [--model-path P] [--methods mustdrop,fastv,...]
                                  [--budgets 192,128,64] [--repeats N] [--new-tokens N]
                                  [--device cpu|cuda] [--dtype D] [--threads N] [--out DIR]
"""

from __future__ import annotations

import argparse
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from llava.bench.output import save_results, tokens_lines
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
from llava.drop.methods import DropMethod, create_method
from llava.drop.methods.registry import METHODS, discover_methods, family_of
from llava.eval.cli_errors import interruptible
from llava.eval.thresholds import TOKEN_SETTINGS

DEFAULT_BUDGETS = TOKEN_SETTINGS  # the paper's LLaVA-1.5 settings (layer-averaged vision tokens)
DEFAULT_OUT = RESULTS_DIR / "compare"
QUICK_REPEATS, FULL_REPEATS = 1, 3
QUICK_NEW_TOKENS, FULL_NEW_TOKENS = 4, 32
BUDGET_OPTION = "budget"
NO_BUDGET = "-"  # the baseline row's budget cell
OWN_COUNT = "own"  # the budget of a method that picks its own token count per image (it refuses a budget)
OUTPUT_STEM = "compare"


def budget_label(method: str, budget: int | str) -> str:
    return f"{method}@{budget}"


@dataclass(frozen=True)
class Setting:
    """One row of the comparison: a method built at one budget (None: the baseline; OWN_COUNT: a method
    that picks its own count, built with its defaults)."""

    method: str
    budget: int | str | None
    drop: DropMethod

    @property
    def label(self) -> str:
        return BASELINE if self.budget is None else budget_label(self.method, self.budget)


def registered_methods() -> list[str]:
    """Every registered method except the baseline, in registry order."""
    discover_methods()
    return [name for name in METHODS if name != BASELINE]


def build_settings(methods: list[str], budgets: list[int]) -> tuple[list[Setting], dict[str, str]]:
    """The baseline, then each method at each budget (a method that picks its own count: once, with its
    defaults); one that cannot be built is skipped with a note."""
    settings = [Setting(BASELINE, None, create_method(BASELINE))]
    skipped: dict[str, str] = {}
    for name in methods:
        if METHODS[name].own_count:
            settings.append(Setting(name, OWN_COUNT, create_method(name)))
            continue
        for budget in budgets:
            try:
                settings.append(Setting(name, budget, create_method(name, {BUDGET_OPTION: str(budget)})))
            except (TypeError, ValueError) as error:
                skip(skipped, budget_label(name, budget), f"cannot be built with this budget: {error}")
    return settings, skipped


def skip(skipped: dict[str, str], label: str, why: str) -> None:
    skipped[label] = why
    print(f"note: skipping {label}: {why}")


def warm_up(work: Workload, settings: list[Setting], new_tokens: int,
            skipped: dict[str, str]) -> list[Setting]:
    """Run each setting once untimed; one that fails here (e.g. a budget its layers cannot reach) is
    skipped with a note, so that one method's limits do not hide the rest of the comparison."""
    working = []
    for setting in settings:
        try:
            run_once(work, setting.drop, new_tokens)
        except Exception as error:  # any method's failure: report it, compare the others
            if setting.budget is None:
                raise
            skip(skipped, setting.label, f"failed: {type(error).__name__}: {error}")
            continue
        working.append(setting)
    return working


def compare_rows(settings: list[Setting], runs: dict[str, list[dict]]) -> list[dict]:
    """`summarize`'s medians and ratios, tagged with method and target budget."""
    by_label = {s.label: s for s in settings}
    rows = summarize(runs)
    for row in rows:
        setting = by_label[row["setting"]]
        row["method"], row["budget"] = setting.method, setting.budget
        row["family"] = family_of(setting.method)
    return rows


def ratio_cell(value: float, ratio: float, fmt: str) -> str:
    return f"{fmt.format(value)} ({ratio:.2f}x)"


def markdown_row(row: dict) -> str:
    budget = NO_BUDGET if row["budget"] is None else str(row["budget"])
    overshoot = f" ({row['avg_vision_tokens'] - row['budget']:+.1f})" if isinstance(row["budget"], int) else ""
    cells = [
        row["method"], budget, row["family"],
        f"{row['avg_vision_tokens']:.1f}{overshoot}",
        f"{row['flops_ratio']:.3f}",
        ratio_cell(row["prefill_total_s"], row["prefill_total_ratio"], "{:.3f}"),
        ratio_cell(row["decode_tok_s"], row["decode_tok_s_ratio"], "{:.1f}"),
        ratio_cell(row["kv_cache_bytes"] / MIB, row["kv_cache_ratio"], "{:.2f}"),
        ratio_cell(row["peak_memory_bytes"] / MIB, row["peak_memory_ratio"], "{:.1f}"),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown_table(rows: list[dict]) -> str:
    """One row per method x budget after the baseline, with the method's family (where it drops: encoder,
    prefill, multi-stage, baseline); ratios to "none" in parentheses."""
    header = ["method", "budget", "family", "avg vision tokens (vs budget)", "FLOPs ratio", "prefill (vision+LLM) s",
              "decode tok/s", "KV cache MiB", "peak extra MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + [markdown_row(row) for row in rows])


def parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"quick-shape random model, {QUICK_REPEATS} repeat, {QUICK_NEW_TOKENS} new tokens (CI)")
    add_workload_args(parser)
    parser.add_argument("--methods", type=parse_list, help="comma-separated; default: every registered method")
    parser.add_argument("--budgets", type=lambda text: [int(b) for b in parse_list(text)], default=list(DEFAULT_BUDGETS),
                        help="comma-separated target layer-averaged vision tokens (default 192,128,64)")
    parser.add_argument("--repeats", type=int, help=f"timed runs per setting (default {FULL_REPEATS}, quick {QUICK_REPEATS})")
    parser.add_argument("--new-tokens", type=int,
                        help=f"tokens decoded per run (default {FULL_NEW_TOKENS}, quick {QUICK_NEW_TOKENS})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (QUICK_REPEATS if args.quick else FULL_REPEATS)
    args.new_tokens = args.new_tokens or (QUICK_NEW_TOKENS if args.quick else FULL_NEW_TOKENS)
    check_decode_length(parser, [args.new_tokens], "--new-tokens")
    if not args.budgets or min(args.budgets) < 1:
        parser.error(f"--budgets must be positive token counts, got {args.budgets}")
    args.methods = checked_methods(parser, args.methods)
    return args


def checked_methods(parser: argparse.ArgumentParser, methods: list[str] | None) -> list[str]:
    """The methods asked for (default: every registered one); an unknown name is a usage error."""
    known = registered_methods()
    unknown = sorted(set(methods or known) - set(known))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(known)}")
    return methods or known


def describe_run(args: argparse.Namespace, work: Workload, dtype: torch.dtype, skipped: dict[str, str]) -> str:
    notes = "".join(f"\n\nSkipped {label}: {why}" for label, why in skipped.items())
    return (f"Model: {work.description}.\n\nDevice {args.device} ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads), dtype {dtype}, {args.new_tokens} new tokens (EOS off), median of "
            f"{args.repeats} interleaved repeat(s) after a warm-up. Each method is built with budget=<target "
            f"layer-averaged vision tokens> (budget \"own\": a method that picks its own count, with its defaults); "
            f"the tokens column gives what it reached (and minus the target). "
            f"Ratios to \"none\" in parentheses. Prefill: vision encoding + LLM prefill. Peak extra memory: "
            f"{memory_note(args.device)}, one extra run per setting.{notes}")


@interruptible
def main(argv: list[str] | None = None) -> list[dict]:
    """Run the comparison, print the table and write compare.json, compare.md and compare.png."""
    args = parse_args(argv)
    dtype, started = start_run(args)
    settings, skipped = build_settings(args.methods, args.budgets)
    work = load_workload(args, dtype)
    settings = warm_up(work, settings, args.new_tokens, skipped)
    runs = measure(work, {s.label: s.drop for s in settings}, args.repeats, args.new_tokens)
    rows = compare_rows(settings, runs)
    header = describe_run(args, work, dtype, skipped)
    table = markdown_table(rows)
    source = args.model_path or f"random LLaVA-1.5 model, shape {shape_name(args)}"
    title = f"Dropping methods at budgets {args.budgets}: {source} ({args.device}, {dtype}, {args.new_tokens} new tokens)"
    save_results(args, OUTPUT_STEM, header, table, {"skipped": skipped, "rows": rows},
                 lambda path: tokens_lines(rows, args.budgets, title, path), started)
    return rows


if __name__ == "__main__":
    main()
