"""`python -m llava.eval.report --paper`: the paper's layout, its Avg, CSV, references and refusals.

Every expected number below is worked out by hand from the summaries the test writes.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest

from llava.eval import report
from llava.eval.paper_table import columns_by_benchmark
from llava.eval.scoring import run_summary
from llava.eval.tasks import discover_tasks
from tests.conftest import REPO_ROOT

MODEL = "llava-v1.5-7b"


def write_summary(root, benchmark, method, setting, scores, tokens=576.0, flops=1.0, prefill=0.1, model=MODEL):
    """A summary.json as run_summary writes it, in a folder of its own under `root`."""
    folder = root / f"{model}-{benchmark}-{method}-{setting}"
    folder.mkdir(parents=True)
    path = folder / "summary.json"
    path.write_text(json.dumps({
        "benchmark": benchmark, "model": model, "method": method, "setting": setting, "questions": 10,
        "scores": scores, "mean_vision_tokens": tokens, "mean_prefill_flops_ratio": flops,
        "median_prefill_seconds": prefill}))
    return path


def paper(capsys, *args):
    """(stdout lines, stderr lines) of one `report --paper` run."""
    capsys.readouterr()
    report.main(["--paper", *map(str, args)])
    captured = capsys.readouterr()
    return captured.out.splitlines(), captured.err.splitlines()


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip("|").split("|")]


def rows_by_method(lines: list[str]) -> dict[str, dict[str, str]]:
    header = cells(lines[0])
    return {row[1]: dict(zip(header, row)) for row in map(cells, lines[2:])}


def two_benchmark_runs(root):
    """Unpruned: GQA 60, POPE F1 80. fastv 64: GQA 50, POPE F1 80, so its Avg is (50/60 + 80/80) / 2."""
    write_summary(root, "gqa", "none", "full", {"accuracy": 60.0})
    write_summary(root, "pope", "none", "full", {"mean_f1": 80.0, "mean_accuracy": 99.0})
    write_summary(root, "gqa", "fastv", "64", {"accuracy": 50.0}, tokens=60.0, flops=0.2, prefill=0.04)
    write_summary(root, "pope", "fastv", "64", {"mean_f1": 80.0, "mean_accuracy": 10.0}, tokens=68.0, flops=0.3,
                  prefill=0.06)


def test_paper_table_rows_columns_and_avg(tmp_path, capsys):
    two_benchmark_runs(tmp_path)
    out, err = paper(capsys, tmp_path)
    assert cells(out[0]) == ["model", "method", "setting", "GQA", "POPE", "Avg", "vision tokens", "FLOPs ratio",
                             "prefill ms"]
    rows = rows_by_method(out)
    assert list(rows) == ["none", "fastv"]  # the unpruned row first, as in the paper
    assert rows["none"]["Avg"] == "100.0"
    fastv = rows["fastv"]
    assert (fastv["GQA"], fastv["POPE"]) == ("50.0", "80.0")  # POPE is F1, not accuracy
    assert fastv["Avg"] == f"{100 * (50 / 60 + 1) / 2:.1f}" == "91.7"
    # figures: means over the row's two benchmarks
    assert (fastv["vision tokens"], fastv["FLOPs ratio"], fastv["prefill ms"]) == ("64.0", "0.250", "50.0")
    assert err == []


@pytest.mark.parametrize("benchmark, scores, column, shown", [
    ("MME", {"perception": 1510.7, "cognition": 355.7, "total": 1866.4}, "MME", "1510.7"),
    ("mme", {"perception": 1400.0, "total": 1700.0}, "MME", "1400.0"),
    ("scienceqa", {"accuracy": 70.0, "img_accuracy": 69.5}, "SQA-IMG", "69.5"),
    ("llava-bench-in-the-wild", {"all": {"relative": 65.4, "model": 5.2}, "conv": {"relative": 50.0}},
     "LLaVA-Bench", "65.4"),
    ("mmbench_cn", {"accuracy": 58.3, "single_round_accuracy": 70.0}, "MMB-CN", "58.3"),
    ("seed_bench", {"accuracy": 66.1}, "SEED", "66.1"),
])
def test_each_benchmark_shows_the_papers_metric(tmp_path, capsys, benchmark, scores, column, shown):
    write_summary(tmp_path, benchmark, "mustdrop", "64", scores)
    out, _ = paper(capsys, tmp_path)
    assert rows_by_method(out)["mustdrop"][column] == shown


def test_every_registered_task_has_a_paper_column():
    columns = columns_by_benchmark()
    for task in discover_tasks().values():
        assert task.name in columns and task.folder.lower() in columns


def test_settings_read_as_in_the_paper(tmp_path, capsys):
    for setting in ("64", "192", "full", "128"):
        write_summary(tmp_path, "gqa", "none" if setting == "full" else "mustdrop", setting, {"accuracy": 60.0})
    out, _ = paper(capsys, tmp_path)
    assert [cells(line)[2] for line in out[2:]] == ["full", "192", "128", "64"]


def test_missing_unpruned_run_leaves_avg_empty_and_says_so(tmp_path, capsys):
    write_summary(tmp_path, "gqa", "mustdrop", "64", {"accuracy": 58.0})
    write_summary(tmp_path, "pope", "mustdrop", "64", {"mean_f1": 85.0})
    out, err = paper(capsys, tmp_path)
    assert rows_by_method(out)["mustdrop"]["Avg"] == ""
    assert err == [f"note: Avg left empty for {MODEL}: no unpruned run (method none)"]


def test_unpruned_run_without_the_benchmark_leaves_avg_empty(tmp_path, capsys):
    write_summary(tmp_path, "gqa", "none", "full", {"accuracy": 60.0})
    write_summary(tmp_path, "gqa", "mustdrop", "64", {"accuracy": 58.0})
    write_summary(tmp_path, "pope", "mustdrop", "64", {"mean_f1": 85.0})
    out, err = paper(capsys, tmp_path)
    assert rows_by_method(out)["mustdrop"]["Avg"] == ""
    assert len(err) == 1 and "no POPE score" in err[0]


def test_unpruned_score_of_zero_leaves_avg_empty(tmp_path, capsys):
    write_summary(tmp_path, "textvqa", "none", "full", {"accuracy": 0.0})
    write_summary(tmp_path, "textvqa", "mustdrop", "64", {"accuracy": 0.0})
    out, err = paper(capsys, tmp_path)
    assert all(row["Avg"] == "" for row in rows_by_method(out).values())
    assert err == [f"note: Avg left empty for {MODEL}'s rows with TextVQA: the unpruned score is 0"]


def test_avg_is_per_model(tmp_path, capsys):
    write_summary(tmp_path, "gqa", "none", "full", {"accuracy": 60.0})
    write_summary(tmp_path, "gqa", "none", "full", {"accuracy": 40.0}, model="llava-v1.5-13b")
    write_summary(tmp_path, "gqa", "mustdrop", "64", {"accuracy": 30.0}, model="llava-v1.5-13b")
    out, _ = paper(capsys, tmp_path)
    row = {(cells(line)[0], cells(line)[1]): cells(line)[4] for line in out[2:]}
    assert row["llava-v1.5-13b", "mustdrop"] == "75.0"  # 30 / 40, not 30 / 60


def test_summaries_the_runner_writes(tmp_path, capsys):
    """run_summary's own output (folder names as benchmark, method read from the flags) lands in its cell."""
    answers = tmp_path / "merge.jsonl"
    answers.write_text(json.dumps({"question_id": "q", "text": "a", "metadata": {
        "avg_vision_tokens": 64.0, "prefill_flops_ratio": 0.25, "prefill_seconds": 0.05, "vision_seconds": 0.01,
        "decode_seconds": 0.1, "new_tokens": 2}}) + "\n")
    for setting, flags, img_accuracy in (("full", "", 80.0), ("64", "--sparse --global_thr 0.011 --individual_thr 0.01", 60.0)):
        scores = tmp_path / f"scores-{setting}.json"
        scores.write_text(json.dumps({"accuracy": 1.0, "img_accuracy": img_accuracy}))
        folder = tmp_path / "scienceqa" / setting
        folder.mkdir(parents=True)
        run_summary.main(["--answers-file", str(answers), "--benchmark", "scienceqa", "--setting", setting,
                          "--model-path", f"/ckpt/{MODEL}/", "--scores-file", str(scores), "--drop-flags", flags,
                          "--out", str(folder / "summary.json")])
    out, _ = paper(capsys, tmp_path / "scienceqa")
    rows = rows_by_method(out)
    assert rows["mustdrop"]["SQA-IMG"] == "60.0" and rows["mustdrop"]["Avg"] == "75.0"  # 60 / 80
    assert rows["none"]["setting"] == "full" and rows["mustdrop"]["vision tokens"] == "64.0"


def test_csv_output(tmp_path, capsys):
    two_benchmark_runs(tmp_path)
    capsys.readouterr()
    report.main(["--paper", "--csv", str(tmp_path)])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(row["method"], row["setting"], row["GQA"], row["POPE"], row["Avg"]) for row in rows] == [
        ("none", "full", "60.0", "80.0", "100.0"), ("fastv", "64", "50.0", "80.0", "91.7")]


def test_csv_output_of_the_runs_table(tmp_path, capsys):
    write_summary(tmp_path, "gqa", "fastv", "64", {"accuracy": 50.0}, tokens=60.0)
    capsys.readouterr()
    report.main(["--csv", str(tmp_path)])
    (row,) = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert (row["benchmark"], row["method"], row["vision tokens"]) == ("gqa", "fastv", "60.0")


def test_reference_numbers_and_difference(tmp_path, capsys):
    runs = tmp_path / "runs"
    two_benchmark_runs(runs)
    reference = tmp_path / "published.csv"
    reference.write_text("model,method,setting,GQA,POPE,Avg\n"
                         f"{MODEL},none,full,61.9,85.9,100%\n"
                         f"{MODEL},fastv,64,46.1,,\n"
                         f"{MODEL},mustdrop,64,53.1,82.6,\n")
    out, _ = paper(capsys, runs, "--reference", reference)
    header = cells(out[0])
    assert header[3:12] == ["GQA", "GQA ref", "GQA diff", "POPE", "POPE ref", "POPE diff", "Avg", "Avg ref", "Avg diff"]
    rows = rows_by_method(out)
    assert [rows["none"][name] for name in ("GQA ref", "GQA diff", "POPE diff", "Avg diff")] == ["61.9", "-1.9", "-5.9", "+0.0"]
    assert [rows["fastv"][name] for name in ("GQA diff", "POPE ref", "POPE diff")] == ["+3.9", "", ""]
    # a published row without a run of ours is shown with its numbers only
    assert [rows["mustdrop"][name] for name in ("GQA", "GQA ref", "GQA diff")] == ["", "53.1", ""]


def test_our_csv_table_reads_back_as_a_reference(tmp_path, capsys):
    two_benchmark_runs(tmp_path / "runs")
    capsys.readouterr()
    report.main(["--paper", "--csv", str(tmp_path / "runs")])
    saved = tmp_path / "saved.csv"
    saved.write_text(capsys.readouterr().out)
    out, _ = paper(capsys, tmp_path / "runs", "--reference", saved)
    assert {rows_by_method(out)[method]["GQA diff"] for method in ("none", "fastv")} == {"+0.0"}


def summary_file(tmp_path, content) -> str:
    path = tmp_path / "summary.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


GOOD = {"benchmark": "gqa", "model": MODEL, "method": "none", "setting": "full", "scores": {"accuracy": 60.0}}


@pytest.mark.parametrize("content, says", [
    ("[1, 2]", "expected a JSON object, got a list"),
    ("{not json", "cannot parse"),
    ({**GOOD, "scores": [60.0]}, "'scores' must be an object"),
    ({**GOOD, "benchmark": 7}, "'benchmark' must be a string"),
    ({**GOOD, "mean_vision_tokens": "64"}, "'mean_vision_tokens' must be a finite number"),
    ({**GOOD, "mean_prefill_flops_ratio": float("nan")}, "'mean_prefill_flops_ratio' must be a finite number"),
    ({**GOOD, "scores": {"accuracy": "60"}}, "scores.accuracy must be a finite number"),
    ({key: value for key, value in GOOD.items() if key != "method"}, "lacks method"),
])
def test_wrongly_shaped_summary_is_refused_naming_it(tmp_path, content, says):
    path = summary_file(tmp_path, content)
    with pytest.raises(SystemExit) as stop:
        report.main(["--paper", path])
    assert path in str(stop.value) and says in str(stop.value)


@pytest.mark.parametrize("content, says", [
    ("model,method,GQA\nm,none,60\n", "lacks the column(s) setting"),
    ("model,method,setting,MMBench\nm,none,full,60\n", "unknown column(s) 'MMBench'"),
    ("model,method,setting,GQA\nm,none,full,sixty\n", "line 2, column GQA: 'sixty' is not a number"),
    ("model,method,setting,GQA\nm,none,full,60,1\n", "line 2: 4 columns expected"),
    ("model,method,setting,GQA\nm,none,full,60\nm,none,full,61\n", "line 3: m none full is given twice"),
    ("model,method,setting,GQA\n", "holds no rows"),
    ("", "lacks the column(s) model, method, setting"),
])
def test_wrongly_shaped_reference_is_refused_naming_it(tmp_path, content, says):
    write_summary(tmp_path / "runs", "gqa", "none", "full", {"accuracy": 60.0})
    reference = tmp_path / "published.csv"
    reference.write_text(content)
    with pytest.raises(SystemExit) as stop:
        report.main(["--paper", str(tmp_path / "runs"), "--reference", str(reference)])
    assert str(reference) in str(stop.value) and says in str(stop.value)


def test_two_runs_for_one_cell_are_refused(tmp_path):
    first = write_summary(tmp_path / "a", "gqa", "mustdrop", "64", {"accuracy": 58.0})
    second = write_summary(tmp_path / "b", "gqa", "mustdrop", "64", {"accuracy": 57.0})
    with pytest.raises(SystemExit) as stop:
        report.main(["--paper", str(tmp_path)])
    assert str(first) in str(stop.value) and str(second) in str(stop.value)


def test_two_unpruned_runs_of_one_model_are_refused(tmp_path):
    write_summary(tmp_path, "gqa", "none", "full", {"accuracy": 60.0})
    write_summary(tmp_path, "gqa", "none", "full-bf16", {"accuracy": 59.0})
    with pytest.raises(SystemExit, match="two unpruned runs"):
        report.main(["--paper", str(tmp_path)])


def test_unknown_benchmark_is_left_out_with_a_note(tmp_path, capsys):
    write_summary(tmp_path, "gqa", "none", "full", {"accuracy": 60.0})
    write_summary(tmp_path, "demo", "none", "full", {"accuracy": 1.0})
    out, err = paper(capsys, tmp_path)
    assert len(out) == 3 and len(err) == 1 and "benchmark 'demo' is not a column" in err[0]


def test_reference_needs_paper(tmp_path):
    write_summary(tmp_path, "gqa", "none", "full", {"accuracy": 60.0})
    with pytest.raises(SystemExit, match="add --paper"):
        report.main([str(tmp_path), "--reference", str(tmp_path / "x.csv")])


def test_refusal_is_one_line_without_a_traceback(tmp_path):
    path = summary_file(tmp_path, {**GOOD, "scores": "high"})
    done = subprocess.run([sys.executable, "-m", "llava.eval.report", "--paper", path], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.splitlines() == [f"error: {path} is not a run summary: 'scores' must be an object, got a string"]


def test_a_benchmark_run_without_its_score_keeps_its_column(tmp_path, capsys):
    """VQAv2 is scored by its server: the converter writes counts only, and the cell stays empty."""
    write_summary(tmp_path, "vqav2", "mustdrop", "64", {"answered": 10, "total": 10})
    out, _ = paper(capsys, tmp_path)
    assert rows_by_method(out)["mustdrop"]["VQAv2"] == ""
