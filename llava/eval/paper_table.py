"""The MustDrop paper's table from run summaries: one row per (model, method, setting), one column per
benchmark with the metric the paper prints, an "Avg" of the scores relative to the same model's
unpruned run, and the row's layer-averaged vision tokens, FLOPs ratio and prefill time.

`python -m llava.eval.report --paper DIR...` prints it; this module only lays it out, from summaries
that `llava.eval.report` has found and checked, so there is one reader of summary.json.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

from llava.eval.cli_errors import RunError
from llava.eval.tasks import discover_tasks

UNPRUNED_METHOD = "none"  # what run_summary records for a run without dropping (the runner's setting "full")
PERCENT = 100.0
KEY_COLUMNS = ("model", "method", "setting")
AVG = "Avg"
FIGURE_SOURCES = {  # table column -> (summary.json field, scale, digits shown)
    "vision tokens": ("mean_vision_tokens", 1.0, 1),
    "FLOPs ratio": ("mean_prefill_flops_ratio", 1.0, 3),
    "prefill ms": ("median_prefill_seconds", 1000.0, 1),  # median over answers: warm-up left out
}
FIGURE_COLUMNS = tuple(FIGURE_SOURCES)
REFERENCE_SUFFIX, DIFF_SUFFIX = " ref", " diff"
EMPTY = ""


@dataclass(frozen=True)
class PaperColumn:
    """A benchmark as the paper prints it: its header, the registered task, and where its metric sits
    in the run's scores.json (a path of keys)."""

    header: str
    task: str
    metric: tuple[str, ...]


# The paper's benchmarks in this order. VQAv2 and VizWiz are scored by their EvalAI servers and MM-Vet
# by its GPT-4 evaluator: write that score into the run's scores.json under this key to see it here.
PAPER_COLUMNS = (
    PaperColumn("GQA", "gqa", ("accuracy",)),
    PaperColumn("MMB", "mmbench", ("accuracy",)),
    PaperColumn("MMB-CN", "mmbench_cn", ("accuracy",)),
    PaperColumn("MME", "mme", ("perception",)),
    PaperColumn("POPE", "pope", ("mean_f1",)),
    PaperColumn("SQA-IMG", "sqa", ("img_accuracy",)),
    PaperColumn("VQAv2", "vqav2", ("accuracy",)),
    PaperColumn("TextVQA", "textvqa", ("accuracy",)),
    PaperColumn("VizWiz", "vizwiz", ("accuracy",)),
    PaperColumn("SEED", "seed", ("accuracy",)),
    PaperColumn("MM-Vet", "mmvet", ("total",)),
    PaperColumn("LLaVA-Bench", "llavabench", ("all", "relative")),
)
BENCHMARK_HEADERS = tuple(column.header for column in PAPER_COLUMNS)
SCORE_COLUMNS = (*BENCHMARK_HEADERS, AVG)  # what a reference file's numbers are compared on


def columns_by_benchmark() -> dict[str, PaperColumn]:
    """Each column under the names a summary's `benchmark` may carry: the task's name and its folder
    (the runner records the folder, e.g. "MME", "scienceqa"), lower-cased."""
    tasks = discover_tasks()
    names = {}
    for column in PAPER_COLUMNS:
        names[column.task] = column
        names[tasks[column.task].folder.lower()] = column
    return names


RowKey = tuple[str, str, str]  # (model, method, setting)


@dataclass
class PaperRow:
    """One (model, method, setting): the benchmarks it ran, its score per benchmark header (where the
    scorer wrote one) and its efficiency figures (means over its benchmarks' runs)."""

    model: str
    method: str
    setting: str
    benchmarks: set[str] = field(default_factory=set)
    scores: dict[str, float] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    avg: float | None = None

    @property
    def key(self) -> RowKey:
        return self.model, self.method, self.setting


def metric_value(summary: Mapping, column: PaperColumn, path: Path) -> float | None:
    """The column's metric in the summary's scores; None when the scorer did not write it."""
    value = summary.get("scores") or {}
    for key in column.metric:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RunError(f"{path}: scores.{'.'.join(column.metric)} must be a finite number, got {value!r}")
    return float(value)


def row_key(summary: Mapping, path: Path) -> RowKey:
    """(model, method, setting) of a summary; a summary without them has no place in the table."""
    missing = [name for name in KEY_COLUMNS if not summary.get(name)]
    if missing:
        raise RunError(f"{path}: lacks {', '.join(missing)}, which place a run in the paper's table")
    return tuple(str(summary[name]) for name in KEY_COLUMNS)


def summary_figures(summary: Mapping) -> dict[str, float]:
    """The efficiency figures a summary records, by table column."""
    return {name: summary[source] * scale for name, (source, scale, _) in FIGURE_SOURCES.items()
            if summary.get(source) is not None}


def paper_rows(summaries: Iterable[tuple[Path, Mapping]]) -> tuple[list[PaperRow], list[str]]:
    """The table's rows from checked summaries, and a note for each benchmark that is no paper column.
    Two runs of one benchmark in one row are refused: which one the paper's cell shows would be a guess."""
    columns = columns_by_benchmark()
    rows: dict[RowKey, PaperRow] = {}
    figures: dict[RowKey, list[dict[str, float]]] = {}
    seen: dict[tuple[RowKey, str], Path] = {}
    skipped: dict[str, Path] = {}
    for path, summary in summaries:
        column = columns.get(str(summary.get("benchmark", "")).lower())
        if column is None:
            skipped.setdefault(str(summary.get("benchmark")), path)
            continue
        key = row_key(summary, path)
        if (key, column.header) in seen:
            raise RunError(f"two {column.header} runs of {' '.join(key)}: {seen[key, column.header]} and {path}; "
                           "keep one")
        seen[key, column.header] = path
        row = rows.setdefault(key, PaperRow(*key))
        row.benchmarks.add(column.header)
        value = metric_value(summary, column, path)
        if value is not None:
            row.scores[column.header] = value
        figures.setdefault(key, []).append(summary_figures(summary))
    for key, row in rows.items():
        row.figures = {name: mean(f[name] for f in figures[key] if name in f)
                       for name in FIGURE_COLUMNS if any(name in f for f in figures[key])}
    notes = [f"left out {path}: benchmark {name!r} is not a column of the paper's table"
             for name, path in skipped.items()]
    return sorted(rows.values(), key=lambda row: row_order(row.key)), notes


def unpruned_rows(rows: Iterable[PaperRow]) -> dict[str, PaperRow]:
    """Each model's unpruned row; a model with two (two settings of method none) is refused."""
    unpruned: dict[str, PaperRow] = {}
    for row in rows:
        if row.method != UNPRUNED_METHOD:
            continue
        if row.model in unpruned:
            raise RunError(f"model {row.model} has two unpruned runs (settings {unpruned[row.model].setting} and "
                           f"{row.setting}): Avg divides by one of them; keep one")
        unpruned[row.model] = row
    return unpruned


def fill_averages(rows: list[PaperRow]) -> list[str]:
    """Set each row's Avg: the mean over its benchmarks of score / the same model's unpruned score, in
    percent (as MustDrop's tables report it). Where that cannot be computed Avg stays empty, and the
    returned notes (one line each) say why."""
    unpruned = unpruned_rows(rows)
    notes = []
    for model in sorted({row.model for row in rows if row.scores}):
        base = unpruned.get(model)
        if base is None:
            notes.append(f"Avg left empty for {model}: no unpruned run (method {UNPRUNED_METHOD})")
            continue
        zero = [name for name, score in base.scores.items() if score == 0]
        if zero:
            notes.append(f"Avg left empty for {model}'s rows with {', '.join(zero)}: the unpruned score is 0")
    for row in rows:
        base = unpruned.get(row.model)
        if base is None or not row.scores:
            continue
        lacking = [name for name in row.scores if name not in base.scores]
        if lacking:
            notes.append(f"Avg left empty for {' '.join(row.key)}: the unpruned run has no {', '.join(lacking)} score")
        elif all(base.scores[name] != 0 for name in row.scores):
            row.avg = PERCENT * mean(score / base.scores[name] for name, score in row.scores.items())
    return notes


def setting_order(setting: str) -> tuple[int, float, str]:
    """Numbers first, largest first (192, 128, 64, as the paper), then names."""
    try:
        return 0, -float(setting), setting
    except ValueError:
        return 1, 0.0, setting


def row_order(key: RowKey) -> tuple:
    model, method, setting = key
    return model, method != UNPRUNED_METHOD, method, setting_order(setting)


def number(value: float | None, digits: int = 1) -> str:
    return EMPTY if value is None else f"{value:.{digits}f}"


def difference(ours: float | None, reference: float | None) -> str:
    return EMPTY if ours is None or reference is None else f"{ours - reference:+.1f}"


def layout(rows: list[PaperRow], reference: Mapping[RowKey, Mapping[str, float]] | None = None
           ) -> tuple[list[str], list[list[str]]]:
    """Header and cells: the benchmarks that any row ran (or the reference scores), in the paper's order,
    then Avg and the figures; with a reference, each score column is followed by the reference's value
    and ours minus it. A reference row without a run of ours is shown with its numbers only."""
    reference = reference or {}
    ours = {row.key: row for row in rows}
    keys = sorted(set(ours) | set(reference), key=row_order)
    present = {name for row in rows for name in row.benchmarks} | {name for values in reference.values() for name in values}
    shown = [name for name in BENCHMARK_HEADERS if name in present] + [AVG]
    header = list(KEY_COLUMNS)
    for name in shown:
        header += [name, name + REFERENCE_SUFFIX, name + DIFF_SUFFIX] if reference else [name]
    header += FIGURE_COLUMNS
    cells = []
    for key in keys:
        row = ours.get(key, PaperRow(*key))
        line = list(key)
        for name in shown:
            value = row.avg if name == AVG else row.scores.get(name)
            line.append(number(value))
            if reference:
                published = reference.get(key, {}).get(name)
                line += [number(published), difference(value, published)]
        line += [number(row.figures.get(name), digits) for name, (_, _, digits) in FIGURE_SOURCES.items()]
        cells.append(line)
    return header, cells
