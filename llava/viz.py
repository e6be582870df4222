"""Pictures of what a token-dropping method keeps: one panel per stage, on the image the model saw.

    python -m llava.viz --model-path M --image IMG --question Q [--method mustdrop] [--method-args k=v,...]
        [--conv-mode vicuna_v1] [--out-dir viz/] [--device cpu] [--dtype fp32]

Runs the vision stage and the prefill once (no decoding) and writes `0_vision.png`, one
`K_layerLL.png` per dropping layer and `overview.png` with every panel side by side.

How tokens map back to the image: `VisionOutput.patch_groups` says which patches of the 24 x 24 grid
each vision token stands for (a MustDrop merged token covers its 3 x 3 window); without groups, token
i is patch i when the count matches, and the mapping is drawn as unknown otherwise. Each prefill drop
lists the sequence positions it keeps in the sequence as it was then, so composing the vision part of
the successive keep lists gives the original vision tokens that survive each dropping layer.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from llava.conversation import get_conv_template
from llava.drop.prefill import MultimodalPrompt, PrefillResult, build_prompt, prefill_prompt
from llava.drop.methods import DropMethod, create_method, parse_method_args
from llava.drop.vision import VisionOutput
from llava.eval.cli_errors import RunError, interruptible, main_guard, refuse_non_finite_options
from llava.mm_utils import load_image
from llava.model.builder import check_device, default_device, load_pretrained_model
from llava.model.geometry import geometry_of_model
from llava.model.inputs import encode_question
from llava.output_paths import check_output_folder

NUM_PATCHES = 576  # LLaVA-1.5's 24 x 24 grid
DEFAULT_METHOD = "mustdrop"
DEFAULT_CONV_MODE = "vicuna_v1"
DEFAULT_OUT_DIR = "viz"
VISION_STAGE = "vision stage"
VISION_STEM = "0_vision"
OVERVIEW_STEM = "overview"
PANEL_INCHES = 4.6
TITLE_INCHES = 0.6  # room above the image for the two-line title
LEGEND_INCHES = 0.7
DPI = 110
# Dropped patches: shaded dark blue, not grey, so that they stand apart from LLaVA's pad-to-square margin,
# which is CLIP's mean colour (a warm grey) and is often dropped too.
DIM_RGBA = (0.05, 0.07, 0.3, 0.78)
GRID_LINE = {"color": "white", "linewidth": 0.3, "alpha": 0.35}
MERGED_COLOUR = "#ff9f1c"
MERGED_LINE_WIDTH = 1.6
KEY_COLOUR = "#e71d36"
KEY_DOT_SIZE = 22
UNKNOWN_TEXT = "token-to-patch mapping unknown\n(the method reports no patch groups)"


@dataclass
class StageView:
    """What survives one stage, on the patch grid. Masks are None when the mapping is unknown."""

    name: str  # "vision stage" or "after layer L"
    file_stem: str  # "0_vision", "1_layer02", ...
    tokens_kept: int
    tokens_in: int  # vision tokens before any dropping (the unpruned model's count)
    kept: np.ndarray | None  # [num_patches] bool: patches behind a surviving token
    key_groups: list[list[int]]  # patches behind each surviving key-set token
    merged: list[list[int]]  # patches behind each surviving token that stands for several (outlined)

    @property
    def keys(self) -> np.ndarray | None:
        """[num_patches] bool: patches behind a surviving key-set token."""
        if self.kept is None:
            return None
        return patch_mask(self.key_groups, self.kept.size)


def patch_mask(groups: Sequence[Sequence[int]], num_patches: int) -> np.ndarray:
    mask = np.zeros(num_patches, dtype=bool)
    for group in groups:
        mask[list(group)] = True
    return mask


def token_patch_groups(vision: VisionOutput, num_patches: int) -> list[list[int]] | None:
    """Patches behind each vision token; identity when one token per patch; None when unknown."""
    if vision.patch_groups is not None:
        return vision.patch_groups
    if vision.features.shape[0] == num_patches:
        return [[patch] for patch in range(num_patches)]
    return None


def surviving_tokens(drops: Sequence[tuple[int, torch.Tensor]], vision_start: int,
                     vision_count: int) -> list[tuple[int, np.ndarray]]:
    """(layer, original vision-token indices still present) after each drop.

    Each keep list indexes the sequence as it was before that drop: system tokens, then the vision
    tokens alive so far, then text; its vision part picks among the alive tokens.
    """
    alive = np.arange(vision_count)
    survivors = []
    for layer, keep in drops:
        keep = keep.detach().cpu().numpy()
        in_vision = (keep >= vision_start) & (keep < vision_start + alive.size)
        alive = alive[keep[in_vision] - vision_start]
        survivors.append((layer, alive))
    return survivors


def stage_view(name: str, file_stem: str, alive: np.ndarray, groups: list[list[int]] | None,
               key_tokens: set[int], num_patches: int, tokens_in: int) -> StageView:
    """One stage's masks from the original vision tokens still present."""
    if groups is None:
        return StageView(name, file_stem, alive.size, tokens_in, None, [], [])
    alive_groups = [groups[token] for token in alive.tolist()]
    key_groups = [groups[token] for token in alive.tolist() if token in key_tokens]
    return StageView(name, file_stem, alive.size, tokens_in, patch_mask(alive_groups, num_patches), key_groups,
                     [group for group in alive_groups if len(group) > 1])


def kept_patches_per_stage(vision: VisionOutput, prefilled: PrefillResult, prompt: MultimodalPrompt,
                           num_patches: int = NUM_PATCHES) -> list[StageView]:
    """The vision stage's view, then one per prefill drop, each mapped onto the patch grid."""
    groups = token_patch_groups(vision, num_patches)
    if groups is not None and len(groups) != prompt.vision_count:
        raise ValueError(f"{len(groups)} patch groups for {prompt.vision_count} vision tokens")
    key_tokens = set() if vision.key_indices is None else set(vision.key_indices.tolist())
    tokens_in = vision.stats.get("vision_tokens_in", prompt.vision_count)
    views = [stage_view(VISION_STAGE, VISION_STEM, np.arange(prompt.vision_count), groups, key_tokens,
                        num_patches, tokens_in)]
    survivors = surviving_tokens(prefilled.drops, prompt.vision_start, prompt.vision_count)
    for step, (layer, alive) in enumerate(survivors, start=1):
        views.append(stage_view(f"after layer {layer}", f"{step}_layer{layer:02d}", alive, groups, key_tokens,
                                num_patches, tokens_in))
    return views


def model_view_image(pixel_values: torch.Tensor, image_processor) -> np.ndarray:
    """The padded, resized image the tower saw, [side, side, 3] in 0..1 (normalisation undone)."""
    mean = torch.tensor(image_processor.image_mean)[:, None, None]
    std = torch.tensor(image_processor.image_std)[:, None, None]
    pixels = pixel_values[0].detach().float().cpu() * std + mean
    return pixels.clamp(0, 1).permute(1, 2, 0).numpy()


def group_outline(group: Sequence[int], grid: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Edges (in patch units, x right, y down) between the group's patches and the patches outside it."""
    members = set(group)
    edges = []
    for patch in group:
        row, col = divmod(patch, grid)
        sides = {(row - 1, col): ((col, row), (col + 1, row)), (row + 1, col): ((col, row + 1), (col + 1, row + 1)),
                 (row, col - 1): ((col, row), (col, row + 1)), (row, col + 1): ((col + 1, row), (col + 1, row + 1))}
        for (n_row, n_col), edge in sides.items():
            if not (0 <= n_row < grid and 0 <= n_col < grid) or n_row * grid + n_col not in members:
                edges.append(edge)
    return edges


def draw_stage(ax, image: np.ndarray, stage: StageView, method: str) -> None:
    """The image on its patch grid: dropped patches shaded, merged tokens outlined, key tokens dotted."""
    grid = math.isqrt(NUM_PATCHES if stage.kept is None else stage.kept.size)
    extent = (0, grid, grid, 0)
    ax.imshow(image, extent=extent)
    ax.set_title(f"{method}: {stage.name}\n{stage.tokens_kept} of {stage.tokens_in} vision tokens kept", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    if stage.kept is None:
        ax.text(grid / 2, grid / 2, UNKNOWN_TEXT, ha="center", va="center", fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.85})
        return
    overlay = np.zeros((grid, grid, 4))
    overlay[~stage.kept.reshape(grid, grid)] = DIM_RGBA
    ax.imshow(overlay, extent=extent, interpolation="nearest")
    for line in range(1, grid):
        ax.axhline(line, **GRID_LINE)
        ax.axvline(line, **GRID_LINE)
    edges = [edge for group in stage.merged for edge in group_outline(group, grid)]
    ax.add_collection(LineCollection(edges, colors=MERGED_COLOUR, linewidths=MERGED_LINE_WIDTH))
    if stage.key_groups:
        centres = np.array([[np.mean([p % grid for p in g]) + 0.5, np.mean([p // grid for p in g]) + 0.5]
                            for g in stage.key_groups])
        ax.scatter(centres[:, 0], centres[:, 1], s=KEY_DOT_SIZE, c=KEY_COLOUR, edgecolors="white", linewidths=0.6)
    ax.set_xlim(0, grid)
    ax.set_ylim(grid, 0)


def legend_handles(stages: Sequence[StageView]) -> list:
    """Legend entries for what the panels show; none where no panel maps tokens to patches."""
    if all(stage.kept is None for stage in stages):
        return []
    handles = [Patch(facecolor="none", edgecolor="black", label="kept patch (clear)"),
               Patch(facecolor=DIM_RGBA, label="dropped patch (shaded blue)")]
    if any(stage.merged for stage in stages):
        handles.append(Patch(facecolor="none", edgecolor=MERGED_COLOUR, linewidth=MERGED_LINE_WIDTH,
                             label="merged window (one token)"))
    if any(stage.key_groups for stage in stages):
        handles.append(Line2D([], [], linestyle="none", marker="o", markerfacecolor=KEY_COLOUR,
                              markeredgecolor="white", label="key-set token (never dropped)"))
    return handles


def panels_figure(image: np.ndarray, stages: Sequence[StageView], method: str) -> Figure:
    """One figure with the stages side by side and a shared legend underneath."""
    width = PANEL_INCHES * len(stages)
    height = PANEL_INCHES + TITLE_INCHES + LEGEND_INCHES
    figure = Figure(figsize=(width, height), dpi=DPI)
    bottom = LEGEND_INCHES / height
    axes = figure.subplots(1, len(stages), squeeze=False)[0]
    figure.subplots_adjust(left=0.02, right=0.98, bottom=bottom, top=1 - TITLE_INCHES / height, wspace=0.05)
    for ax, stage in zip(axes, stages):
        draw_stage(ax, image, stage, method)
    handles = legend_handles(stages)
    if handles:
        legend_columns = len(handles) if len(stages) > 1 else 2
        figure.legend(handles=handles, loc="lower center", ncol=legend_columns, fontsize=8, frameon=False)
    return figure


def save_figures(image: np.ndarray, stages: Sequence[StageView], method: str, out_dir: Path) -> list[Path]:
    """One PNG per stage and an overview with all of them; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    panels = {stage.file_stem: [stage] for stage in stages} | {OVERVIEW_STEM: list(stages)}
    paths = []
    for stem, shown in panels.items():
        paths.append(out_dir / f"{stem}.png")
        panels_figure(image, shown, method).savefig(paths[-1])
    return paths


@torch.inference_mode()
def trace_stages(model, method: DropMethod, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> list[StageView]:
    """Vision stage and prefill once, as `generate` runs them, mapped onto the patch grid."""
    method.check_model(geometry_of_model(model))
    vision = method.encode_image(model, pixel_values)
    prompt = build_prompt(model, input_ids, vision)
    prefilled = prefill_prompt(model, prompt, method)
    vision_config = model.config.vision_config
    num_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return kept_patches_per_stage(vision, prefilled, prompt, num_patches)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", type=str, required=True)
    parser.add_argument("--image", type=str, required=True)
    parser.add_argument("--question", type=str, required=True)
    parser.add_argument("--method", type=str, default=DEFAULT_METHOD, help="a registered method (see llava/drop/methods)")
    parser.add_argument("--method-args", type=str, default="", help="the method's options as key=value,key=value")
    parser.add_argument("--conv-mode", type=str, default=DEFAULT_CONV_MODE)
    parser.add_argument("--out-dir", type=str, default=DEFAULT_OUT_DIR)
    parser.add_argument("--device", type=str, default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", type=str, default=None, help="fp32, fp16 or bf16 (default: fp16 on cuda, fp32 on cpu)")
    return parser


def run(args: argparse.Namespace) -> list[Path]:
    """Check the method, template and image first (fast failures), then load, trace and draw."""
    try:
        check_output_folder(args.out_dir, "--out-dir")
        check_device(args.device or default_device())
        method_args = parse_method_args(args.method_args)
        refuse_non_finite_options(method_args)
        method = create_method(args.method, method_args)
        get_conv_template(args.conv_mode)
        image = load_image(args.image)
        tokenizer, model, image_processor, _ = load_pretrained_model(args.model_path, device=args.device,
                                                                     torch_dtype=args.dtype)
        inputs = encode_question(args.question, image, model, tokenizer, image_processor, args.conv_mode)
        stages = trace_stages(model, method, inputs.input_ids, inputs.pixel_values)
    except ValueError as error:  # bad inputs, checkpoint problems (CheckpointError) included
        raise RunError(str(error)) from None
    paths = save_figures(model_view_image(inputs.pixel_values, image_processor), stages, method.name, Path(args.out_dir))
    for path in paths:
        print(path)
    return paths


@interruptible
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    main_guard(lambda: run(args))


if __name__ == "__main__":
    main()
