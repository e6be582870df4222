"""Answering several prompts at once gives each prompt, token for token, the answer, kept sets and statistics it
gets alone (a batch of one): for every method, on LLaVA-1.5 and LLaVA-NeXT, with prompts of different lengths,
kept counts, tilings and stopping points."""

from __future__ import annotations

import json

import pytest
import torch

from llava.drop.cache import KVCache
from llava.drop.decode import BatchPositions
from llava.drop.generate import GenerationRequest, SamplingConfig, encode_vision, encode_visions, generate, generate_batch
from llava.drop.prefill import build_prompt, method_or_none, prefill, prefill_prompt
from llava.drop.methods import METHODS, create_method
from llava.drop.methods.registry import discover_methods
from llava.mm_utils import load_image
from llava.model.geometry import decoder_layer_count
from llava.model.inputs import encode_question
from tests.conftest import method_at_budget

QUESTIONS = ["What is the word?", "Describe the colour of the background in a few words, please.",
             "How many letters are there?"]
TIMINGS = ("vision_seconds", "prefill_seconds", "decode_seconds", "scoring_seconds", "peak_rss_bytes",
           "peak_memory_bytes", "batch_size")
NEW_TOKENS = 6
BUDGETS = {"llava": 64, "next": 320}


def requests_for(loaded, demo_images, stops=None) -> list[GenerationRequest]:
    tokenizer, model, image_processor, _ = loaded
    requests = []
    for index, question in enumerate(QUESTIONS):
        image = load_image(demo_images[index % len(demo_images)])
        inputs = encode_question(question, image, model, tokenizer, image_processor, "vicuna_v1")
        should_stop = None if stops is None else stops[index]
        requests.append(GenerationRequest(inputs.input_ids, inputs.pixel_values, inputs.image_sizes, should_stop))
    return requests


def alone(model, request: GenerationRequest, sampling: SamplingConfig, eos: set[int], method):
    return generate(model, request.input_ids, request.pixel_values, sampling, eos, request.should_stop, method,
                    request.image_sizes)


def without_timings(stats: dict) -> dict:
    return {key: value for key, value in stats.items() if key not in TIMINGS}


def assert_batch_equals_alone(loaded, requests, sampling, method=None, eos=None):
    tokenizer, model, _, _ = loaded
    eos = {tokenizer.eos_token_id} if eos is None else eos
    together = generate_batch(model, requests, sampling, eos, method)
    for request, batched in zip(requests, together):
        single = alone(model, request, sampling, eos, method)
        assert batched.token_ids == single.token_ids
        assert without_timings(batched.stats) == without_timings(single.stats)
        assert batched.stats["batch_size"] == len(requests)
    return together


def method_names(arch: str) -> list[str]:
    discover_methods()
    return sorted(name for name, cls in METHODS.items() if arch == "llava" or name == "none" or cls.supports_next)


@pytest.mark.parametrize("name", method_names("llava"))
def test_llava_batch_equals_one_at_a_time_for_every_method(loaded_original, demo_images, name):
    method = None if name == "none" else method_at_budget(name, BUDGETS["llava"])
    together = assert_batch_equals_alone(loaded_original, requests_for(loaded_original, demo_images),
                                         SamplingConfig(max_new_tokens=NEW_TOKENS), method)
    assert len({out.stats["prompt_tokens"] for out in together}) == len(QUESTIONS)  # ragged prompts


def test_llava_batch_with_thresholds_keeps_different_counts_per_prompt(loaded_original, demo_images):
    together = assert_batch_equals_alone(loaded_original, requests_for(loaded_original, demo_images),
                                         SamplingConfig(max_new_tokens=NEW_TOKENS),
                                         create_method("mustdrop", {"global_thr": "0.011", "individual_thr": "0.01"}))
    assert len({str(out.stats["kv_cache_lengths"]) for out in together}) == len(QUESTIONS)


@pytest.mark.parametrize("name", method_names("next"))
def test_next_batch_equals_one_at_a_time(loaded_next_original, demo_images, name):
    method = None if name == "none" else method_at_budget(name, BUDGETS["next"]) \
        if name != "mustdrop" else create_method(name, {"global_thr": "0.011", "individual_thr": "0.01"})
    square_first = sorted(demo_images, key=lambda path: path.name != "3fc86ee644365862.png")  # 400x400: 2x2 crops
    requests = requests_for(loaded_next_original, square_first)
    together = assert_batch_equals_alone(loaded_next_original, requests, SamplingConfig(max_new_tokens=NEW_TOKENS),
                                         method)
    assert len({out.stats["images"] for out in together}) > 1  # the demo images tile into different grids


def kept_sets(model, method, requests: list[GenerationRequest]) -> tuple[list, list]:
    """Each prompt's vision features and (layer, kept sequence positions) after its vision stage and prefill,
    from one batched pass and from one pass per prompt."""
    method = method_or_none(method)
    visions = encode_visions(model, method, [r.pixel_values for r in requests], [r.image_sizes for r in requests])
    prompts = [build_prompt(model, r.input_ids, vision) for r, vision in zip(requests, visions)]
    with torch.inference_mode():
        together = prefill(model, prompts, KVCache(decoder_layer_count(model)), method).results
        alone_results = [prefill_prompt(model, prompt, method) for prompt in prompts]
        alone_visions = [encode_vision(model, method, r.pixel_values, r.image_sizes) for r in requests]
    for vision, single in zip(visions, alone_visions):
        assert torch.equal(vision.features, single.features)
    drops = [[(layer, keep.tolist()) for layer, keep in result.drops] for result in together]
    assert drops == [[(layer, keep.tolist()) for layer, keep in result.drops] for result in alone_results]
    return visions, drops


@pytest.mark.parametrize("name", ["mustdrop", "fastv", "pdrop", "sparsevlm"])
def test_a_batched_prefill_keeps_each_prompt_s_own_tokens(loaded_original, loaded_next_original, demo_images, name):
    """The prefill-stage methods drop per prompt in one padded pass: the same kept positions as alone, and the
    prompts keep different counts (MustDrop by thresholds, the others from different vision counts on NeXT)."""
    thresholds = {"global_thr": "0.011", "individual_thr": "0.01"}
    for loaded, budget in ((loaded_original, BUDGETS["llava"]), (loaded_next_original, BUDGETS["next"])):
        method = create_method(name, thresholds) if name == "mustdrop" else method_at_budget(name, budget)
        _, drops = kept_sets(loaded[1], method, requests_for(loaded, demo_images))
        assert all(drops)
        if name == "mustdrop" or loaded is loaded_next_original:
            assert len({str(prompt_drops[-1][1]) for prompt_drops in drops}) == len(QUESTIONS)


def test_mustdrop_stage_one_runs_prompts_that_merge_alike_through_the_tower_together(loaded_original, demo_images,
                                                                                   monkeypatch):
    """Stage 1 on LLaVA-1.5: every prompt merges its own r windows (features, key set and statistics as alone),
    layer 0 runs once for all images and the rest of the tower once per distinct r."""
    import llava.drop.methods.mustdrop as mustdrop

    _, model, _, _ = loaded_original
    requests = requests_for(loaded_original, demo_images[:2]) + requests_for(loaded_original, demo_images[2:3])
    method = create_method("mustdrop", {"merge_threshold": "0.2"})
    alone_visions = [encode_vision(model, method, r.pixel_values, r.image_sizes) for r in requests]
    passes = []
    real_run = mustdrop.run_tower_to
    monkeypatch.setattr(mustdrop, "run_tower_to", lambda layers, hidden, *rest: passes.append(hidden.shape[0]) or
                        real_run(layers, hidden, *rest))
    together = encode_visions(model, method, [r.pixel_values for r in requests], [r.image_sizes for r in requests])
    merged = [vision.stats["merged_windows"] for vision in together]
    assert len(set(merged)) > 1  # the demo images merge different numbers of windows
    for vision, single in zip(together, alone_visions):
        assert torch.equal(vision.features, single.features) and torch.equal(vision.key_indices, single.key_indices)
        assert vision.stats == single.stats
    by_count = {count: merged.count(count) for count in merged}
    assert passes == [len(requests)] + [by_count[count] for count in sorted(by_count)]


@pytest.mark.parametrize("name", ["visionzip", "random", "pool"])
def test_vision_stage_methods_run_every_prompt_s_images_through_the_tower_once(loaded_original, loaded_next_original,
                                                                             demo_images, name, monkeypatch):
    """One tower pass for the whole batch (LLaVA-NeXT: every prompt's base image and crops), each prompt's
    features as alone."""
    import llava.drop.image_reduction as image_reduction

    real_run = image_reduction.run_tower_to
    for loaded, budget in ((loaded_original, BUDGETS["llava"]), (loaded_next_original, BUDGETS["next"])):
        model, method = loaded[1], method_at_budget(name, budget)
        requests = requests_for(loaded, demo_images)
        alone_visions = [encode_vision(model, method, r.pixel_values, r.image_sizes) for r in requests]
        passes = []
        monkeypatch.setattr(image_reduction, "run_tower_to", lambda layers, hidden, *rest: passes.append(hidden.shape[0])
                            or real_run(layers, hidden, *rest))
        together = encode_visions(model, method, [r.pixel_values for r in requests], [r.image_sizes for r in requests])
        monkeypatch.setattr(image_reduction, "run_tower_to", real_run)
        assert passes == [sum(r.pixel_values.shape[-4] for r in requests)]
        for vision, single in zip(together, alone_visions):
            assert torch.equal(vision.features, single.features) and vision.stats == single.stats
            assert vision.selection_seconds > 0


def test_a_text_only_prompt_shares_a_batch_with_image_prompts(loaded_original, demo_images):
    tokenizer, model, image_processor, _ = loaded_original
    requests = requests_for(loaded_original, demo_images)
    text_only = encode_question("Name a colour.", None, model, tokenizer, image_processor, "vicuna_v1")
    requests.insert(1, GenerationRequest(text_only.input_ids, None))
    together = assert_batch_equals_alone(loaded_original, requests, SamplingConfig(max_new_tokens=NEW_TOKENS),
                                         create_method("mustdrop", {"global_thr": "0.011", "individual_thr": "0.01"}))
    assert together[1].stats["vision_tokens"] == 0 and together[0].stats["vision_tokens"] > 0


def test_each_prompt_stops_by_its_own_rule_and_context(loaded_original, demo_images):
    """One answer stops after 2 tokens by its stop condition, one by EOS (its second token made EOS), one
    runs to the limit; the others keep decoding after the first has finished."""
    tokenizer, model, _, _ = loaded_original
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS)
    requests = requests_for(loaded_original, demo_images, stops=[lambda tokens: len(tokens) >= 2, None, None])
    second_token = alone(model, requests[1], sampling, set(), None).token_ids[1]
    together = assert_batch_equals_alone(loaded_original, requests, sampling, eos={second_token})
    assert [len(out.token_ids) for out in together][:2] == [2, 2]


def test_seeded_sampling_in_a_batch_repeats_each_prompt_alone(loaded_original, demo_images):
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.8, top_p=0.9, seed=5)
    assert_batch_equals_alone(loaded_original, requests_for(loaded_original, demo_images), sampling,
                              create_method("fastv", {"budget": "64"}))


def test_batch_positions_share_rows_across_layers_and_prompts():
    positions = BatchPositions([[9, 9, 4], [7, 7, 7]], torch.device("cpu"))
    assert positions.row_of_layer == [1, 1, 0]
    assert positions.rows.tolist() == [[4, 7], [9, 7]]
    positions.advance()
    positions.advance()
    assert positions.current().tolist() == [[6, 9], [11, 9]]


def test_an_empty_batch_answers_nothing(loaded_original):
    assert generate_batch(loaded_original[1], [], SamplingConfig(), {2}) == []


def answer_lines(path) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        line["metadata"] = without_timings(line["metadata"])
    return lines


def test_cli_batch_answers_equal_batch_one_and_resume_in_order(tiny_original, tmp_path):
    """--batch-size 2 over 6 questions, resumed after 1 answer written at batch 1 (so batches of 2, 2, 1),
    gives the batch-1 answers file line for line (timings aside)."""
    from llava.eval.model_vqa_loader import main as answer_main
    from tests.conftest import cli_args, first_questions

    questions = first_questions(tmp_path, 6)
    one_at_a_time, batched = tmp_path / "one.jsonl", tmp_path / "batched.jsonl"
    answer_main(cli_args(tiny_original, questions, one_at_a_time, "--method", "pdrop", "--budget", "64"))
    first = tmp_path / "first.jsonl"
    first.write_text(questions.read_text().splitlines()[0] + "\n")
    answer_main(cli_args(tiny_original, first, batched, "--method", "pdrop", "--budget", "64"))
    answer_main(cli_args(tiny_original, questions, batched, "--method", "pdrop", "--budget", "64", "--batch-size", "2"))
    assert answer_lines(batched) == answer_lines(one_at_a_time)
    assert [line["metadata"]["batch_size"] for line in map(json.loads, batched.read_text().splitlines())] \
        == [1, 2, 2, 2, 2, 1]


def test_a_batch_that_fails_while_every_question_answers_alone_is_raised_as_a_bug(tiny_original, tmp_path, monkeypatch):
    """A ValueError from the batched path is retried one by one only to find the question at fault; when
    every question answers alone, the batch's error is a batching bug and stops the run (nothing hidden)."""
    from llava.eval.answering.answerer import Answerer
    from llava.eval.model_vqa_loader import main as answer_main
    from tests.conftest import cli_args, first_questions

    answer_batch = Answerer.answer_batch

    def broken_batch(self, pairs):
        if len(pairs) > 1:
            raise ValueError("a batching bug")
        return answer_batch(self, pairs)

    monkeypatch.setattr(Answerer, "answer_batch", broken_batch)
    answers = tmp_path / "answers.jsonl"
    with pytest.raises(RuntimeError, match=r"answering 2 questions together failed \(a batching bug\), yet each "
                                           "answers alone"):
        answer_main(cli_args(tiny_original, first_questions(tmp_path, 2), answers, "--batch-size", "2"))


def test_runner_refuses_a_batch_size_below_one(tmp_path):
    from llava.eval.run import main as run_main

    with pytest.raises(SystemExit) as stop:
        run_main(["--tasks", "textvqa", "--model-path", "m", "--eval-dir", str(tmp_path), "--batch-size", "0"])
    assert "--batch-size must be at least 1, got 0" in str(stop.value.code)


def test_cli_compile_flag_answers_through_the_compiled_step(tiny_original, tmp_path, monkeypatch):
    """--compile traces the decode step with `torch.compile`; its "eager" backend runs the traced graph with
    the same kernels, so the answers must not change (inductor itself is left to GPU runs: compiling is
    slow on a CPU)."""
    from llava.eval.answering import loop
    from llava.eval.model_vqa_loader import main as answer_main
    from tests.conftest import cli_args, first_questions

    monkeypatch.setattr(loop, "COMPILE_BACKEND", "eager")
    questions = first_questions(tmp_path, 1)  # each new prompt length compiles the step anew: one is enough
    answer_main(cli_args(tiny_original, questions, tmp_path / "plain.jsonl"))
    answer_main(cli_args(tiny_original, questions, tmp_path / "compiled.jsonl", "--compile"))
    assert answer_lines(tmp_path / "compiled.jsonl") == answer_lines(tmp_path / "plain.jsonl")


@pytest.mark.parametrize("extra, message", [
    (["--cuda-graph", "--device", "cpu"], "--cuda-graph needs a CUDA device; this run uses cpu"),
    (["--cuda-graph", "--compile"], "--cuda-graph and --compile both speed up the decode step; choose one"),
])
def test_runner_refuses_a_decode_step_that_cannot_run(tmp_path, extra, message):
    from llava.eval.run import main as run_main

    with pytest.raises(SystemExit) as stop:
        run_main(["--tasks", "textvqa", "--model-path", "m", "--eval-dir", str(tmp_path), *extra])
    assert str(stop.value.code).endswith(message)


def test_generate_batch_refuses_cuda_graphs_off_cuda_before_any_prefill(loaded_original, demo_images):
    model = loaded_original[1]
    requests = requests_for(loaded_original, demo_images)[:1]
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device; the model is on cpu"):
        generate_batch(model, requests, SamplingConfig(max_new_tokens=2), set(), cuda_graph=True)
    with pytest.raises(ValueError, match="choose one of torch.compile and CUDA graphs"):
        generate_batch(model, requests, SamplingConfig(max_new_tokens=2), set(), compile_backend="eager",
                       cuda_graph=True)
