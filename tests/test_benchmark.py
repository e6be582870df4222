"""`benchmarks/gpu.sh --quick` runs the four benchmarks end to end in CI (prefill/decode, also with `--next`,
compare and throughput) and each reports sane, ordered numbers; the model shapes have the stated widths."""

from __future__ import annotations

import json
import subprocess

import torch
from transformers import LlavaForConditionalGeneration

from llava.bench.next_settings import NEXT_TARGETS
from llava.bench.prefill_decode import SETTINGS, parse_args
from llava.bench.workload import BASELINE, LLM_LAYERS, RATIO_OF, SHAPES, VISION_LAYERS, model_config, shape_name
from tests.conftest import REPO_ROOT

OUTPUT_FILES = ("results.json", "results.md", "results.png")

# LLaVA-NeXT's prompt image fills the 2 x 2 grid: 1 base image + 4 crops, 24 x 24 = 576 patches each.
# The model's own spatial_unpad layout: 576 (base) + 48 rows x (48 patches + 1 newline) = 576 + 2352 = 2928.
NEXT_UNPRUNED_TOKENS = 576 + 48 * (48 + 1)
# MustDrop's flat layout after stage 1: each of the 5 views keeps 12 of its 64 3x3 windows (the image's
# noise strips) and merges the other 52 into one token each: 5 x (52 + 12 x 9) = 5 x 160 = 800.
NEXT_TOKENS_AFTER_MERGE = 5 * (52 + 12 * 9)
NEXT_IMAGES = 5
NEXT_TOLERANCE = 0.02  # MustDrop's layer-averaged tokens within 2 % of each target (the threshold search's stop)


def test_gpu_script_quick_runs_all_four_on_cpu_with_sane_results(tmp_path):
    """One `gpu.sh --quick` run (the four benchmarks at the quick shape, as CI can afford once) and what
    each of them must report."""
    done = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu.sh"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "transformers" in done.stdout
    runs = {name: json.loads((tmp_path / name / stem).read_text()) for name, stem in
            [("prefill_decode", "results.json"), ("next", "results.json"), ("compare", "compare.json"),
             ("throughput", "throughput.json")]}
    for saved in runs.values():
        assert saved["args"]["quick"] == "True" and saved["args"]["device"] == "cpu"
    check_prefill_decode(tmp_path / "prefill_decode", runs["prefill_decode"])
    check_next(runs["next"])
    assert runs["compare"]["args"]["budgets"] == "[64]"
    assert {row["budget"] for row in runs["compare"]["rows"]} == {None, 64}
    check_throughput(tmp_path / "throughput", runs["throughput"])


def with_limits(settings) -> list[str]:
    """The settings' row order: the settings, then a limit row for each dropping one."""
    names = list(settings)
    return names + [f"limit@{name}" for name in names[1:]]


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
    for ratio in RATIO_OF:
        assert by_setting[BASELINE][ratio] == 1.0, ratio
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
    for ratio in RATIO_OF:
        assert unpruned[ratio] == 1.0, ratio
    for target in NEXT_TARGETS:
        row = by_setting[str(target)]
        assert row["vision_tokens_after_merge"] == NEXT_TOKENS_AFTER_MERGE
        assert abs(row["avg_vision_tokens"] - target) <= NEXT_TOLERANCE * target, (target, row["avg_vision_tokens"])
        assert row["avg_vision_tokens_per_image"] == row["avg_vision_tokens"] / NEXT_IMAGES
        assert row["kv_cache_ratio"] < 1 and row["flops_ratio"] < 1
    assert "2880 flat tokens" in saved["header"] and "= 2928 in the model's spatial_unpad layout" in saved["header"]


def check_throughput(folder, saved: dict) -> None:
    """Every (setting, batch size) at the one answer length, the budget reached, ratios to batch 1."""
    rows = saved["rows"]
    assert [(r["setting"], r["batch_size"], r["answer_tokens"]) for r in rows] == [
        ("none", 1, 3), ("fastv@64", 1, 3), ("none", 2, 3), ("fastv@64", 2, 3)]
    for row in rows:
        assert row["questions_per_s"] > 0 and row["decode_tok_s"] > 0
        assert row["decode"] == "eager"
    by_key = {(r["setting"], r["batch_size"]): r for r in rows}
    assert by_key[("none", 1)]["avg_vision_tokens"] == 576
    assert abs(by_key[("fastv@64", 2)]["avg_vision_tokens"] - 64) < 0.65  # the closed form rounds keep
    # two answers hold less than twice one answer's cache: the ragged second prompt is 3 text tokens shorter
    assert by_key[("none", 2)]["kv_cache_bytes"] < 2 * by_key[("none", 1)]["kv_cache_bytes"]
    assert by_key[("none", 1)]["questions_vs_batch1"] == 1.0
    assert (folder / "throughput.png").stat().st_size > 0


def test_7b_proportioned_shape_divides_every_width_of_7b_by_four():
    shape = SHAPES[shape_name(parse_args(["--shape", "7b-proportioned"]))]
    config = model_config(shape, next_model=False)
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


def test_throughput_ratios_compare_within_a_decode_step_and_against_eager():
    """Hand-made rows: "x none" divides by the unpruned row of the same decode step and batch, "x batch 1"
    by the same setting and step at batch 1, "x eager" by the same setting decoded eagerly; a step that
    decoded other tokens is marked in the table."""
    from llava.bench.throughput import add_ratios, markdown_table

    def row(setting, decode, size, decode_tok_s, questions_per_s, same=True):
        return {"setting": setting, "decode": decode, "answer_tokens": 128, "batch_size": size, "same_tokens": same,
                "decode_tok_s": decode_tok_s, "questions_per_s": questions_per_s, "avg_vision_tokens": 64.0,
                "kv_cache_bytes": 2**20, "peak_memory_bytes": None}

    rows = add_ratios([row("none", "eager", 1, 40.0, 0.5), row("fastv@64", "eager", 1, 50.0, 0.8),
                       row("none", "cuda-graph", 1, 120.0, 1.0), row("fastv@64", "cuda-graph", 1, 150.0, 1.2, False),
                       row("none", "cuda-graph", 16, 960.0, 8.0), row("fastv@64", "cuda-graph", 16, 1440.0, 9.6)])
    graph16 = rows[-1]
    assert graph16["decode_vs_none"] == 1.5 and graph16["questions_vs_batch1"] == 8.0
    assert graph16["decode_vs_eager"] is None  # no eager row at batch 16
    assert rows[3]["decode_vs_eager"] == 3.0 and rows[3]["decode_vs_none"] == 1.25
    assert rows[1]["decode_vs_none"] == 1.25 and rows[1]["decode_vs_eager"] == 1.0
    table = markdown_table(rows).splitlines()
    assert "| cuda-graph (other tokens!) | fastv@64 |" in table[5] and "other tokens" not in table[4]
    assert "| 1440.0 (1.50x) |" in table[-1] and "| 150.0 (1.25x) (3.00x) |" in table[5]
