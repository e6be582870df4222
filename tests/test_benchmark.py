"""`benchmarks/gpu.sh --quick` runs the seven benchmarks end to end in CI (prefill/decode, also with `--next`
and `--qwen`, compare, and short-answer throughput on LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL) and each reports sane, ordered numbers;
the model shapes have the stated widths."""

from __future__ import annotations

import json
import subprocess

import torch
from transformers import LlavaForConditionalGeneration

from llava.bench.next_settings import NEXT_TARGETS
from llava.bench.prefill_decode import QWEN_KEEPS, SETTINGS, parse_args, qwen_settings
from llava.bench.workload import BASELINE, RATIO_OF, SHAPES, shape_name
from llava.model.random_llava import LLM_LAYERS, VISION_LAYERS, transformers_config
from tests.conftest import REPO_ROOT

OUTPUT_FILES = ("results.json", "results.md", "results.png")

# LLaVA-NeXT's prompt image fills the 2 x 2 grid: 1 base image + 4 crops, 24 x 24 = 576 patches each.
# The model's own spatial_unpad layout: 576 (base) + 48 rows x (48 patches + 1 newline) = 576 + 2352 = 2928.
NEXT_UNPRUNED_TOKENS = 576 + 48 * (48 + 1)
# MustDrop's flat layout after stage 1: each of the 5 views keeps 12 of its 64 3x3 windows (the image's
# noise strips) and merges the other 52 into one token each: 5 x (52 + 12 x 9) = 5 x 160 = 800.
NEXT_TOKENS_AFTER_MERGE = 5 * (52 + 12 * 9)
NEXT_IMAGES = 5
QWEN_QUICK_TOKENS = 16 * 12  # the quick Qwen image, 448 x 336 px, in 28 px tokens
NEXT_TOLERANCE = 0.02  # MustDrop's layer-averaged tokens within 2 % of each target (the threshold search's stop)


def test_gpu_script_quick_runs_all_seven_on_cpu_with_sane_results(tmp_path):
    """One `gpu.sh --quick` run (the seven benchmarks at the quick shape, as CI can afford once) and what
    each of them must report."""
    done = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu.sh"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "transformers" in done.stdout
    runs = {name: json.loads((tmp_path / name / stem).read_text()) for name, stem in
            [("prefill_decode", "results.json"), ("next", "results.json"), ("compare", "compare.json"),
             ("throughput", "throughput.json"), ("throughput_next", "throughput.json"), ("qwen", "results.json"),
             ("throughput_qwen", "throughput.json")]}
    for saved in runs.values():
        assert saved["args"]["quick"] == "True" and saved["args"]["device"] == "cpu"
    check_prefill_decode(tmp_path / "prefill_decode", runs["prefill_decode"])
    check_next(runs["next"])
    assert runs["compare"]["args"]["budgets"] == "[64]"
    assert {row["budget"] for row in runs["compare"]["rows"]} == {None, 64}
    check_throughput(tmp_path / "throughput", runs["throughput"])
    check_throughput_next(tmp_path / "throughput_next", runs["throughput_next"])
    check_qwen(runs["qwen"])
    check_throughput_qwen(tmp_path / "throughput_qwen", runs["throughput_qwen"])


def with_limits(settings) -> list[str]:
    """The settings' row order: the settings, then a limit row for each dropping one."""
    names = list(settings)
    return names + [f"limit@{name}" for name in names[1:]]


def assert_ratios_to(baseline: dict, rows: list[dict]) -> None:
    """Every row's ratio columns are its own median over the baseline's (where the baseline's is not 0)."""
    for row in rows:
        for ratio, field in RATIO_OF.items():
            if baseline[field]:
                assert row[ratio] == row[field] / baseline[field], (row["setting"], ratio)


def check_prefill_decode(folder, saved: dict) -> None:
    """LLaVA-1.5's published settings in order, ratios to none, and a limit per setting."""
    for name in OUTPUT_FILES:
        assert (folder / name).stat().st_size > 0, name
    table = (folder / "results.md").read_text()
    for setting in SETTINGS:
        assert f"| {setting} |" in table
    assert saved["args"]["next"] == "False"
    rows = saved["rows"]
    assert [row["setting"] for row in rows] == with_limits(SETTINGS)
    by_setting = {row["setting"]: row for row in rows}
    assert_ratios_to(by_setting[BASELINE], rows)
    tokens = {name: row["avg_vision_tokens"] for name, row in by_setting.items()}
    assert tokens["64"] <= tokens["192"] <= tokens[BASELINE]
    for setting in list(SETTINGS)[1:]:  # each limit: the model fed exactly the setting's rounded average
        limit = by_setting[f"limit@{setting}"]
        assert limit["avg_vision_tokens"] == limit["vision_tokens_after_merge"] == round(tokens[setting])
        assert by_setting[setting]["prefill_vs_limit"] == by_setting[setting]["prefill_total_s"] / limit["prefill_total_s"]
    assert by_setting[BASELINE]["prefill_vs_limit"] is None


def check_next(saved: dict) -> None:
    """LLaVA-NeXT: the hand-counted unpruned and merged token counts, each target within tolerance."""
    assert saved["args"]["next"] == "True"
    expected = [BASELINE, *map(str, NEXT_TARGETS)]
    assert expected == ["none", "640", "320", "160"]
    assert [row["setting"] for row in saved["rows"]] == with_limits(expected)
    assert [pair["target"] for pair in saved["next_pairs"]] == list(NEXT_TARGETS)
    by_setting = {row["setting"]: row for row in saved["rows"]}
    unpruned = by_setting[BASELINE]
    assert unpruned["avg_vision_tokens"] == NEXT_UNPRUNED_TOKENS
    assert unpruned["avg_vision_tokens_per_image"] == NEXT_UNPRUNED_TOKENS / NEXT_IMAGES
    assert_ratios_to(unpruned, saved["rows"])
    for target in NEXT_TARGETS:
        row = by_setting[str(target)]
        assert row["vision_tokens_after_merge"] == NEXT_TOKENS_AFTER_MERGE
        assert abs(row["avg_vision_tokens"] - target) <= NEXT_TOLERANCE * target, (target, row["avg_vision_tokens"])
        assert row["avg_vision_tokens_per_image"] == row["avg_vision_tokens"] / NEXT_IMAGES
        assert row["kv_cache_ratio"] < 1 and row["flops_ratio"] < 1
    assert "2880 flat tokens" in saved["header"] and "= 2928 in the model's spatial_unpad layout" in saved["header"]


# TTFT (one new token) is measured apart from the whole batch (three), one run each on a shared CPU: the
# whole batch holds the same prefills and two more steps, and timing noise may eat part of that margin.
TIMING_SLACK = 1.5


def check_short_answer_rows(folder, saved: dict, settings: list[str], batch_sizes: list[int]) -> dict:
    """What every short-answer run must report: its rows in order, TTFT and questions/s measured and divided
    as stated, exact ratios 1.0 for "none" against itself and each limit against itself. Returns the rows by
    (setting, batch size)."""
    rows = saved["rows"]
    assert [(r["setting"], r["batch_size"], r["answer_tokens"], r["decode"]) for r in rows] == [
        (setting, size, 3, "eager") for size in batch_sizes for setting in settings]
    by_key = {(r["setting"], r["batch_size"]): r for r in rows}
    for row in rows:
        size, unpruned = row["batch_size"], by_key[(BASELINE, row["batch_size"])]
        assert row["same_tokens"] and row["peak_memory_bytes"] is None  # one decode mode; no peak on CPU
        assert 0 < row["ttft_s"] <= TIMING_SLACK * row["seconds"]
        assert row["questions_per_s"] == size / row["seconds"] and row["decode_tok_s"] > 0
        assert row["ttft_vs_none"] == row["ttft_s"] / unpruned["ttft_s"]
        assert row["questions_vs_none"] == row["questions_per_s"] / unpruned["questions_per_s"]
        assert row["questions_vs_batch1"] == row["questions_per_s"] / by_key[(row["setting"], 1)]["questions_per_s"]
        limit = by_key.get((f"limit@{row['budget']}", size))
        if row["setting"] == BASELINE:
            assert row["budget"] is None and limit is None
            assert row["ttft_vs_none"] == row["questions_vs_none"] == row["decode_vs_none"] == 1.0
            assert row["ttft_vs_limit"] is row["questions_vs_limit"] is None
        else:  # every budget has its limit row, fed exactly that many vision tokens
            assert row["setting"].endswith(f"@{row['budget']}") and limit["avg_vision_tokens"] == row["budget"]
            assert row["ttft_vs_limit"] == row["ttft_s"] / limit["ttft_s"]
            assert row["questions_vs_limit"] == row["questions_per_s"] / limit["questions_per_s"]
            assert row["kv_cache_bytes"] < unpruned["kv_cache_bytes"]
        if row["setting"].startswith("limit@"):
            assert row["ttft_vs_limit"] == row["questions_vs_limit"] == 1.0
    table = (folder / "throughput.md").read_text()
    for setting in settings:
        assert f"| {setting} |" in table
    assert "TTFT" in table and "limit@K" in saved["header"]
    assert (folder / "throughput.png").stat().st_size > 0
    return by_key


def check_throughput(folder, saved: dict) -> None:
    """LLaVA-1.5, short answers at batches 1 and 2: none, the limit at 64 and FastV at 64."""
    assert saved["args"]["next"] == "False" and saved["args"]["budgets"] == "[64]"
    assert saved["skipped"] == {}
    by_key = check_short_answer_rows(folder, saved, ["none", "limit@64", "fastv@64"], [1, 2])
    assert by_key[("none", 1)]["avg_vision_tokens"] == 576
    assert abs(by_key[("fastv@64", 2)]["avg_vision_tokens"] - 64) < 0.65  # the closed form rounds keep
    # two answers hold less than twice one answer's cache: the ragged second prompt is 3 text tokens shorter
    assert by_key[("none", 2)]["kv_cache_bytes"] < 2 * by_key[("none", 1)]["kv_cache_bytes"]


def check_throughput_next(folder, saved: dict) -> None:
    """LLaVA-NeXT at 160 tokens, batch 1: FastV refuses the budget (skipped with its reason), VisionZip runs."""
    assert saved["args"]["next"] == "True" and saved["args"]["budgets"] == "[160]"
    assert list(saved["skipped"]) == ["fastv@160"] and "below" in saved["skipped"]["fastv@160"]
    assert "Skipped fastv@160" in saved["header"]
    by_key = check_short_answer_rows(folder, saved, ["none", "limit@160", "visionzip@160"], [1])
    assert by_key[("none", 1)]["avg_vision_tokens"] == NEXT_UNPRUNED_TOKENS
    assert by_key[("visionzip@160", 1)]["avg_vision_tokens"] == 160  # VisionZip keeps exactly its budget


def check_qwen(saved: dict) -> None:
    """Qwen2.5-VL, the quick image's 16 x 12 = 192 tokens: FastV at each kept share and its limit, each
    reaching its count, each faster in the decoder than the unpruned model."""
    rows = {row["setting"]: row for row in saved["rows"]}
    assert list(rows) == with_limits(qwen_settings())
    assert rows[BASELINE]["avg_vision_tokens"] == QWEN_QUICK_TOKENS
    assert_ratios_to(rows[BASELINE], saved["rows"])
    for keep in QWEN_KEEPS:
        row, limit = rows[f"fastv@{keep}"], rows[f"limit@fastv@{keep}"]
        assert abs(row["avg_vision_tokens"] - keep * QWEN_QUICK_TOKENS) < 1
        assert limit["avg_vision_tokens"] == round(row["avg_vision_tokens"])
        assert row["flops_ratio"] < 1 and row["kv_cache_bytes"] < rows[BASELINE]["kv_cache_bytes"]


def check_throughput_qwen(folder, saved: dict) -> None:
    """Qwen2.5-VL at 32 tokens, batch 1: none, the limit and FastV."""
    assert saved["args"]["qwen"] == "True" and saved["args"]["budgets"] == "[32]"
    by_key = check_short_answer_rows(folder, saved, ["none", "limit@32", "fastv@32"], [1])
    assert by_key[("none", 1)]["avg_vision_tokens"] == QWEN_QUICK_TOKENS
    assert abs(by_key[("fastv@32", 1)]["avg_vision_tokens"] - 32) < 0.65


def test_7b_proportioned_shape_divides_every_width_of_7b_by_four():
    shape = SHAPES[shape_name(parse_args(["--shape", "7b-proportioned"]))]
    config = transformers_config(shape, next_model=False)
    vision, text = config.vision_config, config.text_config
    widths = (vision.hidden_size, vision.intermediate_size, vision.num_attention_heads,
              text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads)
    assert widths == (256, 1024, 4, 1024, 2752, 8, 8)
    llava_7b = SHAPES["7b"]
    assert (llava_7b.vision_hidden, llava_7b.vision_intermediate, llava_7b.vision_heads) == (1024, 4096, 16)
    assert (llava_7b.llm_hidden, llava_7b.llm_intermediate, llava_7b.llm_heads, llava_7b.llm_kv_heads) == (4096, 11008, 32, 32)
    assert widths == tuple(value // 4 for value in (1024, 4096, 16, 4096, 11008, 32, 32))
    assert (vision.num_hidden_layers, text.num_hidden_layers) == (VISION_LAYERS, LLM_LAYERS) == (24, 32)
    assert (vision.image_size // vision.patch_size) ** 2 == 576

    with torch.device("meta"):  # shapes only: no memory, no init time
        model = LlavaForConditionalGeneration._from_config(config)
    attention = model.model.language_model.layers[0].self_attn
    assert tuple(attention.q_proj.weight.shape) == (1024, 1024)
    assert tuple(model.model.language_model.layers[0].mlp.up_proj.weight.shape) == (2752, 1024)
    assert tuple(model.model.vision_tower.encoder.layers[0].mlp.fc1.weight.shape) == (1024, 256)


def test_throughput_ratios_compare_within_a_decode_step_against_none_the_limit_and_eager():
    """Hand-made rows: "x none" divides by the unpruned row of the same decode step and batch, "x limit" by the
    limit at the row's budget (same step and batch), "x batch 1" by the same setting and step at batch 1,
    "x eager" by the same setting decoded eagerly; a missing row gives None ("-" in the table), and a step
    that decoded other tokens is marked."""
    from llava.bench.throughput import add_ratios, markdown_table

    def row(setting, budget, decode, size, ttft_s, decode_tok_s, questions_per_s, same=True):
        return {"setting": setting, "budget": budget, "decode": decode, "answer_tokens": 128, "batch_size": size,
                "same_tokens": same, "ttft_s": ttft_s, "decode_tok_s": decode_tok_s,
                "questions_per_s": questions_per_s, "avg_vision_tokens": 64.0, "kv_cache_bytes": 2**20,
                "peak_memory_bytes": None}

    rows = add_ratios([row("none", None, "eager", 1, 0.4, 40.0, 0.5), row("limit@64", 64, "eager", 1, 0.1, 80.0, 2.0),
                       row("fastv@64", 64, "eager", 1, 0.2, 50.0, 0.8),
                       row("none", None, "cuda-graph", 1, 0.4, 120.0, 1.0),
                       row("fastv@64", 64, "cuda-graph", 1, 0.2, 150.0, 1.2, False),
                       row("none", None, "cuda-graph", 16, 6.4, 960.0, 8.0),
                       row("fastv@64", 64, "cuda-graph", 16, 1.6, 1440.0, 9.6)])
    unpruned, limit, eager, graph, graph16 = rows[0], rows[1], rows[2], rows[4], rows[-1]
    assert unpruned["ttft_vs_none"] == unpruned["questions_vs_none"] == unpruned["decode_vs_none"] == 1.0
    assert unpruned["ttft_vs_limit"] is unpruned["questions_vs_limit"] is None  # "none" has no budget
    assert limit["ttft_vs_limit"] == limit["questions_vs_limit"] == 1.0 and limit["ttft_vs_none"] == 0.25
    assert eager["ttft_vs_none"] == 0.5 and eager["ttft_vs_limit"] == 2.0 and eager["questions_vs_limit"] == 0.4
    assert eager["decode_vs_none"] == 1.25 and eager["decode_vs_eager"] == 1.0
    assert graph["decode_vs_eager"] == 3.0 and graph["decode_vs_none"] == 1.25
    assert graph["ttft_vs_limit"] is None  # no limit row decoded with the graph
    assert graph16["decode_vs_none"] == 1.5 and graph16["questions_vs_batch1"] == 8.0
    assert graph16["ttft_vs_none"] == 0.25 and graph16["questions_vs_none"] == 1.2
    assert graph16["decode_vs_eager"] is None  # no eager row at batch 16
    table = markdown_table(rows).splitlines()
    assert "| cuda-graph (other tokens!) | fastv@64 |" in table[6] and "other tokens" not in table[5]
    assert "| 200.0 (0.50x, 2.00x) | 0.800 (1.60x, 0.40x, 1.00x) | 50.0 (1.25x, 1.00x) |" in table[4]
    assert "| 1600.0 (0.25x, -) | 9.600 (1.20x, -, 8.00x) | 1440.0 (1.50x, -) |" in table[-1]


def test_qwen_7b_proportioned_shape_divides_qwen2_5_vl_7b_by_four():
    from llava.bench.qwen_model import QWEN_SHAPES, qwen_config

    real, proportioned = QWEN_SHAPES["7b"], QWEN_SHAPES["7b-proportioned"]
    assert (real.vision_hidden, real.llm_hidden, real.llm_intermediate, real.llm_heads, real.llm_kv_heads) == \
        (1280, 3584, 18944, 28, 4)
    assert (proportioned.vision_hidden, proportioned.llm_hidden) == (real.vision_hidden // 4, real.llm_hidden // 4)
    for shape in (real, proportioned):  # head sizes kept: vision 80, decoder 128
        assert shape.vision_hidden // shape.vision_heads == 80 and shape.llm_hidden // shape.llm_heads == 128
        assert qwen_config(shape).text_config.num_hidden_layers == 28


def test_the_load_memory_benchmark_writes_a_checkpoint_that_loads_whole(tmp_path):
    """`llava.bench.load_memory` measures what it says: its random checkpoint (LLaVA's .bin shards, an index, a
    CLIP tower) loads with every parameter from the files, at the shape's widths."""
    from llava.bench.load_memory import write_checkpoint
    from llava.model.builder import load_pretrained_model

    shape = SHAPES["quick"]
    params = write_checkpoint(tmp_path / "quick", shape, "bin")
    assert (tmp_path / "quick" / "pytorch_model.bin.index.json").is_file()
    _, model, _, _ = load_pretrained_model(str(tmp_path / "quick"), device="cpu", torch_dtype="bf16")
    assert sum(param.numel() for param in model.parameters()) == params
    assert model.config.text_config.hidden_size == shape.llm_hidden and model.dtype == torch.bfloat16
