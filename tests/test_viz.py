"""llava.viz: vision tokens mapped back to the patch grid per stage, and the picture-writing CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llava.drop.prefill import MultimodalPrompt, PrefillResult
from llava.drop.methods.mustdrop import merged_patch_groups, window_patches
from llava.drop.vision import VisionOutput
from llava.viz import group_outline, kept_patches_per_stage, main

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
