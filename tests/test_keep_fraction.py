"""`--keep F` (issue 22 item 4): a retained share of each image's vision tokens instead of a token count.

A method given `keep_fraction` F runs, for every prompt, exactly as it runs with `budget` round(F * V), V the
vision tokens that prompt's image brings into it, rounded half up (`fraction_budget`). On LLaVA-1.5 every
image brings 576, so F = 0.111 is budget 64; on LLaVA-NeXT an image's crops decide V, so two images get
budgets in proportion to their own counts. Each answer reports the share asked (`keep_fraction`) and reached
(`vision_kept_fraction`); bad values are refused in one line.
"""

from __future__ import annotations

import json

import pytest

from llava.drop.blocks import fraction_budget
from llava.drop.generate import GenerationRequest, SamplingConfig, generate, generate_batch
from llava.drop.methods import create_method
from llava.eval import run as runner
from llava.eval.answering import vqa
from llava.eval.answering import loop as question_loop
from llava.eval.lmms_args import cli_flags
from llava.eval.report import runs_table
from llava.eval.scoring.summary import summarize_answers
from llava.mm_utils import load_image, process_images, tokenizer_image_token
from llava.model.geometry import read_geometry
from tests.conftest import (
    DEMO_QUESTION_FILE,
    NEXT_DEMO_IMAGES,
    cli_args,
    cli_refusal,
    first_questions,
    next_demo_inputs,
    vicuna_prompt,
)

NEW_TOKENS = 4
VISION_TOKENS = 576  # every LLaVA-1.5 image (24 x 24 patches)
FRACTIONS = (0.111, 0.222, 0.333)  # the papers' 64, 128 and 192 of 576
# Methods on LLaVA-1.5 whose budget means a layer average (prefill) or a count per image (vision stage).
METHODS = ("fastv", "pdrop", "sparsevlm", "mustdrop", "visionzip", "random", "pool", "tome", "prumerge")
TOLERANCE = 0.01  # of the share asked, on the average over the demo images


@pytest.fixture(scope="module")
def demo_prompts(loaded_original, demo_images):
    """(input ids, pixel values) of one question about each demo image."""
    tokenizer, _, image_processor, _ = loaded_original
    input_ids = tokenizer_image_token(vicuna_prompt("What is the word?"), tokenizer, return_tensors="pt")
    return [(input_ids, process_images([load_image(path)], image_processor)) for path in demo_images]


def answer(loaded, input_ids, pixel_values, method, image_sizes=None):
    tokenizer, model, _, _ = loaded
    return generate(model, input_ids, pixel_values, SamplingConfig(max_new_tokens=NEW_TOKENS),
                    {tokenizer.eos_token_id}, drop=method, image_sizes=image_sizes)


def test_the_budget_of_a_fraction_is_rounded_half_up_and_never_zero():
    assert [fraction_budget(fraction, VISION_TOKENS) for fraction in FRACTIONS] == [64, 128, 192]
    assert fraction_budget(0.5, 577) == 289  # 288.5 rounds up, where Python's round() would give 288
    assert fraction_budget(0.5, 579) == 290  # 289.5 rounds up, as round() would too
    assert fraction_budget(1.0, 2928) == 2928
    assert fraction_budget(1e-4, VISION_TOKENS) == 1


@pytest.mark.parametrize("name", METHODS)
def test_a_fraction_answers_as_its_budget_on_llava_1_5(loaded_original, demo_prompts, name):
    """Kept tokens at every layer and the answer equal the budget run's; the stats add the share asked."""
    fraction = 0.222 if name != "pool" else 0.111  # pool reaches a square: 64 = 8 x 8 exactly
    budget = fraction_budget(fraction, VISION_TOKENS)
    input_ids, pixel_values = demo_prompts[0]
    kept = answer(loaded_original, input_ids, pixel_values, create_method(name, {"keep_fraction": str(fraction)}))
    counted = answer(loaded_original, input_ids, pixel_values, create_method(name, {"budget": str(budget)}))
    assert kept.token_ids == counted.token_ids
    for key in ("vision_tokens", "vision_tokens_after_layer", "avg_vision_tokens", "kv_cache_lengths"):
        assert kept.stats[key] == counted.stats[key], key
    assert kept.stats["keep_fraction"] == fraction and "keep_fraction" not in counted.stats
    assert kept.stats["vision_kept_fraction"] == kept.stats["avg_vision_tokens"] / VISION_TOKENS


@pytest.mark.parametrize("name", [name for name in METHODS if name != "pool"])  # pool: the nearest square
def test_the_fraction_reached_is_within_one_percent_of_the_fraction_asked(loaded_original, demo_prompts, name):
    for fraction in FRACTIONS:
        method = create_method(name, {"keep_fraction": str(fraction)})
        reached = [answer(loaded_original, input_ids, pixel_values, method).stats["vision_kept_fraction"]
                   for input_ids, pixel_values in demo_prompts]
        assert abs(sum(reached) / len(reached) - fraction) <= TOLERANCE * fraction, (fraction, reached)


def test_on_llava_next_each_image_gets_its_own_share(loaded_next_original):
    """Two images with different crops in one batch: each budget is the share of its own vision tokens,
    each prompt answers as it does alone with that budget, and both land within 1 % of the share."""
    tokenizer, model, _, _ = loaded_next_original
    inputs = [next_demo_inputs(loaded_next_original, NEXT_DEMO_IMAGES[shape]) for shape in ("square", "wide")]
    fraction = 0.222
    for name in ("fastv", "visionzip"):
        method = create_method(name, {"keep_fraction": str(fraction)})
        requests = [GenerationRequest(one.input_ids, one.pixel_values, one.image_sizes) for one in inputs]
        outputs = generate_batch(model, requests, SamplingConfig(max_new_tokens=NEW_TOKENS), {tokenizer.eos_token_id},
                                 drop=method)
        counts_in = [output.stats["vision_tokens_in"] for output in outputs]
        assert counts_in == [576 + 48 * 49, 576 + 16 * 49]  # base image + unpadded crop grid with newlines
        for one, output, count_in in zip(inputs, outputs, counts_in):
            budget = fraction_budget(fraction, count_in)
            alone = answer(loaded_next_original, one.input_ids, one.pixel_values,
                           create_method(name, {"budget": str(budget)}), one.image_sizes)
            assert output.token_ids == alone.token_ids, name
            assert output.stats["avg_vision_tokens"] == alone.stats["avg_vision_tokens"], name
            assert abs(output.stats["vision_kept_fraction"] - fraction) <= TOLERANCE * fraction, (name, output.stats)
        averages = [output.stats["avg_vision_tokens"] for output in outputs]
        assert averages[0] > 3 * averages[1] / 2, averages  # 2928 against 1360 tokens in


def test_mustdrop_without_its_merge_takes_the_share_of_each_next_image(loaded_next_original):
    """Without stage 1's merge prefill sees each image's own count, so the fraction works on LLaVA-NeXT."""
    inputs = next_demo_inputs(loaded_next_original, NEXT_DEMO_IMAGES["wide"])
    options = {"vision_merge": "false"}
    kept = answer(loaded_next_original, inputs.input_ids, inputs.pixel_values,
                  create_method("mustdrop", {**options, "keep_fraction": "0.333"}), inputs.image_sizes)
    budget = fraction_budget(0.333, kept.stats["vision_tokens_in"])
    counted = answer(loaded_next_original, inputs.input_ids, inputs.pixel_values,
                     create_method("mustdrop", {**options, "budget": str(budget)}), inputs.image_sizes)
    assert (kept.token_ids, kept.stats["avg_vision_tokens"]) == (counted.token_ids, counted.stats["avg_vision_tokens"])


# --- refusals ----------------------------------------------------------------------------------------------

@pytest.fixture
def no_model_load(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded although the input could be refused before")

    monkeypatch.setattr(question_loop, "load_pretrained_model", forbidden)


@pytest.mark.parametrize("flags,message", [
    (["--method", "fastv", "--keep", "0"], "error: --keep is a share of each image's vision tokens in (0, 1], got 0"),
    (["--method", "fastv", "--keep", "1.5"], "error: --keep is a share of each image's vision tokens in (0, 1], got 1.5"),
    (["--method", "fastv", "--keep", "0.1", "--budget", "64"],
     "error: --keep and --budget both set how many vision tokens to keep; give one"),
    (["--keep", "0.1"], "error: --keep needs a dropping method: add --sparse or --method NAME"),
    (["--method", "fastv", "--keep", "0.1", "--method-args", "budget=64"],
     "error: give either keep_fraction or budget, not both (got keep_fraction 0.1 and budget 64)"),
    (["--method", "prumerge_plus", "--keep", "0.1"],
     "error: prumerge_plus picks its own token count per image (IQR outliers + uniform samples) and takes no keep "
     "fraction (got 0.1); run it without --keep, or use prumerge with a keep fraction"),
])
def test_bad_fractions_are_refused_in_one_line(no_model_load, tiny_original, tmp_path, flags, message):
    argv = cli_args(tiny_original, DEMO_QUESTION_FILE, tmp_path / "answers.jsonl", *flags)
    assert cli_refusal(vqa.main, argv) == message


def test_a_fraction_a_method_cannot_reach_is_refused_before_the_model_loads(no_model_load, tiny_original, tmp_path):
    argv = cli_args(tiny_original, DEMO_QUESTION_FILE, tmp_path / "answers.jsonl", "--method", "fastv", "--keep", "0.05")
    assert cli_refusal(vqa.main, argv) == (
        "error: --method fastv: keep_fraction 0.05 gives an image of 576 vision tokens (the most this model gives "
        "one) a budget of 29: budget 29 is below 36, the average that layers 0..1 alone give 576 vision tokens over "
        "32 layers; choose drop_after=0 or less")


def test_mustdrop_merging_refuses_a_fraction_on_llava_next(no_model_load, tiny_next_original, tmp_path):
    argv = cli_args(tiny_next_original, DEMO_QUESTION_FILE, tmp_path / "answers.jsonl", "--sparse", "--keep", "0.2")
    assert "keep_fraction with mustdrop's window merge runs on LLaVA-1.5 checkpoints only" in cli_refusal(vqa.main, argv)
    geometry = read_geometry(str(tiny_next_original))
    create_method("mustdrop", {"keep_fraction": "0.2", "vision_merge": "false"}).check_model(geometry)


def test_random_dropping_takes_a_fraction_in_place_of_its_default_budget():
    method = create_method("random", {"keep_fraction": "0.111"})
    assert (method.options.budget, method.options.keep_fraction) == (None, 0.111)
    with pytest.raises(ValueError, match="give either keep_fraction or budget"):
        create_method("random", {"keep_fraction": "0.111", "budget": "64"})


# --- the flag on every front end, and the reports ------------------------------------------------------------

def test_keep_reaches_the_runner_and_lmms_eval_and_the_web_page_label():
    from llava.serve.page_methods import setting_label

    args = runner.build_parser().parse_args(["--tasks", "textvqa", "--method", "fastv", "--keep", "0.111"])
    assert runner.setting_of(args) == "keep0.111"
    assert runner.drop_flags_of(args) == "--method fastv --keep 0.111"
    flags = cli_flags({"pretrained": "m", "method": "fastv", "keep": 0.111})
    assert flags[flags.index("--keep") + 1] == "0.111"
    assert setting_label(create_method("fastv", {"keep_fraction": "0.111"})) == "keep 0.111 of the image's vision tokens"


def test_the_run_summary_and_report_show_the_kept_fraction(tmp_path):
    metadata = {"avg_vision_tokens": 64.0, "prefill_flops_ratio": 0.2, "prefill_seconds": 0.1, "vision_seconds": 0.0,
                "decode_seconds": 0.1, "new_tokens": 2, "keep_fraction": 0.111, "vision_kept_fraction": 64 / 576}
    records = [{"metadata": metadata}, {"metadata": {**metadata, "vision_kept_fraction": 0.113}}]
    summary = summarize_answers(json.loads(json.dumps(records)))
    assert summary["mean_vision_kept_fraction"] == pytest.approx((64 / 576 + 0.113) / 2)
    header, rows = runs_table([{"benchmark": "textvqa", **summary}])
    assert rows[0][header.index("kept fraction")] == "0.112"


def test_an_answers_file_records_the_fraction_and_resumes_only_with_it(tiny_original, tmp_path):
    questions, answers = first_questions(tmp_path, 1), tmp_path / "answers.jsonl"
    vqa.main(cli_args(tiny_original, questions, answers, "--method", "fastv", "--keep", "0.111", max_new_tokens=2))
    metadata = json.loads(answers.read_text())["metadata"]
    assert metadata["keep_fraction"] == 0.111 and metadata["run"]["method_options"]["keep_fraction"] == 0.111
    assert metadata["vision_kept_fraction"] == metadata["avg_vision_tokens"] / 576 == pytest.approx(0.111, rel=TOLERANCE)
    message = cli_refusal(vqa.main, cli_args(tiny_original, first_questions(tmp_path, 2), answers, "--method", "fastv",
                                             "--keep", "0.222", max_new_tokens=2))
    assert "was answered with method_options.keep_fraction=0.111 but this run has method_options.keep_fraction=0.222" \
        in message
    without = question_loop.recorded_options(create_method("fastv").options)
    assert "keep_fraction" not in without and without["budget"] is None  # files from before the option resume
