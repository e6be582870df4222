"""ToMe merges what its authors' released merge merges: a golden fixture from facebookresearch/ToMe.

ToMe's authors released no LLaVA code, so `tools/golden_tome.py` ran the stage that does run: LLaVA's own CLIP
tower (transformers 4.37, CPU, exact float32 weights) with every layer run by the release's `ToMeBlock` /
`ToMeAttention` forward and its `bipartite_soft_matching`, `merge_wavg` and `merge_source`, once, on the tiny
LLaVA-1.5 checkpoint over the demo questions' images, and wrote `tests/fixtures/golden_tome.json`. Here our
ToMe merges the same images at the same settings: every run layer must leave the same number of tokens, the
same patch groups after every layer (compared as sets: the release returns its tokens in its own order, ours
in the original order), the same size for each, and each token's feature (the select layer's output) the
same norm within NORM_TOLERANCE, matched by group, except from a layer where our matching was decided by
two cosine similarities within COSINE_TIE of each other (a numerical tie: the helper finds and names it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llava.drop.methods import tome as tome_module
from llava.drop.methods.tome import A_START, B_START, SET_STRIDE, ToMe, ToMeOptions, proportional_attention
from llava.drop.vision import CLS_INDEX, PATCHES_START, selected_layer_count
from llava.mm_utils import load_image, process_images
from tests.conftest import DEMO_IMAGE_FOLDER
from tests.test_golden_released import COSINE_TIE, check_checkpoint

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "golden_tome.json").read_text())
NORM_TOLERANCE = 1e-5  # relative, on the norms of the select layer's tokens, matched by patch group
PATCHES = 576
DIGEST_CHARS = 16  # tools/golden_tome.py's


def groups_digest(groups: list[list[int]]) -> str:
    """`tools/golden_tome.py`'s digest of a partition: the sorted patch groups, order-free."""
    return hashlib.sha256(json.dumps(sorted(groups)).encode()).hexdigest()[:DIGEST_CHARS]


def matching_tie(layer, hidden: torch.Tensor, sizes: torch.Tensor | None, r: int) -> str | None:
    """Where this layer's matching (of `hidden` [1, t, dim], `sizes`) hangs on a tie: the r-th and (r+1)-th
    best A tokens' scores, or a merging A token's two best B tokens, within COSINE_TIE. None: no tie."""
    _, metric = proportional_attention(layer.self_attn, layer.layer_norm1(hidden), sizes)
    normed = F.normalize(metric.float(), dim=-1)
    scores = normed[A_START::SET_STRIDE] @ normed[B_START::SET_STRIDE].T
    scores[CLS_INDEX] = float("-inf")
    best_two = scores.topk(2, dim=-1).values
    ranked = best_two[:, 0].sort(descending=True, stable=True)
    boundary = float(ranked.values[r - 1] - ranked.values[r])
    chosen = ranked.indices[:r]
    row_gaps = best_two[chosen, 0] - best_two[chosen, 1]
    ties = []
    if boundary <= COSINE_TIE:
        ties.append(f"the {r}th and {r + 1}th best A tokens score within {boundary:.1e}")
    if float(row_gaps.min()) <= COSINE_TIE:
        a_token = int(SET_STRIDE * chosen[row_gaps.argmin()] + A_START)
        ties.append(f"A token {a_token}'s two best B tokens score within {float(row_gaps.min()):.1e}")
    return "; ".join(ties) or None


class RecordingToMe(ToMe):
    """Our ToMe, keeping per run layer the tokens and the patch groups it leaves and whether its matching
    hung on a tie, and the select layer's tokens (CLS first) with their groups."""

    def reduce(self, model, images, counts, selecting):
        self.layers = []
        self.owner = torch.arange(PATCHES_START, PATCHES_START + PATCHES)
        self.reduced = super().reduce(model, images, counts, selecting)
        return self.reduced

    def see(self, layer, hidden, sizes, r, output) -> None:
        merged, _, destination, _ = output
        tie = matching_tie(layer, hidden, sizes, r) if r else None
        if destination is not None:
            self.owner = destination[self.owner]
        groups = tome_module.groups_of(self.owner, merged.shape[1])
        self.layers.append({"tokens": merged.shape[1], "groups": groups_digest(groups), "tie": tie})


@pytest.fixture
def recording(monkeypatch):
    """A RecordingToMe factory; tome's `merging_layer` reports each layer to the method that runs."""
    methods: list[RecordingToMe] = []
    merging_layer = tome_module.merging_layer

    def reporting(layer, hidden, sizes, r, selecting=None):
        output = merging_layer(layer, hidden, sizes, r, selecting)
        methods[-1].see(layer, hidden, sizes, r, output)
        return output

    monkeypatch.setattr(tome_module, "merging_layer", reporting)

    def make(options: ToMeOptions) -> RecordingToMe:
        methods.append(RecordingToMe(options))
        return methods[-1]

    return make


def first_differing_layer(ours: list[dict], recorded: dict) -> int | None:
    return next((index for index, (layer, digest) in enumerate(zip(ours, recorded["layer_groups"]))
                 if layer["groups"] != digest), None)


def compare_tokens(reduced, recorded: dict) -> None:
    """The select layer's groups, sizes and feature norms equal the release's, matched by group."""
    ours = {tuple(group): token for group, token in zip(reduced.patch_groups, reduced.hidden[PATCHES_START:])}
    assert sorted(ours) == sorted(map(tuple, recorded["groups"])), recorded["question_id"]
    assert recorded["sizes"] == [len(group) for group in recorded["groups"]]
    for group, norm in zip(recorded["groups"], recorded["feature_norms"]):
        mine = float(ours[tuple(group)].norm())
        assert abs(mine - norm) <= NORM_TOLERANCE * norm, (recorded["question_id"], group, mine, norm)


def test_fixture_records_the_release_and_the_checkpoint(tiny_original):
    check_checkpoint(tiny_original, GOLDEN["checkpoint"])
    assert GOLDEN["released"]["repository"] == "github.com/facebookresearch/ToMe"
    assert GOLDEN["released"]["commits"]["tome"] == "af95e4b1befa172dadccd8c81e223b10090f9579"
    assert [setting["options"] for setting in GOLDEN["settings"]] == [{"r": 8}, {"budget": 192}, {"budget": 128},
                                                                      {"budget": 64}]


@pytest.mark.parametrize("index", range(len(GOLDEN["settings"])))
def test_tome_merges_as_released(loaded_original, tiny_original, recording, index):
    check_checkpoint(tiny_original, GOLDEN["checkpoint"])
    _, model, image_processor, _ = loaded_original
    setting = GOLDEN["settings"][index]
    run = selected_layer_count(len(model.model.vision_tower.encoder.layers), model.config.vision_feature_layer)
    assert GOLDEN["select_layer"] == model.config.vision_feature_layer
    method = recording(ToMeOptions(**setting["options"]))
    count = setting["options"].get("budget")
    assert method.schedule(count, PATCHES, run, 1, count or 0) == setting["questions"][0]["schedule"]
    equal, ties = 0, []
    for recorded in setting["questions"]:
        pixels = process_images([load_image(DEMO_IMAGE_FOLDER / recorded["image"])], image_processor)
        method.encode_image(model, pixels)
        assert [layer["tokens"] for layer in method.layers] == recorded["layer_tokens"], recorded["question_id"]
        layer = first_differing_layer(method.layers, recorded)
        if layer is None:
            compare_tokens(method.reduced[0], recorded)
            equal += 1
            continue
        tie = method.layers[layer]["tie"]
        assert tie is not None, (f"{recorded['question_id']}: our merges part from the release's at run layer "
                                 f"{layer} with no cosine tie within {COSINE_TIE} there")
        ties.append(f"{recorded['question_id']}: layer {layer}: {tie}")
    print(f"tome {setting['options']}: groups, sizes and norms equal on {equal} of {len(setting['questions'])}; "
          f"parted at a numerical tie: {ties or 'none'}")
