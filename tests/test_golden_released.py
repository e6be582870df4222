"""Every peer keeps what its authors' released code keeps: golden fixtures recorded from that code.

`tools/golden_released.py` ran each method's released code (with LLaVA's own, transformers 4.37, CPU, exact
float32 weights) once on the tiny LLaVA-1.5 checkpoint that `write_tiny_checkpoint` builds, over the demo
questions, and wrote `tests/fixtures/golden_<method>.json`; where the released code runs LLaVA-NeXT, once
more on the tiny NeXT checkpoint over the demo questions about its tall, square and wide images
(`tests/fixtures/golden_<method>_next.json`). Here our method runs the same questions: the
tokens it keeps (indices where it selects, counts everywhere) and every layer's KV-cache length must equal
the fixture's, and the answer too, except from a step where the released run's two best logits were
within TIE_MARGIN of each other (a numerical tie: the helper finds and names it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llava.drop.generate import SamplingConfig, generate
from llava.drop.image_reduction import run_to_select_layer
from llava.drop.methods.fastv import FastV, FastVOptions
from llava.drop.methods.pdrop import PDrop, PDropOptions
from llava.drop.methods.prumerge import PruMerge, PruMergePlus, cls_attention_and_keys, scoring_layer
from llava.drop.methods import sparsevlm as sparsevlm_module
from llava.drop.methods import visionzip as visionzip_module
from llava.drop.methods.sparsevlm import RELEASED_SCHEDULES, SparseVLM, SparseVLMOptions
from llava.drop.methods.visionzip import VisionZip, VisionZipOptions, ZippedImage, target_positions, zip_image
from llava.drop.vision import is_next, selected_layer_count, vision_token_offset
from llava.mm_utils import load_image, process_images, tokenizer_image_token
from llava.model.inputs import image_inputs
from tests.conftest import DEMO_IMAGE_FOLDER, DEMO_QUESTION_FILE, NEXT_DEMO_IMAGES, vicuna_prompt

FIXTURES = Path(__file__).parent / "fixtures"
TIE_MARGIN = 1e-3  # top-2 logit margin under which two answers may part by rounding alone
NORM_TOLERANCE = 1e-4  # relative, on the norms of VisionZip's projected vision tokens
COSINE_TIE = 1e-6  # two key similarities this close are a tie that float rounding decides
SCORE_TIE = 1e-5  # relative: two SparseVLM scores (or DPC-KNN claims) this close are a tie that rounding orders
PATCHES = 576


def fixture(method: str) -> dict:
    return json.loads((FIXTURES / f"golden_{method}.json").read_text())


def settings_of(method: str) -> list[tuple[str, int]]:
    return [(method, index) for index in range(len(fixture(method)["settings"]))]


def check_checkpoint(checkpoint: Path, recorded: dict[str, str]) -> None:
    """The fixtures hold for one checkpoint: refuse another rather than report false differences."""
    changed = [name for name, digest in recorded.items()
               if hashlib.sha256((checkpoint / name).read_bytes()).hexdigest() != digest]
    assert not changed, (f"the tiny checkpoint changed ({changed}); regenerate tests/fixtures/golden_*.json with "
                         "tools/golden_released.py")


def first_difference(ours: list[int], theirs: list[int]) -> int | None:
    """The first step where two answers differ (one ending earlier counts), or None."""
    for step, (mine, released) in enumerate(zip(ours, theirs)):
        if mine != released:
            return step
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


def answer_tie(ours: list[int], recorded: dict) -> str | None:
    """None when the answers agree; a named tie when they part where the released run's top-2 logits were
    within TIE_MARGIN; fails otherwise."""
    step = first_difference(ours, recorded["generated_ids"])
    if step is None:
        return None
    margins = recorded["top2_margins"]
    margin = margins[step] if step < len(margins) else float("inf")
    assert margin < TIE_MARGIN, (f"{recorded['question_id']}: answers part at token {step} where the released "
                                 f"code's top-2 margin was {margin:.2e}: ours {ours}, released "
                                 f"{recorded['generated_ids']}")
    return f"{recorded['question_id']}: tie at token {step} (top-2 margin {margin:.1e})"


def assert_differences_are_ties(features: torch.Tensor, recorded: dict, tied: set[int], tie: str) -> None:
    """Our vision tokens' norms equal the released code's (within NORM_TOLERANCE) except at `tied` tokens."""
    norms, released = features.norm(dim=-1), torch.tensor(recorded["feature_norms"])
    differing = set(((norms - released).abs() > NORM_TOLERANCE * released).nonzero().flatten().tolist())
    assert differing <= tied, (f"{recorded['question_id']}: vision tokens {sorted(differing - tied)} differ "
                               f"from the released code's without {tie}")


def question_inputs(loaded, question_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo question's token ids (vicuna_v1, the image placeholder first) and its image's pixels (LLaVA-NeXT:
    the base image and its crops, [1, 1 + K, 3, H, W], tiled as the checkpoint's own code tiles them)."""
    tokenizer, model, image_processor, _ = loaded
    question = next(row for row in map(json.loads, DEMO_QUESTION_FILE.read_text().splitlines())
                    if row["question_id"] == question_id)
    input_ids = tokenizer_image_token(vicuna_prompt(question["text"]), tokenizer, return_tensors="pt")
    image = load_image(DEMO_IMAGE_FOLDER / question["image"])
    if is_next(model):
        return input_ids, image_inputs(image, model.config, image_processor)[0]
    return input_ids, process_images([image], image_processor)


def next_image_sizes(recorded: dict) -> torch.Tensor:
    """Our [[height, width]] of the image the released run got as LLaVA's (width, height)."""
    width, height = recorded["image_size"]
    return torch.tensor([[height, width]])


def answer(loaded, input_ids, pixels, method, new_tokens: int, image_sizes: torch.Tensor | None = None):
    tokenizer, model, _, _ = loaded
    return generate(model, input_ids, pixels, SamplingConfig(max_new_tokens=new_tokens), {tokenizer.eos_token_id},
                    drop=method, image_sizes=image_sizes)


class LayerPositions:
    """The position ids one decoder layer receives: at prefill and at the first decoding step."""

    def __init__(self, layer: torch.nn.Module):
        self.prefill: list[int] | None = None
        self.first_decode: int | None = None
        self.handle = layer.register_forward_pre_hook(self.see, with_kwargs=True)

    def see(self, module, args, kwargs) -> None:
        positions = kwargs["position_ids"][0].tolist()
        if len(positions) > 1 and self.prefill is None:
            self.prefill = positions
        elif len(positions) == 1 and self.first_decode is None:
            self.first_decode = positions[0]


def compare(loaded, tiny_original, method_name: str, index: int, run_one) -> None:
    """Run every recorded question through `run_one(recorded, input_ids, pixels, new_tokens)` (which asserts
    what the method kept and returns our answer), then compare the answers; print the named ties."""
    golden = fixture(method_name)
    check_checkpoint(tiny_original, golden["checkpoint"])
    ties = []
    for recorded in golden["settings"][index]["questions"]:
        input_ids, pixels = question_inputs(loaded, recorded["question_id"])
        assert input_ids.view(-1).tolist() == recorded["input_ids"], recorded["question_id"]
        ours = run_one(recorded, input_ids, pixels, golden["max_new_tokens"])
        tie = answer_tie(ours, recorded)
        if tie is not None:
            ties.append(tie)
    print(f"{method_name} {golden['settings'][index]['options']}: answers equal on "
          f"{len(golden['settings'][index]['questions']) - len(ties)}; numerical ties: {ties or 'none'}")


@pytest.mark.parametrize("method_name, index", settings_of("visionzip"))
def test_visionzip_keeps_and_answers_as_released(loaded_original, tiny_original, method_name, index):
    options = fixture(method_name)["settings"][index]["options"]
    method = VisionZip(VisionZipOptions(dominant=options["dominant"], contextual=options["contextual"]))
    model = loaded_original[1]

    def run_one(recorded, input_ids, pixels, new_tokens):
        vision = method.encode_image(model, pixels)
        assert recorded["cls_kept"] and vision.patch_groups[0] == []
        dominant = [group[0] for group in vision.patch_groups[1 : options["dominant"]]]
        assert dominant == recorded["dominant_patches"], recorded["question_id"]
        assert vision.features.shape[0] == recorded["vision_tokens"]
        tied = {options["dominant"] + group for group in contextual_ties(model, pixels, options["dominant"], options["contextual"])}
        assert_differences_are_ties(vision.features, recorded, tied, "a tie in the contextual assignment")
        ours = answer(loaded_original, input_ids, pixels, method, new_tokens)
        assert ours.stats["kv_cache_lengths"] == recorded["kv_lengths"], recorded["question_id"]
        return ours.token_ids

    compare(loaded_original, tiny_original, method_name, index, run_one)


def test_next_fixtures_cover_the_demo_shapes():
    """Every NeXT fixture asks about the tall, square and wide demo images, each tiled into 1 + K tower images."""
    for method in ("visionzip_next", "pdrop_next", "sparsevlm_next"):
        for setting in fixture(method)["settings"]:
            assert [question["image"] for question in setting["questions"]] == list(NEXT_DEMO_IMAGES.values())
            assert [question["tower_images"] for question in setting["questions"]] == [3, 5, 3]


@pytest.mark.parametrize("method_name, index", settings_of("visionzip_next"))
def test_visionzip_next_keeps_and_answers_as_released(loaded_next_original, tiny_next_original, method_name, index,
                                                       monkeypatch):
    """LLaVA-NeXT: every tower image (base, then crops) keeps the released code's CLS and dominant patches, and
    the LLM receives the same tokens in the same layout (norms) and answers the same."""
    options = fixture(method_name)["settings"][index]["options"]
    dominant, contextual = options["dominant"], options["contextual"]
    method = VisionZip(VisionZipOptions(dominant=dominant, contextual=contextual))
    model = loaded_next_original[1]
    zipped: list[ZippedImage] = []

    def recording(*args):
        zipped.append(zip_image(*args))
        return zipped[-1]

    monkeypatch.setattr(visionzip_module, "zip_image", recording)

    def run_one(recorded, input_ids, pixels, new_tokens):
        sizes = next_image_sizes(recorded)
        assert pixels.shape[1] == recorded["tower_images"], recorded["question_id"]
        zipped.clear()
        vision = method.encode_next(model, pixels, sizes)
        assert all(image["cls_kept"] for image in recorded["images"])
        assert [image.kept.tolist() for image in zipped] == [image["dominant_patches"] for image in recorded["images"]]
        assert vision.features.shape[0] == recorded["vision_tokens"], recorded["question_id"]
        tied = set()
        for image, tower_image in enumerate(zipped):
            tied |= next_contextual_places(image, tied_groups(tower_image, contextual), len(zipped) - 1, dominant,
                                           contextual)
        assert_differences_are_ties(vision.features, recorded, tied, "a tie in the contextual assignment")
        ours = answer(loaded_next_original, input_ids, pixels, method, new_tokens, sizes)
        assert ours.stats["kv_cache_lengths"] == recorded["kv_lengths"], recorded["question_id"]
        return ours.token_ids

    compare(loaded_next_original, tiny_next_original, method_name, index, run_one)


def next_contextual_places(image: int, groups: set[int], crops: int, dominant: int, contextual: int) -> set[int]:
    """Where tower image `image`'s contextual `groups` sit among the released "spatial_unpad" tokens: the base
    image's tokens (CLS, dominant patches, contextual), the crops' dominant patches, their CLS tokens, then each
    crop's contextual tokens, crop by crop."""
    if image == 0:
        return {dominant + group for group in groups}
    crops_start = dominant + contextual + crops * dominant
    return {crops_start + (image - 1) * contextual + group for group in groups}


@pytest.mark.parametrize("method_name, index", settings_of("fastv"))
def test_fastv_keeps_and_answers_as_released(loaded_original, tiny_original, method_name, index):
    setting = fixture(method_name)["settings"][index]
    k, keep = setting["options"]["k"], setting["options"]["keep"]  # the released code's K: it drops after layer K - 1
    method = FastV(FastVOptions(drop_after=(k - 1,), kept_share=keep / PATCHES))
    model = loaded_original[1]

    def run_one(recorded, input_ids, pixels, new_tokens):
        positions = LayerPositions(model.model.language_model.layers[k])
        try:
            ours = answer(loaded_original, input_ids, pixels, method, new_tokens)
        finally:
            positions.handle.remove()
        start = setting["vision_start"]
        kept = [position - start for position in positions.prefill if start <= position < start + PATCHES]
        assert kept == recorded["kept_vision"], recorded["question_id"]
        assert positions.prefill == recorded["positions_after_drop"]
        assert positions.first_decode == recorded["first_decode_position"] == ours.stats["prompt_tokens"]
        assert ours.stats["vision_tokens_after_layer"] == {str(k - 1): recorded["vision_tokens_after_drop"]}
        assert_cache_lengths(ours.stats["kv_cache_lengths"], recorded["kv_lengths"], k)
        return ours.token_ids

    compare(loaded_original, tiny_original, method_name, index, run_one)


class SelectionLog:
    """Each mask a method's `select` returns, in order (one per dropping layer of a one-prompt batch)."""

    def __init__(self, method):
        self.masks: list[torch.Tensor] = []
        select = method.select

        def recording(context):
            mask = select(context)
            self.masks.append(mask[0].nonzero().flatten().tolist())
            return mask

        method.select = recording


@pytest.mark.parametrize("method_name, index", settings_of("pdrop"))
def test_pdrop_keeps_and_answers_as_released(loaded_original, tiny_original, method_name, index):
    pdrop_as_released(loaded_original, tiny_original, method_name, index)


@pytest.mark.parametrize("method_name, index", settings_of("pdrop_next"))
def test_pdrop_next_keeps_and_answers_as_released(loaded_next_original, tiny_next_original, method_name, index):
    """LLaVA-NeXT: the fork's own anyres layout (unpadded crops, a newline token after each row), every
    vision token of it ranked at each stage."""
    pdrop_as_released(loaded_next_original, tiny_next_original, method_name, index)


def pdrop_as_released(loaded, checkpoint: Path, method_name: str, index: int) -> None:
    options = fixture(method_name)["settings"][index]["options"]
    ratio = options["ratios"][0]
    assert options["ratios"] == [ratio ** stage for stage in range(1, len(options["ratios"]) + 1)]
    # the released code's layer_list holds the first layer of each new stage: it drops after the layer before
    method = PDrop(PDropOptions(drop_after=tuple(layer - 1 for layer in options["layers"]), kept_share=ratio))
    log = SelectionLog(method)
    model = loaded[1]

    def run_one(recorded, input_ids, pixels, new_tokens):
        log.masks.clear()
        positions = LayerPositions(model.model.language_model.layers[-1])
        sizes = next_image_sizes(recorded) if "image_size" in recorded else None
        try:
            ours = answer(loaded, input_ids, pixels, method, new_tokens, sizes)
        finally:
            positions.handle.remove()
        assert log.masks == [stage["kept_vision"] for stage in recorded["stages"]], recorded["question_id"]
        assert ours.stats["vision_tokens_after_layer"] == {str(stage["after_layer"]): len(stage["kept_vision"])
                                                          for stage in recorded["stages"]}
        assert ours.stats["kv_cache_lengths"] == recorded["kv_lengths"]
        assert positions.first_decode == recorded["first_decode_positions"][-1] == recorded["kv_lengths"][-1]
        return ours.token_ids

    compare(loaded, checkpoint, method_name, index, run_one)


class SparseVLMLog:
    """What our SparseVLM chose at each drop of one prompt, in order: its raters, kept tokens (SelectionLog), the
    dropped tokens' scores, the recycled tokens (best first), DPC-KNN's claims and centres, and the merged tokens'
    norms."""

    def __init__(self, method: SparseVLM, monkeypatch):
        self.selections = SelectionLog(method)
        self.raters: list[list[int]] = []
        self.scores: list[torch.Tensor] = []
        self.recycled: list[list[int]] = []
        self.claims: list[torch.Tensor] = []
        self.centres: list[list[int]] = []
        self.merged_norms: list[torch.Tensor] = []
        module = sparsevlm_module
        raters, best, claims, cluster, merge = (module.text_raters, module.best_dropped, module.dpc_knn_scores,
                                                module.dpc_knn, module.merge_clusters)

        def rating(*args):
            chosen = raters(*args)
            self.raters.append(chosen.tolist())
            return chosen

        def choosing(scores, kept, count):
            chosen = best(scores, kept, count)
            self.scores.append(scores)
            self.recycled.append(chosen.tolist())
            return chosen

        def claiming(*args):
            distance, scores = claims(*args)
            self.claims.append(scores)
            return distance, scores

        def clustering(*args):
            centres, assignment = cluster(*args)
            self.centres.append(centres.tolist())
            return centres, assignment

        def merging(*args):
            merged = merge(*args)
            self.merged_norms.append(merged.norm(dim=-1))
            return merged

        for name, recording in (("text_raters", rating), ("best_dropped", choosing), ("dpc_knn_scores", claiming),
                                ("dpc_knn", clustering), ("merge_clusters", merging)):
            monkeypatch.setattr(module, name, recording)

    def clear(self) -> None:
        for record in (self.selections.masks, self.raters, self.scores, self.recycled, self.claims, self.centres,
                       self.merged_norms):
            record.clear()


@pytest.mark.parametrize("method_name, index", settings_of("sparsevlm"))
def test_sparsevlm_keeps_recycles_and_answers_as_released(loaded_original, tiny_original, method_name, index,
                                                          monkeypatch):
    sparsevlm_as_released(loaded_original, tiny_original, method_name, index, monkeypatch)


@pytest.mark.parametrize("method_name, index", settings_of("sparsevlm_next"))
def test_sparsevlm_next_keeps_recycles_and_answers_as_released(loaded_next_original, tiny_next_original, method_name,
                                                               index, monkeypatch):
    """LLaVA-NeXT, against the released code with its vision span read as the packed feature's length (the one
    line it needs to run there, SPARSEVLM_NEXT_SPAN in tools/golden_released.py): every token of the model's own
    layout, newline tokens included, rated, dropped and recycled alike."""
    sparsevlm_as_released(loaded_next_original, tiny_next_original, method_name, index, monkeypatch)


def sparsevlm_as_released(loaded, checkpoint: Path, method_name: str, index: int, monkeypatch) -> None:
    """The released raters and, at each drop, kept tokens; the recycled tokens in their order, DPC-KNN's centres
    and the merged tokens' norms until a numerical tie (named) parts the two runs' recycling; every drop's counts,
    every layer's cache length and first decoding position; the answers."""
    setting = fixture(method_name)["settings"][index]
    options = setting["options"]
    assert tuple(options["keep"]) == RELEASED_SCHEDULES[options["retained_tokens"]]
    method = SparseVLM(SparseVLMOptions(drop_after=tuple(options["layers"]), keep=tuple(options["keep"]),
                                        seed=setting["noise_seed"]))
    log = SparseVLMLog(method, monkeypatch)
    layers = loaded[1].model.language_model.layers
    ties: list[str] = []

    def run_one(recorded, input_ids, pixels, new_tokens):
        log.clear()
        positions = [LayerPositions(layer) for layer in layers]
        sizes = next_image_sizes(recorded) if "image_size" in recorded else None
        try:
            ours = answer(loaded, input_ids, pixels, method, new_tokens, sizes)
        finally:
            for position in positions:
                position.handle.remove()
        stages, name = recorded["stages"], recorded["question_id"]
        assert log.raters and all(raters == recorded["raters"] for raters in log.raters), name
        assert len(log.selections.masks) == len(log.recycled) == len(stages), name
        parted = False
        for number, stage in enumerate(stages):
            assert log.selections.masks[number] == stage["kept_vision"], (name, stage["after_layer"])
            if parted:  # a tie earlier on changed the merged tokens this drop recycles from
                continue
            tie, parted = sparsevlm_stage_tie(log, number, stage)
            if tie is not None:
                ties.append(f"{name} after layer {stage['after_layer']}: {tie}")
        assert ours.stats["vision_tokens_after_layer"] == {str(stage["after_layer"]): stage["vision_tokens_out"]
                                                          for stage in stages}, name
        assert ours.stats["kv_cache_lengths"] == recorded["kv_lengths"], name
        assert [position.first_decode for position in positions] == recorded["first_decode_positions"], name
        return ours.token_ids

    compare(loaded, checkpoint, method_name, index, run_one)
    print(f"{method_name} {options['retained_tokens']}: recycling ties: {ties or 'none'}")


def sparsevlm_stage_tie(log: SparseVLMLog, number: int, stage: dict) -> tuple[str | None, bool]:
    """Compare drop `number`'s recycling with the released one. Returns (None, False) when it recycled the same
    tokens in the same order, chose the same centres and merged tokens of the same norms; else a named tie and
    whether it parts the runs from here on. Ties: two recycled tokens whose scores (ours) lie within SCORE_TIE
    take each other's place (the same tokens in another order, each with another noise draw; or, at the edge of
    the recycled count, another token: the merged tokens differ and the runs part), or two tokens whose DPC-KNN
    claims lie within SCORE_TIE take each other's place among the centres (the merged tokens come in another
    order, at other positions: the runs part). Fails on any other difference."""
    ours, released, scores = log.recycled[number], stage["recycled"], log.scores[number]
    named = []
    swapped = [(mine, theirs) for mine, theirs in zip(ours, released) if mine != theirs]
    gaps = [0.0]
    for mine, theirs in swapped:
        gaps.append(abs(float(scores[mine] - scores[theirs])) / float(scores[mine].abs()))
        assert gaps[-1] <= SCORE_TIE, f"recycled token {mine} where the released code has {theirs}, {gaps[-1]:.1e} apart"
    if swapped:
        named.append(f"recycled tokens {sorted({token for pair in swapped for token in pair})} tie on their scores "
                     f"({max(gaps):.0e} apart)")
    if sorted(ours) != sorted(released):
        return "; ".join(named) + ", another token recycled", True
    claims = log.claims[number]
    our_centres = [ours[centre] for centre in log.centres[number]]  # as tokens: a swapped pair keeps its tokens
    released_centres = [released[centre] for centre in stage["centres"]]
    moved = [(mine, theirs) for mine, theirs in zip(our_centres, released_centres) if mine != theirs]
    gaps = [0.0]
    for mine, theirs in moved:
        mine_claim, their_claim = claims[ours.index(mine)], claims[ours.index(theirs)]
        gaps.append(abs(float(mine_claim - their_claim)) / float(mine_claim.abs()))
        assert gaps[-1] <= SCORE_TIE, f"centre {mine} where the released code has {theirs}, {gaps[-1]:.1e} apart"
    if moved:
        named.append(f"centres {sorted({token for pair in moved for token in pair})} tie on their DPC-KNN claims "
                     f"({max(gaps):.0e} apart)")
        return "; ".join(named), True
    released_norms = torch.tensor(stage["merged_norms"])
    assert torch.allclose(log.merged_norms[number], released_norms, rtol=NORM_TOLERANCE, atol=0), stage["after_layer"]
    return ("; ".join(named) or None), False


PRUMERGE_VARIANTS = {"prumerge": PruMerge, "prumerge_plus": PruMergePlus}


@pytest.mark.parametrize("method_name, index", settings_of("prumerge"))
def test_prumerge_keeps_and_answers_as_released(loaded_original, tiny_original, method_name, index):
    variant = fixture(method_name)["settings"][index]["options"]["variant"]
    method = PRUMERGE_VARIANTS[variant]()
    chosen: list[list[int]] = []
    choose = method.kept_patches

    def recording(cls_attn, count):
        kept = choose(cls_attn, count)
        chosen.append(kept.tolist())
        return kept

    method.kept_patches = recording
    model = loaded_original[1]

    def run_one(recorded, input_ids, pixels, new_tokens):
        chosen.clear()
        vision = method.encode_image(model, pixels)
        assert chosen == [recorded["kept_patches"]], recorded["question_id"]
        assert vision.features.shape[0] == recorded["vision_tokens"]
        tied = neighbour_ties(model, pixels, torch.tensor(chosen[0]), method.options.neighbours)
        assert_differences_are_ties(vision.features, recorded, tied, "a tie at the edge of their neighbours")
        ours = answer(loaded_original, input_ids, pixels, method, new_tokens)
        assert ours.stats["kv_cache_lengths"] == recorded["kv_lengths"], recorded["question_id"]
        return ours.token_ids

    compare(loaded_original, tiny_original, method_name, index, run_one)


def neighbour_ties(model, pixels: torch.Tensor, kept: torch.Tensor, neighbours: int) -> set[int]:
    """The kept tokens (their places among the vision tokens, CLS first where the select strategy keeps it)
    whose last chosen neighbour and first passed-over candidate have key similarities within COSINE_TIE: float
    rounding decides which of the two joins the token."""
    layers = model.model.vision_tower.encoder.layers
    selected = selected_layer_count(len(layers), model.config.vision_feature_layer)
    hidden = run_to_select_layer(model, pixels)[2]
    _, keys = cls_attention_and_keys(scoring_layer(layers, selected), hidden)
    unit = F.normalize(keys[0].float(), dim=-1)
    similarity = unit[kept] @ unit.T
    similarity[torch.arange(kept.numel()), kept] = float("-inf")
    ranked = similarity.sort(dim=-1, descending=True).values
    near = (ranked[:, neighbours - 1] - ranked[:, neighbours]) < COSINE_TIE
    offset = vision_token_offset(model.config)
    return {offset + token for token in near.nonzero().flatten().tolist()}


def contextual_ties(model, pixels: torch.Tensor, dominant: int, contextual: int) -> set[int]:
    """The contextual groups (0-based) that a token joins or could join by rounding alone: its two most
    key-similar targets are within COSINE_TIE of each other (the tiny tower gives flat image regions equal
    keys), so float summation order decides between them."""
    if contextual == 0:
        return set()
    layer, layer_input, hidden = run_to_select_layer(model, pixels)
    return tied_groups(zip_image(layer, layer_input, hidden, dominant, 0), contextual)


def tied_groups(zipped: ZippedImage, contextual: int) -> set[int]:
    """`contextual_ties` of one zipped tower image."""
    if contextual == 0:
        return set()
    keys = F.normalize(zipped.keys[zipped.rest].float(), dim=-1)
    targets = target_positions(keys.shape[0], contextual)
    members = torch.ones(keys.shape[0], dtype=torch.bool)
    members[targets] = False
    best = (keys[members] @ keys[targets].T).topk(2, dim=-1)
    near = (best.values[:, 0] - best.values[:, 1]) < COSINE_TIE
    return set(best.indices[near].flatten().tolist())


def assert_cache_lengths(ours: list[int], released: list[int], k: int) -> None:
    """Every layer's cache length as released, except layer k - 1, which the released code fills twice (it
    runs that layer a second time to read its attention, and both runs append): twice the prompt there."""
    assert released[k - 1] == 2 * ours[k - 1]
    assert ours[: k - 1] + ours[k:] == released[: k - 1] + released[k:]
