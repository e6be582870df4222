"""llava.viz: vision tokens mapped back to the patch grid per stage, and the picture-writing CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llava.drop.generate import encode_vision
from llava.drop.prefill import MultimodalPrompt, PrefillResult, build_prompt, prefill_prompt
from llava.drop.methods import METHODS, create_method
from llava.drop.methods.mustdrop import merged_patch_groups, window_patches
from llava.drop.methods.registry import discover_methods
from llava.drop.next_layout import crop_grid
from llava.drop.vision import VisionOutput, encode_next_image, flat_next_features
from llava.mm_utils import load_image
from llava.model.geometry import read_geometry
from llava.model.inputs import encode_question
from llava.viz import (
    BASE_IMAGE_LABEL,
    DIM_RGBA,
    NO_TOKEN,
    check_drawable,
    group_outline,
    kept_patches_per_stage,
    main,
    next_token_cells,
    no_token_runs,
    panels_figure,
    picture_grids,
    qwen_token_cells,
    trace_stages,
)
from tests.conftest import DEMO_IMAGE_FOLDER, NEXT_DEMO_IMAGES, next_demo_inputs

discover_methods()  # every registered method, for the parametrized tests below (METHODS fills on demand)

NUM_PATCHES = 576
GRID = 24
WINDOW = 3
SMALL_PATCHES = 16  # a 4 x 4 grid, small enough to follow compositions by hand
SYSTEM_TOKENS = 3
TEXT_TOKENS = 5
DIM = 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MUSTDROP_FILES = ["0_vision.png", "1_layer02.png", "2_layer06.png", "3_layer10.png", "4_layer14.png", "overview.png"]
DEMO_IMAGE = Path(__file__).resolve().parent.parent / "playground" / "data" / "eval" / "demo" / "images" / "175e99412607ad5f.png"


def _vision(count: int, groups: list[list[int]] | None = None, keys: list[int] | None = None) -> VisionOutput:
    key_indices = None if keys is None else torch.tensor(keys)
    return VisionOutput(torch.zeros(count, DIM), key_indices, {"vision_tokens_in": NUM_PATCHES}, groups)


def _prompt(vision_count: int) -> MultimodalPrompt:
    return MultimodalPrompt(torch.zeros(1, SYSTEM_TOKENS + vision_count + TEXT_TOKENS, DIM), SYSTEM_TOKENS,
                            vision_count)


def _keep(vision_kept: list[int], vision_count: int) -> torch.Tensor:
    """Sequence positions a drop keeps: system tokens, the given vision positions, then the text."""
    text_start = SYSTEM_TOKENS + vision_count
    return torch.tensor([*range(SYSTEM_TOKENS), *(SYSTEM_TOKENS + v for v in vision_kept),
                         *range(text_start, text_start + TEXT_TOKENS)])


def _mask(patches: list[int], num_patches: int = NUM_PATCHES) -> np.ndarray:
    mask = np.zeros(num_patches, dtype=bool)
    mask[patches] = True
    return mask


def test_identity_mapping() -> None:
    kept = [0, 17, 300, 575]
    result = PrefillResult(drops=[(2, _keep(kept, NUM_PATCHES))])
    stages = kept_patches_per_stage(_vision(NUM_PATCHES, keys=[17]), result, _prompt(NUM_PATCHES))
    assert [s.name for s in stages] == ["vision stage", "after layer 2"]
    assert [s.file_stem for s in stages] == ["0_vision", "1_layer02"]
    assert stages[0].kept.all() and stages[0].tokens_kept == NUM_PATCHES
    assert np.array_equal(stages[1].kept, _mask(kept))
    assert np.array_equal(stages[1].keys, _mask([17]))
    assert stages[1].tokens_kept == len(kept) and stages[1].tokens_in == NUM_PATCHES
    assert stages[1].merged == []


def test_merged_window_mapping() -> None:
    groups = merged_patch_groups([5, 0], NUM_PATCHES, WINDOW)  # token 0: window 5, token 1: window 0
    count = len(groups)
    assert count == NUM_PATCHES - 2 * (WINDOW * WINDOW - 1)
    result = PrefillResult(drops=[(2, _keep([0, 2, 10], count))])
    stages = kept_patches_per_stage(_vision(count, groups, keys=[2]), result, _prompt(count))
    vision, layer = stages
    assert vision.kept.all() and vision.tokens_kept == count
    assert vision.merged == [window_patches(5, GRID, WINDOW), window_patches(0, GRID, WINDOW)]
    # Unmerged patches follow in grid order: row 0 from column 3 on (columns 0-2 are window 0).
    assert groups[2] == [3] and groups[10] == [11]
    assert np.array_equal(layer.kept, _mask(window_patches(5, GRID, WINDOW) + [3, 11]))
    assert layer.merged == [window_patches(5, GRID, WINDOW)]
    assert np.array_equal(layer.keys, _mask([3]))


def test_two_drops_compose() -> None:
    result = PrefillResult(drops=[(2, _keep([1, 3, 5, 7, 9], SMALL_PATCHES)),
                                                  (6, _keep([0, 3], 5))])
    stages = kept_patches_per_stage(_vision(SMALL_PATCHES, keys=[7]), result, _prompt(SMALL_PATCHES),
                                    num_patches=SMALL_PATCHES)
    assert [s.file_stem for s in stages] == ["0_vision", "1_layer02", "2_layer06"]
    assert np.array_equal(stages[1].kept, _mask([1, 3, 5, 7, 9], SMALL_PATCHES))
    assert np.array_equal(stages[2].kept, _mask([1, 7], SMALL_PATCHES))
    assert np.array_equal(stages[2].keys, _mask([7], SMALL_PATCHES))
    assert [s.tokens_kept for s in stages] == [SMALL_PATCHES, 5, 2]


def test_fewer_tokens_without_groups_is_unknown() -> None:
    count = 64
    result = PrefillResult(drops=[(2, _keep([0, 1], count))])
    stages = kept_patches_per_stage(_vision(count), result, _prompt(count))
    assert [s.kept for s in stages] == [None, None] and [s.keys for s in stages] == [None, None]
    assert [s.tokens_kept for s in stages] == [count, 2]


def test_group_count_must_match_tokens() -> None:
    vision = _vision(10, groups=[[p] for p in range(9)])
    with pytest.raises(ValueError, match="9 patch groups for 10 vision tokens"):
        kept_patches_per_stage(vision, PrefillResult(), _prompt(10))


def test_outline_traces_the_group_boundary() -> None:
    assert len(group_outline([0], GRID)) == 4
    window = group_outline(window_patches(9, GRID, WINDOW), GRID)
    assert len(window) == 4 * WINDOW
    assert ((3, 3), (4, 3)) in window and ((6, 6), (6, 5)) not in window


def test_cli_writes_one_png_per_stage(tiny_original: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_dir = tmp_path / "viz"
    main(["--model-path", str(tiny_original), "--image", str(DEMO_IMAGE), "--question", "What is this?",
          "--method-args", "global_thr=0.011,individual_thr=0.01", "--out-dir", str(out_dir), "--device", "cpu"])
    assert sorted(path.name for path in out_dir.iterdir()) == MUSTDROP_FILES
    assert all((out_dir / name).read_bytes().startswith(PNG_SIGNATURE) for name in MUSTDROP_FILES)
    assert capsys.readouterr().out.split() == [str(out_dir / name) for name in MUSTDROP_FILES]


@pytest.mark.parametrize("extra, message", [
    (["--image", "missing.png"], "error: image not found: missing.png"),
    (["--image", str(DEMO_IMAGE), "--method", "nope"], "error: unknown method 'nope'"),
    (["--image", str(DEMO_IMAGE), "--method-args", "bogus=1"], "error: unknown option(s) bogus"),
    (["--image", str(DEMO_IMAGE), "--conv-mode", "nope"], "error: unknown conversation mode 'nope'"),
])
def test_cli_errors_are_one_line(tmp_path: Path, extra: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--model-path", str(tmp_path), "--question", "q", "--out-dir", str(tmp_path / "viz"), *extra])
    assert str(exit_info.value.code).startswith(message)
    assert "\n" not in str(exit_info.value.code)
    assert not (tmp_path / "viz").exists()


# ---------------------------------------------------------------- LLaVA-NeXT

NEXT_GRIDS = {"tall": (2, 1), "square": (2, 2), "wide": (1, 2)}  # crop rows x crop columns
UNPADDED_ROWS = {"tall": (4, 44), "square": (0, 48), "wide": (4, 20)}  # the crop grid rows the model keeps
NEXT_PATCHES = GRID * GRID


@torch.no_grad()
def _cell_of_each_token(model, inputs, features: torch.Tensor) -> list[int | None]:
    """For each packed vision token, the tower image i and patch p whose projected feature it is, as the cell
    i * P + p (None: the model's newline embedding), found by matching features, not by any layout rule."""
    weight = model.model.vision_tower.embeddings.patch_embedding.weight
    flat = flat_next_features(model, inputs.pixel_values[0].to(weight)).flatten(0, 1)
    newline = model.model.image_newline.to(features)
    cells = []
    for token in features:
        if torch.equal(token, newline):
            cells.append(None)
            continue
        distances = (flat - token).norm(dim=-1)
        cells.append(int(distances.argmin()))
        assert float(distances.min()) < 1e-4 * float(token.norm())
    return cells


@pytest.mark.parametrize("shape", NEXT_DEMO_IMAGES)
@pytest.mark.parametrize("layout", ["spatial_unpad", "flat"])
def test_next_token_cells_are_where_the_model_packs_each_token(loaded_next_original, monkeypatch, shape, layout):
    _, model, _, _ = loaded_next_original
    monkeypatch.setattr(model.config, "mm_patch_merge_type", layout)
    inputs = next_demo_inputs(loaded_next_original, NEXT_DEMO_IMAGES[shape])
    features = encode_next_image(model, inputs.pixel_values, inputs.image_sizes).features
    grid = crop_grid(model.config, inputs.image_sizes[0].tolist())
    assert (grid.crops_high, grid.crops_wide) == NEXT_GRIDS[shape]
    cells = next_token_cells(model.config, grid, inputs.pixel_values.shape[1])
    expected = _cell_of_each_token(model, inputs, features)
    assert [group[0] if group else None for group in cells.groups] == expected
    assert all(len(group) <= 1 for group in cells.groups)
    assert cells.newlines == {token for token, cell in enumerate(expected) if cell is None}
    rows = UNPADDED_ROWS[shape][1] - UNPADDED_ROWS[shape][0]
    assert len(cells.newlines) == (rows if layout == "spatial_unpad" else 0)


@pytest.mark.parametrize("shape", NEXT_DEMO_IMAGES)
def test_the_crop_picture_places_each_cell_where_its_crop_patch_is(loaded_next_original, shape):
    tokenizer, model, image_processor, _ = loaded_next_original
    inputs = next_demo_inputs(loaded_next_original, NEXT_DEMO_IMAGES[shape])
    base, crops = picture_grids(model, image_processor, inputs.pixel_values, inputs.image_sizes)
    high, wide = NEXT_GRIDS[shape]
    assert base.label == BASE_IMAGE_LABEL and np.array_equal(base.cells, np.arange(NEXT_PATCHES).reshape(GRID, GRID))
    assert crops.cells.shape == (high * GRID, wide * GRID) and crops.tile == GRID
    assert crops.image.shape[:2] == (high * inputs.pixel_values.shape[-2], wide * inputs.pixel_values.shape[-1])
    # patch (r, c) of crop k (crops row-major) is at row (k // wide) * 24 + r, column (k % wide) * 24 + c
    for crop in range(high * wide):
        for row, col in ((0, 0), (5, 17), (GRID - 1, GRID - 1)):
            place = ((crop // wide) * GRID + row, (crop % wide) * GRID + col)
            cell = crops.cells[place]
            assert cell == NO_TOKEN or cell == (1 + crop) * NEXT_PATCHES + row * GRID + col
    # the places that are no token are the rows the model unpads, whole rows for these images
    first, last = UNPADDED_ROWS[shape]
    tokens = crops.cells != NO_TOKEN
    assert tokens[first:last].all() and not tokens[:first].any() and not tokens[last:].any()
    assert no_token_runs(tokens) == [(row, 0, wide * GRID) for row in [*range(first), *range(last, high * GRID)]]


def test_fastv_on_next_is_traced_onto_the_base_image_and_the_crops(loaded_next_original):
    tokenizer, model, image_processor, _ = loaded_next_original
    inputs = next_demo_inputs(loaded_next_original, NEXT_DEMO_IMAGES["tall"])
    method = create_method("fastv", {"budget": "400"})
    stages = trace_stages(model, method, inputs.input_ids, inputs.pixel_values, inputs.image_sizes)
    vision, dropped = stages
    total = NEXT_PATCHES + 40 * (GRID + 1)  # base image, 40 unpadded rows of 24 patches and a newline each
    assert (vision.tokens_kept, vision.tokens_in, vision.newlines_kept, vision.newlines_in) == (total, total, 40, 40)
    grids = picture_grids(model, image_processor, inputs.pixel_values, inputs.image_sizes)
    shown = np.concatenate([grid.cells[grid.cells != NO_TOKEN] for grid in grids])
    assert np.array_equal(np.sort(shown), np.flatnonzero(vision.kept))  # every token's cell is on a picture
    assert dropped.name == "after layer 1" and dropped.tokens_kept < total
    # each kept token but a newline stands for one cell of its own
    assert int(dropped.kept.sum()) == dropped.tokens_kept - dropped.newlines_kept
    assert 0 < dropped.newlines_kept < 40
    figure = panels_figure(grids, stages, method.name)
    assert len(figure.axes) == 2 * len(stages)
    assert [ax.get_ylabel() for ax in figure.axes] == [BASE_IMAGE_LABEL] * 2 + ["crops (2 x 1 grid, unpadded)"] * 2
    assert figure.axes[3].get_title() == f"newline tokens: {dropped.newlines_kept} of 40 kept"


def _registered(name: str):
    options = {"budget": "400"} if name in ("fastv", "pdrop", "sparsevlm", "visionzip", "random", "pool") else {}
    return create_method(name, options)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_on_next_only_methods_that_keep_the_models_own_tokens_are_drawn(tiny_next_original, tiny_original, name):
    method = _registered(name)
    check_drawable(method, read_geometry(str(tiny_original)))  # every method is drawn on LLaVA-1.5
    if not method.has_own_vision_stage:
        check_drawable(method, read_geometry(str(tiny_next_original)))
        return
    with pytest.raises(ValueError) as refused:
        check_drawable(method, read_geometry(str(tiny_next_original)))
    assert str(refused.value) == (
        f"--method {name}: llava.viz cannot draw it on LLaVA-NeXT: its vision stage changes the base image's and "
        "crops' tokens without reporting which patches each one stands for there; draw fastv, none, pdrop, "
        f"sparsevlm on this checkpoint, or {name} on a LLaVA-1.5 checkpoint")


def test_cli_draws_next_in_two_rows_and_refuses_mustdrop_before_loading(tiny_next_original, tmp_path, monkeypatch,
                                                                       capsys):
    argv = ["--model-path", str(tiny_next_original), "--image", str(DEMO_IMAGE), "--question", "What is this?",
            "--device", "cpu"]
    main([*argv, "--method", "fastv", "--method-args", "budget=400", "--out-dir", str(tmp_path / "fastv")])
    written = ["0_vision.png", "1_layer01.png", "overview.png"]
    assert sorted(path.name for path in (tmp_path / "fastv").iterdir()) == written
    assert all((tmp_path / "fastv" / name).read_bytes().startswith(PNG_SIGNATURE) for name in written)
    assert capsys.readouterr().out.split() == [str(tmp_path / "fastv" / name) for name in written]

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded although the method could be refused before")

    monkeypatch.setattr("llava.viz.load_pretrained_model", forbidden)
    with pytest.raises(SystemExit) as stopped:
        main([*argv, "--out-dir", str(tmp_path / "mustdrop")])  # mustdrop is the default method
    assert str(stopped.value.code).startswith("error: --method mustdrop: llava.viz cannot draw it on LLaVA-NeXT")
    assert "\n" not in str(stopped.value.code)
    assert not (tmp_path / "mustdrop").exists()


def test_trace_stages_refuses_a_next_method_it_cannot_place(loaded_next_original):
    _, model, _, _ = loaded_next_original
    inputs = next_demo_inputs(loaded_next_original, NEXT_DEMO_IMAGES["wide"])
    with pytest.raises(ValueError, match="--method visionzip: llava.viz cannot draw it on LLaVA-NeXT"):
        trace_stages(model, _registered("visionzip"), inputs.input_ids, inputs.pixel_values, inputs.image_sizes)


# ---------------------------------------------------------------- Qwen2.5-VL / Qwen2-VL

QWEN_GRIDS = {"tall": (11, 6), "square": (14, 14), "wide": (6, 18)}  # token rows x columns of the tiny checkpoints
QWEN_TOKEN_PX = 28  # one decoder token: 2 x 2 patches of 14 px
QWEN_DRAWN = "draw fastv, none, pdrop, pool, random, sparsevlm, visionzip, or mustdrop with --method-args vision_merge=false"
QWEN_MUSTDROP_ARGS = {"vision_merge": "false", "global_thr": "0.02", "individual_thr": "0.05"}


@pytest.fixture(params=["qwen2_5_vl", "qwen2_vl"])
def loaded_any_qwen(request):
    return request.getfixturevalue("loaded_qwen" if request.param == "qwen2_5_vl" else "loaded_qwen2")


def _qwen_inputs(loaded, shape: str):
    tokenizer, model, image_processor, _ = loaded
    image = load_image(DEMO_IMAGE_FOLDER / NEXT_DEMO_IMAGES[shape])
    return image, encode_question("What is written here?", image, model, tokenizer, image_processor, "qwen")


def _kept_cells(model, vision: VisionOutput, drops, vision_start: int) -> list[set[int]]:
    """After each drop, the cells (row * columns + column, from the tokens' own positions) of the vision tokens
    still in the sequence, followed through the drops' keep lists directly."""
    columns = int(vision.positions[2].max()) + 1
    cells = (vision.positions[1] * columns + vision.positions[2]).tolist()
    alive, kept = list(range(len(cells))), []
    for _, keep in drops:
        alive = [alive[place - vision_start] for place in keep.tolist() if vision_start <= place < vision_start + len(alive)]
        kept.append({cells[token] for token in alive})
    return kept


@pytest.mark.parametrize("shape", NEXT_DEMO_IMAGES)
def test_qwen_token_cells_follow_the_tokens_positions(loaded_any_qwen, shape):
    """Each vision token is drawn in the cell of its own (row, column) position on a grid of h/2 x w/2 tokens,
    over the image as the processor resized it (smart_resize, bicubic: the pixels the tower saw)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    _, model, image_processor, _ = loaded_any_qwen
    image, inputs = _qwen_inputs(loaded_any_qwen, shape)
    vision = encode_vision(model, create_method("none"), inputs.pixel_values, inputs.image_sizes)
    cells = qwen_token_cells(model, vision, inputs.image_sizes)
    (picture,) = picture_grids(model, image_processor, inputs.pixel_values, inputs.image_sizes)
    rows, columns = QWEN_GRIDS[shape]
    _, h, w = inputs.image_sizes[0].tolist()
    assert (rows, columns) == (h // 2, w // 2) and picture.cells.shape == (rows, columns)
    assert cells.num_cells == rows * columns and len(cells.groups) == vision.features.shape[0] == rows * columns
    t, row, column = vision.positions.tolist()
    assert set(t) == {0}
    for token, group in enumerate(cells.groups):
        assert group == [int(picture.cells[row[token], column[token]])]
    assert sorted(group[0] for group in cells.groups) == list(range(rows * columns))  # every cell, once
    height, width = smart_resize(image.height, image.width, QWEN_TOKEN_PX, image_processor.size["shortest_edge"],
                                 image_processor.size["longest_edge"])
    assert picture.image.shape == (rows * QWEN_TOKEN_PX, columns * QWEN_TOKEN_PX, 3) == (height, width, 3)
    resized = np.asarray(image.resize((width, height), resample=3), dtype=np.float32) / 255  # 3: bicubic
    np.testing.assert_allclose(picture.image, resized, atol=1e-5)
    assert picture.label == "" and picture.cell_name == "token"
    assert picture.caption == (f"as resized for the model: {width} x {height} px, {rows} x {columns} tokens of "
                               f"{QWEN_TOKEN_PX} x {QWEN_TOKEN_PX} px")


@pytest.mark.parametrize("name, args", [("fastv", {"budget": "24"}), ("mustdrop", QWEN_MUSTDROP_ARGS)])
@pytest.mark.parametrize("shape", ["tall", "wide"])
def test_a_qwen_picture_shades_what_the_prefill_dropped(loaded_qwen, shape, name, args):
    """Each stage's kept cells are exactly the cells of the tokens the prefill kept, on a non-square grid; MustDrop
    without its vision stage keeps no key set."""
    _, model, image_processor, _ = loaded_qwen
    _, inputs = _qwen_inputs(loaded_qwen, shape)
    method = create_method(name, args)
    stages = trace_stages(model, method, inputs.input_ids, inputs.pixel_values, inputs.image_sizes)
    vision = encode_vision(model, create_method(name, args), inputs.pixel_values, inputs.image_sizes)
    prompt = build_prompt(model, inputs.input_ids, vision)
    prefilled = prefill_prompt(model, prompt, create_method(name, args))
    expected = _kept_cells(model, vision, prefilled.drops, prompt.vision_start)
    layers = [layer for layer, _ in prefilled.drops]
    assert [stage.name for stage in stages] == ["vision stage", *(f"after layer {layer}" for layer in layers)]
    assert stages[0].kept.all() and stages[0].tokens_kept == stages[0].tokens_in == prompt.vision_count
    assert len(stages) > 1 and stages[-1].tokens_kept < prompt.vision_count
    for stage, cells in zip(stages[1:], expected):
        assert set(np.flatnonzero(stage.kept).tolist()) == cells and stage.tokens_kept == len(cells)
        assert stage.key_groups == [] and stage.merged == []
    (picture,) = picture_grids(model, image_processor, inputs.pixel_values, inputs.image_sizes)
    figure = panels_figure([picture], stages, method.name)
    assert len(figure.axes) == len(stages)
    last = figure.axes[-1]
    assert last.get_title() == f"{name}: {stages[-1].name}\n{stages[-1].tokens_kept} of {prompt.vision_count} vision tokens kept"
    overlay = last.get_images()[1].get_array()  # [rows, columns, 4]: the dropped tokens shaded
    assert overlay.shape[:2] == QWEN_GRIDS[shape]
    shaded = np.all(np.isclose(overlay, DIM_RGBA), axis=-1)
    assert np.array_equal(~shaded, stages[-1].kept[picture.cells])
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert labels == ["kept token (clear)", "dropped token (shaded blue)"]


def test_cli_draws_fastv_on_qwen(tiny_qwen, tmp_path, capsys):
    """No --conv-mode: the Qwen checkpoint's own template; a picture per stage and the overview."""
    out_dir = tmp_path / "fastv"
    main(["--model-path", str(tiny_qwen), "--image", str(DEMO_IMAGE), "--question", "What is this?",
          "--method", "fastv", "--method-args", "budget=24", "--out-dir", str(out_dir), "--device", "cpu"])
    written = ["0_vision.png", "1_layer01.png", "overview.png"]
    assert sorted(path.name for path in out_dir.iterdir()) == written
    assert all((out_dir / name).read_bytes().startswith(PNG_SIGNATURE) for name in written)
    assert capsys.readouterr().out.split() == [str(out_dir / name) for name in written]


@pytest.mark.parametrize("extra, message", [
    (["--method", "tome"], "error: --method tome: llava.viz cannot draw it on Qwen2-VL / Qwen2.5-VL: "
                           "its vision stage reads CLIP's CLS token"),
    ([], "error: --method mustdrop: llava.viz cannot draw it on Qwen2-VL / Qwen2.5-VL"),  # mustdrop by default
    (["--method-args", "global_thr=0.01"], "error: --method mustdrop: llava.viz cannot draw it on Qwen2-VL"),
    (["--method", "fastv", "--conv-mode", "vicuna_v1"], "error: --conv-mode vicuna_v1 is a LLaVA template"),
])
def test_qwen_refusals_come_before_the_model_loads(tiny_qwen, tmp_path, monkeypatch, extra, message):
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded although the method could be refused before")

    monkeypatch.setattr("llava.viz.load_pretrained_model", forbidden)
    out_dir = tmp_path / "viz"
    with pytest.raises(SystemExit) as stopped:
        main(["--model-path", str(tiny_qwen), "--image", str(DEMO_IMAGE), "--question", "q", "--device", "cpu",
              "--out-dir", str(out_dir), *extra])
    refusal = str(stopped.value.code)
    assert refusal.startswith(message) and "\n" not in refusal
    if "--method" in refusal:
        assert refusal.endswith(f"{QWEN_DRAWN} (its stages 2 and 3, no key set) on this checkpoint")
    assert not out_dir.exists()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_on_qwen_only_the_methods_that_run_there_are_drawn(tiny_qwen, name):
    method = create_method(name)
    geometry = read_geometry(str(tiny_qwen))
    if method.runs_on_qwen:
        check_drawable(method, geometry)
        return
    with pytest.raises(ValueError, match=f"^--method {name}: llava.viz cannot draw it on Qwen2-VL / Qwen2.5-VL"):
        check_drawable(method, geometry)
    check_drawable(create_method("mustdrop", {"vision_merge": "false"}), geometry)
