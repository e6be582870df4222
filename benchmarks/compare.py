"""Every registered dropping method at the same token budgets, against no dropping, in one run.

Each method is built with `budget=<target layer-averaged vision tokens>` and timed on one model and
one prompt, interleaved per repeat after a warm-up (the measurement, model and prompt are those of
`prefill_decode.py`), so that a busy machine slows every setting alike; read the ratios to "none".

    python benchmarks/compare.py [--quick] [--model-path P] [--methods mustdrop,fastv,...]
                                 [--budgets 192,128,64] [--repeats N] [--new-tokens N]
                                 [--device cpu|cuda] [--dtype D] [--threads N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: the benchmark runs headless (CI, remote GPU boxes)
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/compare.py` from a plain checkout
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.prefill_decode import (  # noqa: E402
    BASELINE,
    DEFAULT_THREADS,
    FULL_SHAPE,
    MIB,
    QUICK_SHAPE,
    Workload,
    checkpoint_workload,
    peak_extra_memory,
    random_workload,
    run_once,
    summarize,
)
from llava.drop.methods import DropMethod, create_method  # noqa: E402
from llava.drop.methods.registry import METHODS, discover_methods  # noqa: E402
from llava.model.builder import resolve_dtype  # noqa: E402

DEFAULT_BUDGETS = (192, 128, 64)  # the paper's LLaVA-1.5 settings (layer-averaged vision tokens)
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "compare"
QUICK_REPEATS, FULL_REPEATS = 1, 3
QUICK_NEW_TOKENS, FULL_NEW_TOKENS = 4, 32
BUDGET_OPTION = "budget"
NO_BUDGET = "-"  # the baseline row's budget cell
OUTPUT_STEM = "compare"


def budget_label(method: str, budget: int) -> str:
    return f"{method}@{budget}"


@dataclass(frozen=True)
class Setting:
    """One row of the comparison: a method built at one budget (budget None: the baseline)."""

    method: str
    budget: int | None
    drop: DropMethod

    @property
    def label(self) -> str:
        return BASELINE if self.budget is None else budget_label(self.method, self.budget)


def registered_methods() -> list[str]:
    """Every registered method except the baseline, in registry order."""
    discover_methods()
    return [name for name in METHODS if name != BASELINE]


def build_settings(methods: list[str], budgets: list[int]) -> tuple[list[Setting], dict[str, str]]:
    """The baseline, then each method at each budget; one that cannot be built is skipped with a note."""
    settings = [Setting(BASELINE, None, create_method(BASELINE))]
    skipped: dict[str, str] = {}
    for name in methods:
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


def measure(work: Workload, settings: list[Setting], repeats: int, new_tokens: int) -> dict[str, list[dict]]:
    """Time the (warmed-up) settings interleaved per repeat; peak memory in one extra pass each."""
    runs: dict[str, list[dict]] = {s.label: [] for s in settings}
    for _ in range(repeats):
        for setting in settings:
            runs[setting.label].append(run_once(work, setting.drop, new_tokens))
    for setting in settings:
        peak = peak_extra_memory(work, setting.drop, new_tokens)
        for run in runs[setting.label]:
            run["peak_memory_bytes"] = peak
    return runs


def compare_rows(settings: list[Setting], runs: dict[str, list[dict]]) -> list[dict]:
    """`summarize`'s medians and ratios, tagged with method and target budget."""
    by_label = {s.label: s for s in settings}
    rows = summarize(runs)
    for row in rows:
        setting = by_label[row["setting"]]
        row["method"], row["budget"] = setting.method, setting.budget
    return rows


def ratio_cell(value: float, ratio: float, fmt: str) -> str:
    return f"{fmt.format(value)} ({ratio:.2f}x)"


def markdown_row(row: dict) -> str:
    budget = NO_BUDGET if row["budget"] is None else str(row["budget"])
    overshoot = "" if row["budget"] is None else f" ({row['avg_vision_tokens'] - row['budget']:+.1f})"
    cells = [
        row["method"], budget,
        f"{row['avg_vision_tokens']:.1f}{overshoot}",
        f"{row['flops_ratio']:.3f}",
        ratio_cell(row["prefill_total_s"], row["prefill_total_ratio"], "{:.3f}"),
        ratio_cell(row["decode_tok_s"], row["decode_tok_s_ratio"], "{:.1f}"),
        ratio_cell(row["kv_cache_bytes"] / MIB, row["kv_cache_ratio"], "{:.2f}"),
        ratio_cell(row["peak_memory_bytes"] / MIB, row["peak_memory_ratio"], "{:.1f}"),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown_table(rows: list[dict]) -> str:
    """One row per method x budget after the baseline; ratios to "none" in parentheses."""
    header = ["method", "budget", "avg vision tokens (vs budget)", "FLOPs ratio", "prefill (vision+LLM) s",
              "decode tok/s", "KV cache MiB", "peak extra MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + [markdown_row(row) for row in rows])


def plot(rows: list[dict], budgets: list[int], title: str, path: Path) -> None:
    """Prefill time ratio and FLOPs ratio against layer-averaged tokens: one line per method."""
    baseline = next(row for row in rows if row["budget"] is None)
    methods = list(dict.fromkeys(row["method"] for row in rows if row["budget"] is not None))
    panels = (("prefill_total_ratio", 'prefill time, vision + LLM (ratio to "none")'),
              ("flops_ratio", 'theoretical LLM prefill FLOPs (ratio to "none")'))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, (key, ylabel) in zip(axes, panels):
        for budget in budgets:
            ax.axvline(budget, color="lightgrey", linewidth=0.8, linestyle=":")
        for method in methods:
            points = [row for row in rows if row["method"] == method]
            ax.plot([r["avg_vision_tokens"] for r in points], [r[key] for r in points], marker="o", label=method)
        ax.plot(baseline["avg_vision_tokens"], baseline[key], marker="*", markersize=14, color="black",
                linestyle="none", label='none (no dropping)')
        ax.set_xlabel("layer-averaged vision tokens reached (dotted: target budgets)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"narrow random model, {QUICK_REPEATS} repeat, {QUICK_NEW_TOKENS} new tokens (CI)")
    parser.add_argument("--model-path", help="a LLaVA-1.5 checkpoint; default: a random model")
    parser.add_argument("--methods", type=parse_list, help="comma-separated; default: every registered method")
    parser.add_argument("--budgets", type=lambda text: [int(b) for b in parse_list(text)], default=list(DEFAULT_BUDGETS),
                        help="comma-separated target layer-averaged vision tokens (default 192,128,64)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", help="float32, float16 or bfloat16; default fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--repeats", type=int, help=f"timed runs per setting (default {FULL_REPEATS}, quick {QUICK_REPEATS})")
    parser.add_argument("--new-tokens", type=int,
                        help=f"tokens decoded per run (default {FULL_NEW_TOKENS}, quick {QUICK_NEW_TOKENS})")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch intra-op threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (QUICK_REPEATS if args.quick else FULL_REPEATS)
    args.new_tokens = args.new_tokens or (QUICK_NEW_TOKENS if args.quick else FULL_NEW_TOKENS)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2: the first token comes from prefill, decode needs one more")
    if not args.budgets or min(args.budgets) < 1:
        parser.error(f"--budgets must be positive token counts, got {args.budgets}")
    known = registered_methods()
    args.methods = args.methods or known
    unknown = sorted(set(args.methods) - set(known))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(known)}")
    return args


def load_workload(args: argparse.Namespace, dtype: torch.dtype) -> Workload:
    if args.model_path:
        return checkpoint_workload(args.model_path, args.device, dtype)
    return random_workload(QUICK_SHAPE if args.quick else FULL_SHAPE, args.seed, args.device, dtype)


def describe_run(args: argparse.Namespace, work: Workload, dtype: torch.dtype, skipped: dict[str, str]) -> str:
    memory_note = ("torch.cuda.max_memory_allocated minus allocated before" if args.device.startswith("cuda")
                   else "running sum of torch CPU allocator events (torch.profiler), minus allocated before")
    notes = "".join(f"\n\nSkipped {label}: {why}" for label, why in skipped.items())
    return (f"Model: {work.description}.\n\nDevice {args.device} ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads), dtype {dtype}, {args.new_tokens} new tokens (EOS off), median of "
            f"{args.repeats} interleaved repeat(s) after a warm-up. Each method is built with budget=<target "
            f"layer-averaged vision tokens>; the tokens column gives what it reached (and minus the target). "
            f"Ratios to \"none\" in parentheses. Prefill: vision encoding + LLM prefill. Peak extra memory: "
            f"{memory_note}, one extra run per setting.{notes}")


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the comparison, print the table and write compare.json, compare.md and compare.png."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, args.device)
    started = time.perf_counter()
    settings, skipped = build_settings(args.methods, args.budgets)
    work = load_workload(args, dtype)
    settings = warm_up(work, settings, args.new_tokens, skipped)
    rows = compare_rows(settings, measure(work, settings, args.repeats, args.new_tokens))
    header = describe_run(args, work, dtype, skipped)
    table = markdown_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{OUTPUT_STEM}.md").write_text(f"{header}\n\n{table}\n")
    (args.out / f"{OUTPUT_STEM}.json").write_text(json.dumps(
        {"header": header, "args": {k: str(v) for k, v in vars(args).items()}, "skipped": skipped, "rows": rows},
        indent=2) + "\n")
    source = args.model_path or ("random quick model" if args.quick else "random LLaVA-1.5-shaped model")
    title = f"Dropping methods at budgets {args.budgets}: {source} ({args.device}, {dtype}, {args.new_tokens} new tokens)"
    plot(rows, args.budgets, title, args.out / f"{OUTPUT_STEM}.png")
    print(header + "\n\n" + table)
    print(f"\nwrote {args.out}/{OUTPUT_STEM}.{{md,json,png}} in {time.perf_counter() - started:.1f} s")
    return rows


if __name__ == "__main__":
    main()
