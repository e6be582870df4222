"""Qwen2.5-VL and Qwen2-VL: the engine equals transformers' `generate()` unpruned, 3-D positions survive a
drop, decoder methods run and vision-stage methods are refused with their reason, everywhere the CLIs go."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.drop.blocks import fraction_budget
from llava.drop.cache import KVCache
from llava.drop.generate import GenerationRequest, SamplingConfig, encode_vision, generate, generate_batch
from llava.drop.methods import create_method
from llava.drop.prefill import build_prompt, prefill
from llava.mm_utils import load_image
from llava.model.conv_mode import detect_conv_mode
from llava.model.geometry import QWEN_FAMILY, decoder_layer_count, read_geometry
from llava.model.inputs import encode_question
from llava.model.qwen import QWEN_CONV_MODE
from llava.model.tiny import write_tiny_checkpoint
from llava.eval.calibrate import main as calibrate_main
from tests.conftest import (
    qwen_demo_inputs,
    DEMO_DIR,
    DEMO_IMAGE_FOLDER,
    NEXT_DEMO_IMAGES,
    REPO_ROOT,
    annotations_for,
    first_questions,
    load_on_cpu,
    run_benchmark_script,
)

QUESTIONS = {"tall": "What is written here?", "square": "How many cars are there?", "wide": "Which sign is open?"}
NEW_TOKENS = 8
VISION_STAGE_METHODS = ["tome", "prumerge", "prumerge_plus"]  # random, pool, VisionZip: test_qwen_vision_methods


def demo_inputs(loaded, shape: str):
    return qwen_demo_inputs(loaded, shape, QUESTIONS[shape])


def expanded_ids(model, inputs) -> torch.Tensor:
    """The prompt as Qwen's processor writes it: <|image_pad|> once per vision token."""
    ids = inputs.input_ids[0].tolist()
    at = ids.index(IMAGE_TOKEN_INDEX)
    count = int(inputs.image_sizes.prod()) // model.config.vision_config.spatial_merge_size ** 2
    return torch.tensor([ids[:at] + [model.config.image_token_id] * count + ids[at + 1 :]])


def transformers_answer(model, inputs) -> list[int]:
    full = expanded_ids(model, inputs)
    out = model.generate(input_ids=full, attention_mask=torch.ones_like(full), pixel_values=inputs.pixel_values,
                         image_grid_thw=inputs.image_sizes, mm_token_type_ids=(full == model.config.image_token_id).int(),
                         max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, full.shape[1]:].tolist()


def eos_of(model) -> set[int]:
    return set(model.generation_config.eos_token_id)


def test_images_keep_their_own_resolution(loaded_qwen):
    """Three aspect ratios give three grids, each a multiple of the 2 x 2 merge, within max_pixels."""
    grids = {shape: demo_inputs(loaded_qwen, shape).image_sizes[0].tolist() for shape in NEXT_DEMO_IMAGES}
    assert len({tuple(grid) for grid in grids.values()}) == 3
    tall, wide = grids["tall"], grids["wide"]
    assert tall[1] > tall[2] and wide[2] > wide[1]
    for t, h, w in grids.values():
        assert t == 1 and h % 2 == 0 and w % 2 == 0 and h * w * 14 * 14 <= loaded_qwen[1].config.max_pixels


def test_prompt_is_the_checkpoints_chat_template(loaded_qwen):
    """The `qwen` conversation mode writes what the checkpoint's own chat template writes, the image's
    <|image_pad|> standing where our engine splices the vision tokens."""
    tokenizer, model, _, _ = loaded_qwen
    inputs = demo_inputs(loaded_qwen, "tall")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS["tall"]}]}]
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert inputs.prompt == templated.replace("<|image_pad|>", DEFAULT_IMAGE_TOKEN)
    assert inputs.stop_str == "<|im_end|>"


def test_conv_mode_auto_picks_qwen(tiny_qwen, tiny_qwen2):
    assert detect_conv_mode(str(tiny_qwen)).mode == QWEN_CONV_MODE
    assert detect_conv_mode(str(tiny_qwen2)).mode == QWEN_CONV_MODE


def test_positions_equal_transformers_rope_index(loaded_any_qwen):
    """Every prompt token's (t, h, w) position equals `get_rope_index` on the processor's expanded prompt."""
    _, model, _, _ = loaded_any_qwen
    for shape in NEXT_DEMO_IMAGES:
        inputs = demo_inputs(loaded_any_qwen, shape)
        vision = encode_vision(model, create_method("none"), inputs.pixel_values, inputs.image_sizes)
        prompt = build_prompt(model, inputs.input_ids, vision)
        full = expanded_ids(model, inputs)
        expected, _ = model.model.get_rope_index(full, (full == model.config.image_token_id).int(), inputs.image_sizes)
        assert torch.equal(prompt.positions, expected[:, 0])
        assert prompt.next_position == int(expected.max()) + 1 < prompt.length


def test_unpruned_equals_transformers_generate_alone_and_batched(loaded_any_qwen):
    """Token for token, greedy: each prompt alone, and the three (different lengths) as one batch."""
    _, model, _, _ = loaded_any_qwen
    inputs = [demo_inputs(loaded_any_qwen, shape) for shape in NEXT_DEMO_IMAGES]
    expected = [transformers_answer(model, one) for one in inputs]
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS)
    alone = [generate(model, one.input_ids, one.pixel_values, sampling, eos_of(model), image_sizes=one.image_sizes)
             for one in inputs]
    assert [output.token_ids for output in alone] == expected
    requests = [GenerationRequest(one.input_ids, one.pixel_values, one.image_sizes) for one in inputs]
    batched = generate_batch(model, requests + requests[:1], sampling, eos_of(model))
    assert [output.token_ids for output in batched] == expected + expected[:1]
    assert len({output.stats["vision_tokens"] for output in batched}) == 3


def test_a_drop_of_nothing_is_bit_identical(loaded_qwen):
    """MustDrop's stages 2 and 3 at thresholds that keep every token: the same logits, bit for bit, and the same
    answer as the unpruned model."""
    _, model, _, _ = loaded_qwen
    inputs = demo_inputs(loaded_qwen, "square")
    method = create_method("mustdrop", {"vision_merge": "false", "global_thr": "0", "individual_thr": "0"})
    vision = encode_vision(model, method, inputs.pixel_values, inputs.image_sizes)
    prompt = build_prompt(model, inputs.input_ids, vision)
    layers = decoder_layer_count(model)
    unpruned = prefill(model, [prompt], KVCache(layers))
    kept_all = prefill(model, [prompt], KVCache(layers), method)
    assert kept_all.results[0].vision_tokens_per_layer == [prompt.vision_count] * layers
    assert torch.equal(kept_all.logits, unpruned.logits)
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS)
    answers = [generate(model, inputs.input_ids, inputs.pixel_values, sampling, eos_of(model), drop=drop,
                        image_sizes=inputs.image_sizes).token_ids for drop in (None, method)]
    assert answers[0] == answers[1]


@pytest.mark.parametrize("name", ["fastv", "pdrop"])
def test_kept_tokens_keep_their_own_rotation(loaded_qwen, name):
    """After a drop, every kept token (vision and text) goes on at its own 3-D position, even for PDrop, whose
    LLaVA rule re-numbers positions: the prefill's logits equal a forward pass that runs the layers after each
    drop on the kept tokens alone, with transformers' rotary embedding at their original positions."""
    _, model, _, _ = loaded_qwen
    inputs = demo_inputs(loaded_qwen, "wide")
    method = create_method(name, {"budget": "24"})
    prompt = build_prompt(model, inputs.input_ids, encode_vision(model, method, inputs.pixel_values, inputs.image_sizes))
    result = prefill(model, [prompt], KVCache(decoder_layer_count(model)), method)
    drops = dict(result.results[0].drops)
    assert drops and result.results[0].vision_tokens_per_layer[-1] < prompt.vision_count
    language_model = model.model.language_model
    hidden, positions = prompt.embeds, prompt.positions[:, None]
    with torch.no_grad():
        for layer_idx, layer in enumerate(language_model.layers):
            hidden = layer(hidden, position_embeddings=language_model.rotary_emb(hidden, positions))
            if layer_idx in drops:
                kept = drops[layer_idx]
                hidden, positions = hidden[:, kept], positions[..., kept]
        expected = model.lm_head(language_model.norm(hidden[:, -1])).float()
    torch.testing.assert_close(result.logits, expected, rtol=1e-5, atol=1e-5)
    assert int(positions.max()) + 1 == prompt.next_position  # the text after the image kept its positions


@pytest.mark.parametrize("name,args", [("fastv", {"budget": "32"}), ("pdrop", {}), ("sparsevlm", {}),
                                       ("mustdrop", {"vision_merge": "false", "global_thr": "0.02",
                                                     "individual_thr": "0.05"})])
def test_decoder_methods_answer_batched_as_alone(loaded_qwen, name, args):
    """Every decoder method runs on Qwen, and a batch answers as each prompt alone."""
    _, model, _, _ = loaded_qwen
    inputs = [demo_inputs(loaded_qwen, shape) for shape in NEXT_DEMO_IMAGES]
    sampling = SamplingConfig(max_new_tokens=4)
    requests = [GenerationRequest(one.input_ids, one.pixel_values, one.image_sizes) for one in inputs]
    batched = generate_batch(model, requests, sampling, eos_of(model), drop=create_method(name, args))
    for request, output in zip(requests, batched):
        alone = generate_batch(model, [request], sampling, eos_of(model), drop=create_method(name, args))[0]
        assert output.token_ids == alone.token_ids
        assert output.stats["avg_vision_tokens"] == alone.stats["avg_vision_tokens"]
    assert any(output.stats["avg_vision_tokens"] < output.stats["vision_tokens"] for output in batched)


@pytest.mark.parametrize("name", VISION_STAGE_METHODS + ["mustdrop"])
def test_vision_stage_methods_are_refused_with_the_reason(tiny_qwen, name):
    geometry = read_geometry(str(tiny_qwen))
    assert geometry.family == QWEN_FAMILY
    with pytest.raises(ValueError, match="Qwen"):
        create_method(name).check_model(geometry)


def test_geometry_follows_max_pixels(tiny_qwen):
    assert read_geometry(str(tiny_qwen)).max_vision_tokens == 256
    assert read_geometry(str(tiny_qwen), max_pixels=64 * 28 * 28).max_vision_tokens == 64


def test_max_pixels_override_and_refusal(tiny_qwen):
    tokenizer, model, image_processor, _ = load_on_cpu(tiny_qwen, max_pixels=16 * 28 * 28)
    image = load_image(DEMO_DIR / "images" / NEXT_DEMO_IMAGES["square"])
    inputs = encode_question("What is it?", image, model, tokenizer, image_processor, QWEN_CONV_MODE)
    assert int(inputs.image_sizes.prod()) // 4 <= 16
    with pytest.raises(ValueError, match="min_pixels"):
        load_on_cpu(tiny_qwen, min_pixels=64 * 28 * 28, max_pixels=16 * 28 * 28)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)


def test_runner_answers_a_task_with_qwen(tiny_qwen, tmp_path):
    """The task runner takes a Qwen checkpoint as it takes LLaVA: auto conversation mode, batching, the
    method's statistics in every answer, a scored summary."""
    done = run_cli("-m", "llava.eval.run", "--tasks", "textvqa", "--model-path", str(tiny_qwen),
                   "--eval-dir", str(tmp_path), "--set", f"questions={DEMO_DIR / 'llava_textvqa_demo.jsonl'}",
                   "--set", f"images={DEMO_DIR / 'images'}",
                   "--set", f"annotations={DEMO_DIR / 'TextVQA_demo_annotations.json'}",
                   "--max_new_tokens", "3", "--batch-size", "4", "--method", "fastv", "--budget", "32")
    assert done.returncode == 0, done.stderr[-2000:]
    answers = [json.loads(line) for line in next(tmp_path.rglob("merge.jsonl")).read_text().splitlines()]
    assert len(answers) == 12
    assert {answer["metadata"]["run"]["conv_mode"] for answer in answers} == {QWEN_CONV_MODE}
    assert all(abs(answer["metadata"]["avg_vision_tokens"] - 32) < 1 for answer in answers
               if answer["metadata"]["vision_tokens"] >= 64)


def test_a_vision_stage_method_is_refused_before_the_model_loads(tiny_qwen, tmp_path):
    done = run_cli("-m", "llava.eval.model_vqa_loader", "--model-path", str(tiny_qwen),
                   "--question-file", str(DEMO_DIR / "llava_textvqa_demo.jsonl"),
                   "--image-folder", str(DEMO_DIR / "images"), "--answers-file", str(tmp_path / "a.jsonl"),
                   "--conv-mode", "auto", "--method", "tome")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "tome" in lines[0] and "Qwen" in lines[0] and "Traceback" not in done.stderr


def test_a_llava_template_is_refused_for_qwen(tiny_qwen, tmp_path):
    done = run_cli("-m", "llava.eval.model_vqa_loader", "--model-path", str(tiny_qwen),
                   "--question-file", str(DEMO_DIR / "llava_textvqa_demo.jsonl"),
                   "--image-folder", str(DEMO_DIR / "images"), "--answers-file", str(tmp_path / "a.jsonl"),
                   "--conv-mode", "vicuna_v1")
    assert done.returncode != 0 and "--conv-mode qwen" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "a.jsonl").exists()


def test_tiny_cli_refuses_the_original_layout_for_qwen(tmp_path):
    done = run_cli("-m", "llava.model.tiny", "--out", str(tmp_path / "q"), "--arch", "qwen2_5_vl", "--layout", "original")
    assert done.returncode != 0 and "--layout hf" in done.stderr and "Traceback" not in done.stderr


def test_tiny_qwen_is_reproducible(tiny_qwen, tmp_path):
    """The same seed writes the same bytes (fixtures and figures rely on them), another seed other weights (the
    tokenizer is the seed's too: one trained vocabulary)."""
    again = write_tiny_checkpoint(tmp_path / "again", layout="hf", arch="qwen2_5_vl")
    other = write_tiny_checkpoint(tmp_path / "other", layout="hf", arch="qwen2_5_vl", seed=1)
    weights = sorted(path.name for path in tiny_qwen.glob("*.safetensors"))
    assert weights and weights == sorted(path.name for path in again.glob("*.safetensors"))
    for name in [*weights, "tokenizer.json", "config.json"]:
        assert (tiny_qwen / name).read_bytes() == (again / name).read_bytes(), name
    assert (tiny_qwen / weights[0]).read_bytes() != (other / weights[0]).read_bytes()
    assert (tiny_qwen / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def test_the_demos_qwen_part_answers_at_a_kept_share(tiny_qwen, tmp_path):
    env = {**os.environ, "QWEN_MODEL_PATH": str(tiny_qwen), "PYTHON": sys.executable, "ANSWERS_DIR": str(tmp_path),
           "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", "scripts/demo_qwen.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("conversation mode: qwen (from") == 1
    stats = json.loads((tmp_path / f"{tiny_qwen.name}-fastv.jsonl").read_text())["metadata"]
    assert stats["keep_fraction"] == 0.222 and abs(stats["vision_kept_fraction"] - 0.222) < 0.01
    assert (f"vision tokens in: {stats['vision_tokens_in']}, avg_vision_tokens: {stats['avg_vision_tokens']:.1f} "
            f"(kept fraction {stats['vision_kept_fraction']:.3f}, asked 0.222)") in done.stdout


def test_lmms_eval_model_args_take_a_qwen_checkpoint(tiny_qwen):
    """`pretrained=<Qwen>,method=fastv,keep=0.111`: the checkpoint's chat template, the method at that share."""
    from llava.eval.answering.answerer import Answerer
    from llava.eval.lmms_args import load_run

    run = load_run({"pretrained": str(tiny_qwen), "method": "fastv", "keep": 0.111, "device": "cpu"}, 2)
    assert (run.drop.name, run.args.conv_mode) == ("fastv", QWEN_CONV_MODE)
    answerer = Answerer(run.tokenizer, run.model, run.image_processor, run.args.conv_mode,
                        SamplingConfig(max_new_tokens=4), run.drop)
    answer = answerer.answer(QUESTIONS["square"], load_image(DEMO_DIR / "images" / NEXT_DEMO_IMAGES["square"]))
    assert answer.stats["keep_fraction"] == 0.111
    assert abs(answer.stats["avg_vision_tokens"] - 0.111 * answer.stats["vision_tokens_in"]) < 1
    with pytest.raises(ValueError, match="Qwen"):
        load_run({"pretrained": str(tiny_qwen), "method": "tome", "device": "cpu"}, 1)


@pytest.mark.parametrize("name,args", [("fastv", {}), ("pdrop", {}), ("sparsevlm", {}),
                                       ("mustdrop", {"vision_merge": "false"})])
@pytest.mark.parametrize("keep", [0.333, 0.222, 0.111])
def test_every_decoder_method_reaches_a_kept_share_of_each_image(loaded_qwen, name, args, keep):
    """Images of three aspect ratios bring different counts; each keeps its share (the count it rounds to:
    a tiny image's 84 tokens make 0.222 a count of 19, a share of 0.226), within 1 % on average."""
    _, model, _, _ = loaded_qwen
    inputs = [demo_inputs(loaded_qwen, shape) for shape in NEXT_DEMO_IMAGES]
    requests = [GenerationRequest(one.input_ids, one.pixel_values, one.image_sizes) for one in inputs]
    method = create_method(name, {**args, "keep_fraction": str(keep)})
    if (name, keep) == ("sparsevlm", 0.111):  # its first layers and recycling alone average more on 28 layers
        with pytest.raises(ValueError, match="budget 28 is below 29.3"):
            generate_batch(model, requests, SamplingConfig(max_new_tokens=2), eos_of(model), drop=method)
        return
    outputs = generate_batch(model, requests, SamplingConfig(max_new_tokens=2), eos_of(model), drop=method)
    targets = [fraction_budget(keep, output.stats["vision_tokens_in"]) for output in outputs]
    reached = [output.stats["avg_vision_tokens"] / target for output, target in zip(outputs, targets)]
    assert len({output.stats["vision_tokens_in"] for output in outputs}) == 3
    assert abs(sum(reached) / len(reached) - 1) <= 0.01
    assert all(output.stats["keep_fraction"] == keep for output in outputs)


def test_the_side_by_side_page_draws_qwen_pictures(loaded_qwen):
    """The web page's comparison on a Qwen checkpoint: answers, and each drawable method's stages on the image's
    own token grid."""
    from llava.serve.side_by_side import SideBySide

    tokenizer, model, image_processor, _ = loaded_qwen
    page = SideBySide(tokenizer, model, image_processor, QWEN_CONV_MODE, SamplingConfig(max_new_tokens=2))
    image = load_image(DEMO_DIR / "images" / NEXT_DEMO_IMAGES["wide"])
    comparison = page.compare(image, QUESTIONS["wide"], [create_method("none"), create_method("fastv", {"budget": "24"})])
    none, fastv = comparison.results
    assert len(none.stages) == 1 and len(fastv.stages) == 2  # the vision stage, then FastV's one drop
    assert fastv.stages[-1].tokens_kept == int(fastv.stages[-1].kept.sum()) == \
        fastv.answer.stats["vision_tokens_after_layer"]["1"]
    assert len(comparison.model_view) == 1


def test_a_calibrated_kept_share_runs_through_a_script(tiny_qwen, tmp_path):
    """`llava.eval.calibrate --keep-targets 0.333` finds MustDrop's thresholds for a share on Qwen (stages 2
    and 3, --no_merge); textvqa.sh keep0.333 runs with them, and its summary reports the share calibration
    measured. METHOD=fastv runs the same setting as its --keep."""
    questions = first_questions(tmp_path, 3)
    calibration = tmp_path / "thresholds.json"
    calibrate_main(["--model-path", str(tiny_qwen), "--question-file", str(questions), "--image-folder",
                    str(DEMO_IMAGE_FOLDER), "--keep-targets", "0.333", "--no_merge", "--num-questions", "3",
                    "--steps", "8", "--device", "cpu", "--out", str(calibration)])
    saved = json.loads(calibration.read_text())
    found = saved["results"][0]
    assert found["share"] and found["reachable"] and abs(found["mean_tokens"] - 0.333) < 0.05
    assert saved["common_sh"] == [f'THR_keep0_333="{found["global_thr"]:g} {found["individual_thr"]:g}"']
    env = {"EVAL_DIR": str(tmp_path / "eval"), "QUESTION_FILE": str(questions), "IMAGE_FOLDER": str(DEMO_IMAGE_FOLDER),
           "ANNOTATION_FILE": str(annotations_for(questions, tmp_path)), "EXTRA_ARGS": "--no_merge",
           "THR_keep0_333": f"{found['global_thr']!r} {found['individual_thr']!r}"}
    done = run_benchmark_script("textvqa.sh", "keep0.333", tiny_qwen, env)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "eval" / "textvqa" / "answers" / f"{tiny_qwen.name}-keep0.333" /
                          "summary.json").read_text())
    assert (summary["setting"], summary["method"]) == ("keep0.333", "mustdrop")
    assert summary["mean_vision_kept_fraction"] == pytest.approx(found["mean_tokens"])
    fastv = run_benchmark_script("textvqa.sh", "keep0.111", tiny_qwen, {**env, "METHOD": "fastv", "EXTRA_ARGS": ""})
    assert fastv.returncode == 0, fastv.stderr
    summary = json.loads((tmp_path / "eval" / "textvqa" / "answers" / f"{tiny_qwen.name}-fastv-keep0.111" /
                          "summary.json").read_text())
    assert summary["drop_flags"] == "--method fastv --keep 0.111"
    assert abs(summary["mean_vision_kept_fraction"] - 0.111) < 0.01


def test_a_bad_keep_setting_is_one_line(tiny_qwen, tmp_path):
    done = run_benchmark_script("textvqa.sh", "keep0.x", tiny_qwen, {"EVAL_DIR": str(tmp_path)})
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "keep0.x" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_chat_with_qwen_is_its_chat_template(loaded_qwen):
    """Two turns of `llava.serve.chat` on Qwen: the second turn's prompt is the checkpoint's chat template over
    the whole conversation (the image in the first user turn)."""
    from llava.eval.answering.answerer import Answerer
    from llava.serve.chat import Chat

    tokenizer, model, image_processor, _ = loaded_qwen
    image = load_image(DEMO_DIR / "images" / NEXT_DEMO_IMAGES["wide"])
    chat = Chat(Answerer(tokenizer, model, image_processor, QWEN_CONV_MODE, SamplingConfig(max_new_tokens=3)), image)
    first = chat.ask("What is written here?")
    second = chat.ask("And the colour?")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is written here?"}]},
                {"role": "assistant", "content": first.text}, {"role": "user", "content": "And the colour?"}]
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert second.prompt == templated.replace("<|image_pad|>", DEFAULT_IMAGE_TOKEN)
