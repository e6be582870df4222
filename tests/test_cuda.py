"""The engine on a GPU: every tensor it makes lands on the model's device, the unpruned loop still equals
transformers' generate() there, every method runs there at a budget, in fp32 and in bf16, and a decode step
replayed as a CUDA graph gives the eager step's tokens with one host sync per token; for LLaVA-1.5,
LLaVA-NeXT and Qwen2.5-VL (its 3-D positions, its own prompt format, kept shares instead of budgets).

Skipped without CUDA (CI has none); on a GPU machine run `pytest tests/test_cuda.py`. To try the same
checks on another device, set MUSTDROP_TEST_DEVICE (e.g. `cpu`).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from llava.drop.generate import GenerationRequest, SamplingConfig, generate, generate_batch
from llava.drop.methods import METHODS, create_method
from llava.drop.methods.registry import discover_methods
from llava.mm_utils import load_image
from llava.model.builder import load_pretrained_model
from llava.model.geometry import geometry_of_model
from llava.model.inputs import encode_question
from llava.model.qwen import QWEN_CONV_MODE, is_qwen
from tests.conftest import hf_input_ids, method_at_budget

DEVICE = os.environ.get("MUSTDROP_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA device: run `pytest tests/test_cuda.py` on a GPU machine")

NEW_TOKENS = 6
QUESTION = "What is written here?"
BUDGETS = {"llava": 64, "next": 320}  # the smallest LLaVA-1.5 setting, a LLaVA-NeXT one (total tokens)
QWEN_KEEP = "0.222"  # Qwen's images bring as many tokens as their resolution gives: a kept share, not a count
SQUARE_IMAGE = "playground/data/eval/demo/images/3fc86ee644365862.png"  # 400x400: NeXT tiles it 2x2


def loaded(checkpoint, dtype: str):
    return load_pretrained_model(str(checkpoint), device=DEVICE, torch_dtype=dtype)


@pytest.fixture(scope="module", params=["llava", "next", "qwen"])
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def checkpoint(arch, request):
    return request.getfixturevalue({"llava": "tiny_hf", "next": "tiny_next_hf", "qwen": "tiny_qwen"}[arch])


def conv_mode(model) -> str:
    return QWEN_CONV_MODE if is_qwen(model) else "vicuna_v1"


def question_inputs(tokenizer, model, image_processor, question: str = QUESTION):
    return encode_question(question, load_image(SQUARE_IMAGE), model, tokenizer, image_processor, conv_mode(model))


def arch_of(model, inputs) -> str:
    return "qwen" if is_qwen(model) else "next" if inputs.image_sizes is not None else "llava"


def method_for(name: str, arch: str):
    """Method `name` at the arch's setting: a budget on LLaVA, the kept share on Qwen."""
    if arch == "qwen":
        return create_method(name) if METHODS[name].own_count else create_method(name, {"keep_fraction": QWEN_KEEP})
    return method_at_budget(name, BUDGETS[arch])


def transformers_reference(model, tokenizer, inputs, vision_tokens: int) -> list[int]:
    """transformers' greedy generate() on the same prompt, its image written as the model's own tokens."""
    reference_ids = hf_input_ids(inputs.input_ids, model.config.image_token_id, vision_tokens).to(DEVICE)
    extra = {}
    if is_qwen(model):
        extra = {"image_grid_thw": inputs.image_sizes.to(DEVICE), "attention_mask": torch.ones_like(reference_ids),
                 "mm_token_type_ids": (reference_ids == model.config.image_token_id).int()}
    elif inputs.image_sizes is not None:
        extra = {"image_sizes": inputs.image_sizes.to(DEVICE)}
    with torch.no_grad():
        reference = model.generate(input_ids=reference_ids, pixel_values=inputs.pixel_values.to(DEVICE, torch.float32),
                                   max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, **extra)
    return reference[0, reference_ids.shape[1]:].tolist()


def run(model, tokenizer, inputs, method=None, **sampling) -> tuple[list[int], dict]:
    out = generate(model, inputs.input_ids, inputs.pixel_values, SamplingConfig(max_new_tokens=NEW_TOKENS, **sampling),
                   {tokenizer.eos_token_id}, drop=method, image_sizes=inputs.image_sizes)
    return out.token_ids, out.stats


def test_unpruned_loop_equals_transformers_generate_on_the_device(checkpoint):
    tokenizer, model, image_processor, _ = loaded(checkpoint, "fp32")
    inputs = question_inputs(tokenizer, model, image_processor)
    ours, stats = run(model, tokenizer, inputs)
    assert ours == transformers_reference(model, tokenizer, inputs, stats["vision_tokens"])
    if DEVICE == "cuda":
        assert stats["peak_memory_bytes"] > 0


def runnable_methods(arch: str, model) -> list[str]:
    """Every registered dropping method that declares support for this architecture."""
    discover_methods()
    if arch == "qwen":
        return sorted(name for name in METHODS if name != "none" and create_method(name).runs_on_qwen)
    return sorted(name for name, cls in METHODS.items() if name != "none" and (arch == "llava" or cls.supports_next))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_method_runs_on_the_device_at_a_budget(arch, checkpoint, dtype):
    """The layer-averaged count as on CPU in fp32, within 1 % of the budget (budgets fix the counts; rankings
    and MustDrop's merge count, within its bounds, depend on the arithmetic; a method that picks its own
    count is held to CPU's count in fp32 only), sampling with a seed repeats, and nothing leaves the device."""
    tokenizer, model, image_processor, _ = loaded(checkpoint, dtype)
    cpu = load_pretrained_model(str(checkpoint), device="cpu", torch_dtype="fp32")
    inputs = question_inputs(tokenizer, model, image_processor)
    names = runnable_methods(arch, model)
    assert "fastv" in names or arch == "next"
    for name in names:
        method = method_for(name, arch)
        tokens, stats = run(model, tokenizer, inputs, method)
        _, cpu_stats = run(cpu[1], cpu[0], inputs, method)
        assert len(tokens) >= 1 and math.isfinite(stats["avg_vision_tokens"]), name
        if dtype == "fp32":
            assert stats["vision_tokens"] == cpu_stats["vision_tokens"], name
        if not METHODS[name].own_count:  # PruMerge+ picks its count from outliers, which bf16 rounding moves
            budget = BUDGETS.get(arch) or float(QWEN_KEEP) * stats["vision_tokens_in"]
            assert abs(stats["avg_vision_tokens"] - cpu_stats["avg_vision_tokens"]) <= 0.01 * budget, name
        first, _ = run(model, tokenizer, inputs, method, temperature=0.7, top_p=0.9, seed=3)
        second, _ = run(model, tokenizer, inputs, method, temperature=0.7, top_p=0.9, seed=3)
        assert first == second, name


@pytest.mark.skipif(DEVICE != "cuda", reason="counts CUDA synchronisations")
def test_decoding_syncs_with_the_host_once_per_token(checkpoint):
    """The stop checks read each new token back; nothing else in a decode step waits for the GPU. Setting a
    decode up (uploading the first token and the layers' positions) syncs a fixed number of times, so
    decoding 4 tokens more must cost exactly 4 syncs more. A first, untimed decode of the longer length
    lets the caching allocator hold the buffers' blocks, so that neither count includes a cudaMalloc."""
    tokenizer, model, image_processor, _ = loaded(checkpoint, "bf16")
    inputs = question_inputs(tokenizer, model, image_processor)
    method = method_for("fastv", arch_of(model, inputs))
    syncs_while_decoding(model, inputs, method, 9)
    short, long = syncs_while_decoding(model, inputs, method, 5), syncs_while_decoding(model, inputs, method, 9)
    assert long - short == 4, (short, long)
    assert short <= 4 + 2  # 4 steps, plus at most the two uploads


def syncs_while_decoding(model, inputs, method, new_tokens: int) -> int:
    """CUDA synchronisations while decoding `new_tokens` tokens (EOS off) after a prefill."""
    import warnings

    from llava.drop.cache import KVCache
    from llava.drop.decode import decode_together, next_tokens
    from llava.drop.generate import encode_vision
    from llava.drop.prefill import build_prompt, prefill
    from llava.model.geometry import decoder_layer_count

    prompt = build_prompt(model, inputs.input_ids, encode_vision(model, method, inputs.pixel_values, inputs.image_sizes))
    cache = KVCache(decoder_layer_count(model))
    sampling = SamplingConfig(max_new_tokens=new_tokens)
    with torch.inference_mode():
        first = next_tokens(prefill(model, [prompt], cache, method).logits, sampling, [None])
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                tokens = decode_together(model, first, cache, [cache.row_lengths(0)], [new_tokens], sampling, set(),
                                         [None], [None])[0]
            finally:
                torch.cuda.set_sync_debug_mode("default")
    assert len(tokens) == new_tokens
    return sum("synchroniz" in str(warning.message) for warning in caught)


@pytest.mark.skipif(DEVICE != "cuda", reason="counts CUDA synchronisations")
@pytest.mark.parametrize("name", ["fastv", "pdrop", "mustdrop"])
def test_a_batched_prefill_syncs_with_the_host_once_per_dropping_layer(checkpoint, name):
    """Selecting for the whole batch waits for the GPU only to learn the new lengths: a prefill of three
    prompts with D dropping layers syncs at most D + 1 times more than the unpruned one (the one more reads
    the selection time's last event)."""
    tokenizer, model, image_processor, _ = loaded(checkpoint, "bf16")
    inputs = question_inputs(tokenizer, model, image_processor)
    if name == "mustdrop":  # its thresholds; on Qwen its stage 1 (a CLIP merge) is off
        options = {"global_thr": "0.011", "individual_thr": "0.01"}
        method = create_method(name, {**options, "vision_merge": "false"} if is_qwen(model) else options)
    else:
        method = method_for(name, arch_of(model, inputs))
    dropping_layers = len(method.prefill_layers(geometry_of_model(model)))
    syncs_while_prefilling(model, inputs, method)  # the allocator keeps the blocks: no cudaMalloc counted
    syncs_while_prefilling(model, inputs, None)
    unpruned, dropping = syncs_while_prefilling(model, inputs, None), syncs_while_prefilling(model, inputs, method)
    assert dropping - unpruned <= dropping_layers + 1, (name, unpruned, dropping)


def syncs_while_prefilling(model, inputs, method, prompts: int = 3) -> int:
    """CUDA synchronisations while `prompts` copies of the prompt go through the decoder together."""
    import warnings

    from llava.drop.cache import KVCache
    from llava.drop.generate import encode_vision
    from llava.drop.prefill import build_prompt, prefill
    from llava.model.geometry import decoder_layer_count

    with torch.inference_mode():
        prompt = build_prompt(model, inputs.input_ids, encode_vision(model, method, inputs.pixel_values,
                                                                     inputs.image_sizes))
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                prefill(model, [prompt] * prompts, KVCache(decoder_layer_count(model)), method)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


# SDPA's backends whose forward gives the same bits at every run (PyTorch's randomness notes).
RUN_TO_RUN_EXACT_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
GRAPH_QUESTIONS = ["What is written here?", "Describe the picture in a few words, please.", "Which colour?"]
TIMINGS = ("vision_seconds", "prefill_seconds", "decode_seconds", "scoring_seconds", "peak_memory_bytes",
           "peak_rss_bytes")


def ragged_requests(tokenizer, model, image_processor) -> list[GenerationRequest]:
    requests = []
    for question in GRAPH_QUESTIONS:
        inputs = question_inputs(tokenizer, model, image_processor, question)
        requests.append(GenerationRequest(inputs.input_ids, inputs.pixel_values, inputs.image_sizes))
    return requests


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_graph_decoding_equals_eager_decoding_for_every_method(arch, checkpoint, dtype):
    """Three ragged prompts decoded together: the replayed graph runs the eager step's kernels on the same
    buffers, so every answer and every non-timing statistic must be identical, for every method. cuDNN's
    attention, SDPA's first choice in bf16 on Hopper, is left out: it is not exact from run to run (two
    eager runs of a 7B-wide model part ways within 32 tokens on an H200), so it would hide what is tested."""
    tokenizer, model, image_processor, _ = loaded(checkpoint, dtype)
    requests = ragged_requests(tokenizer, model, image_processor)
    sampling = SamplingConfig(max_new_tokens=2 * NEW_TOKENS)
    for name in ["none", *runnable_methods(arch, model)]:
        method = None if name == "none" else method_for(name, arch)
        with sdpa_kernel(RUN_TO_RUN_EXACT_ATTENTION):
            eager = generate_batch(model, requests, sampling, set(), method)
            graphed = generate_batch(model, requests, sampling, set(), method, cuda_graph=True)
        assert [out.token_ids for out in graphed] == [out.token_ids for out in eager], name
        assert all(len(out.token_ids) == sampling.max_new_tokens for out in graphed), name
        for ours, theirs in zip(graphed, eager):
            assert {k: v for k, v in ours.stats.items() if k not in TIMINGS} == \
                {k: v for k, v in theirs.stats.items() if k not in TIMINGS}, name


@pytest.mark.skipif(DEVICE != "cuda", reason="counts CUDA synchronisations")
def test_cuda_graph_decoding_syncs_with_the_host_once_per_token(checkpoint):
    """As for the eager loop: decoding 4 tokens more through the replayed graph costs exactly 4 syncs more."""
    tokenizer, model, image_processor, _ = loaded(checkpoint, "bf16")
    requests = ragged_requests(tokenizer, model, image_processor)[:2]
    arch = "next" if requests[0].image_sizes is not None else "llava"
    method = create_method("fastv", {"budget": str(BUDGETS[arch])})

    def syncs(new_tokens: int) -> int:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                outputs = generate_batch(model, requests, SamplingConfig(max_new_tokens=new_tokens), set(), method,
                                         cuda_graph=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert all(len(out.token_ids) == new_tokens for out in outputs)
        return sum("synchroniz" in str(warning.message) for warning in caught)

    syncs(9)
    short, long = syncs(5), syncs(9)
    assert long - short == 4, (short, long)
