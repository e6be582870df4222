"""Golden fixture for ToMe: the released merge (facebookresearch/ToMe) inside LLaVA-1.5's CLIP tower.

ToMe's authors released code for timm, SWAG and MAE vision transformers and none for LLaVA, so no released
LLaVA run exists to compare answers against. What does run is the stage ToMe changes: the CLIP tower. This
script runs LLaVA's own tower code (`CLIPVisionTower` of haotian-liu/LLaVA: transformers 4.37's CLIP, all 24
layers, `hidden_states[-2]`, feature select `patch`) with every CLIP encoder layer's forward replaced by
ToMe's released `ToMeBlock.forward` and `ToMeAttention.forward` (`tome/patch/timm.py`), which call the
released `bipartite_soft_matching`, `merge_wavg` and `merge_source` (`tome/merge.py`) unchanged: keys averaged
over heads as the metric, CLS protected (`class_token`), proportional attention, sizes carried from layer to
layer, sources traced. Nothing here runs at test time; `tests/test_golden_tome.py` compares our ToMe against
the fixture this writes, `tests/fixtures/golden_tome.json`.

What is ours (the adapter), and why:
- timm is not installed in the side environment and none of its code runs: `tome/patch/timm.py` imports
  timm's `Attention`, `Block` and `VisionTransformer` only to subclass them, so three empty stand-ins are
  registered under `timm.models.vision_transformer` before `tome` is imported.
- Each CLIP layer is given to the released `ToMeBlock.forward` as the timm block it expects, built from the
  layer's own modules: `norm1` = `layer_norm1`, `norm2` = `layer_norm2`, `mlp` = the CLIP MLP, drop paths the
  identity; its attention to `ToMeAttention.forward` with `qkv` = one linear holding CLIP's q, k and v
  projections stacked (timm's fused layout), `proj` = `out_proj`, CLIP's heads and scale, dropouts the
  identity. CLIP's layer and timm's block compute the same pre-norm residual block.
- The release's `ToMeVisionTransformer.forward` resets `r`, `size` and `source` before every image; the
  adapter does the same around LLaVA's tower call, with `r` given to the release's `parse_r` over the
  tower's 24 layers: a constant int (r = 8), or, for a budget N (patch tokens leaving the tower), our
  method's constant schedule as the release's list form: 576 - N merges over the 23 layers LLaVA runs
  (select layer -2), (576 - N) // 23 per layer and one more in the first (576 - N) % 23 layers; the 24th
  layer's output is not selected.

Environment: the side virtualenv of `tools/golden_released.py` (transformers 4.37.2, CPU torch; the project's
own `llava` package must not be importable from it), LLaVA and ToMe checked out at the commits recorded:

    .venv/bin/python -m llava.model.tiny --out /tmp/golden_tome/llava-tiny          # the project's checkpoint
    D=/path/to/project/playground/data/eval/demo; cd /tmp    # not the project: its `llava` would shadow LLaVA's
    PYTHONPATH=$LLAVA:$TOME /tmp/sideenv/bin/python /path/to/project/tools/golden_tome.py \
        --checkpoint /tmp/golden_tome/llava-tiny --questions $D/llava_textvqa_demo.jsonl --image-folder $D/images \
        --repo llava=$LLAVA --repo tome=$TOME --out /path/to/project/tests/fixtures/golden_tome.json
    # (a repository exported with `git archive` is given as name=path@commit)

Images are processed as LLaVA's `process_images` does for the checkpoint's `image_aspect_ratio` ("pad"), CPU,
float32, the tower's weights exactly as stored (float32). Per image and setting the fixture records the
schedule given to the release (`r` per run layer), the tokens after each of the 23 run layers (CLS included)
and a digest of the patch groups after each (`groups_digest`, so that a test can name the first layer where a
run parts from the release), and, per vision token reaching the projector in the release's order, the sorted
patches it stands for (from the release's `source` matrix), its size (the release's `size`) and the norm of
its feature.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import types
from pathlib import Path

import torch
from PIL import Image

CHECKPOINT_FILES = ("config.json", "clip-vision-tower/config.json", "clip-vision-tower/model.safetensors",
                    "clip-vision-tower/preprocessor_config.json")
PATCHES = 576
SELECT_LAYER = -2  # LLaVA-1.5's mm_vision_select_layer: hidden_states[-2], the output of layer 23 of 24
DIGEST_CHARS = 16
SETTINGS = ({"r": 8}, {"budget": 192}, {"budget": 128}, {"budget": 64})  # r = 8: ToMe's ViT-L setting


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def repository_commit(path: str) -> str:
    """The commit a checkout is at (`path@commit` for a `git archive` export)."""
    if "@" in path:
        return path.rsplit("@", 1)[1]
    return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def import_release():
    """ToMe's released modules, with timm's three base classes stood in for (module docstring)."""
    vision_transformer = types.ModuleType("timm.models.vision_transformer")
    for name in ("Attention", "Block", "VisionTransformer"):
        setattr(vision_transformer, name, type(name, (torch.nn.Module,), {}))
    timm, models = types.ModuleType("timm"), types.ModuleType("timm.models")
    timm.models, models.vision_transformer = models, vision_transformer
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.vision_transformer": vision_transformer})
    from tome.patch.timm import ToMeAttention, ToMeBlock
    from tome.utils import parse_r

    return ToMeBlock, ToMeAttention, parse_r


def released_block(layer, info: dict, ToMeBlock, ToMeAttention):
    """A CLIP encoder layer as the timm block the release patches (module docstring)."""
    clip = layer.self_attn
    attention = ToMeAttention()
    attention.qkv = torch.nn.Linear(clip.embed_dim, 3 * clip.embed_dim)
    with torch.no_grad():
        attention.qkv.weight.copy_(torch.cat([clip.q_proj.weight, clip.k_proj.weight, clip.v_proj.weight]))
        attention.qkv.bias.copy_(torch.cat([clip.q_proj.bias, clip.k_proj.bias, clip.v_proj.bias]))
    attention.num_heads, attention.scale, attention.proj = clip.num_heads, clip.scale, clip.out_proj
    attention.attn_drop = attention.proj_drop = torch.nn.Identity()
    block = ToMeBlock()
    block.norm1, block.attn, block.norm2, block.mlp = layer.layer_norm1, attention, layer.layer_norm2, layer.mlp
    block.drop_path = torch.nn.Identity()
    block._tome_info = info
    return block


def patch_tower(tower, ToMeBlock, ToMeAttention) -> dict:
    """Every CLIP encoder layer of LLaVA's tower runs as the release's ToMe block. Returns the shared state:
    the release's `_tome_info`, and under "after" each layer's (tokens, size, source) as it left the layer."""
    info = {"r": [], "size": None, "source": None, "trace_source": True, "prop_attn": True,
            "class_token": True, "distill_token": False, "after": []}
    for layer in tower.vision_tower.vision_model.encoder.layers:
        block = released_block(layer, info, ToMeBlock, ToMeAttention)

        def forward(hidden_states, attention_mask=None, causal_attention_mask=None, output_attentions=False,
                    block=block):
            hidden = block(hidden_states)
            info["after"].append((hidden.shape[1], info["size"], info["source"]))
            return (hidden,)

        layer.forward = forward
    return info


def constant_schedule(merges: int, layers: int) -> list[int]:
    """Our budget's constant r: `merges` over `layers`, the first layers taking the remainder."""
    share, remainder = divmod(merges, layers)
    return [share + int(layer < remainder) for layer in range(layers)]


def merged_tokens(size: torch.Tensor | None, source: torch.Tensor | None, tokens: int) -> tuple[list, list]:
    """Per vision token after CLS, the sorted patches it stands for and its size (the release's `source` rows
    [1, tokens, 1 + 576] and `size` [1, tokens, 1]; None before any merge: every token itself)."""
    if source is None:
        return [[patch] for patch in range(tokens - 1)], [1] * (tokens - 1)
    groups = [(row.nonzero().flatten() - 1).tolist() for row in source[0, 1:]]
    return groups, [round(float(value)) for value in size[0, 1:, 0]]


def groups_digest(groups: list[list[int]]) -> str:
    """A short digest of a token partition: the sorted patch groups, order-free (ours keeps another order)."""
    return hashlib.sha256(json.dumps(sorted(groups)).encode()).hexdigest()[:DIGEST_CHARS]


def run_setting(tower, info: dict, parse_r, setting: dict, images: list[tuple[dict, torch.Tensor]]) -> list[dict]:
    """Every image through LLaVA's tower with the release's ToMe at `setting` (r, or our budget's schedule)."""
    layers = len(tower.vision_tower.vision_model.encoder.layers)
    run = layers + 1 + SELECT_LAYER
    r = setting["r"] if "r" in setting else constant_schedule(PATCHES - setting["budget"], run)
    records = []
    for question, pixels in images:
        info.update(r=parse_r(layers, r), size=None, source=None, after=[])  # as ToMeVisionTransformer.forward
        schedule = info["r"][:run]
        with torch.no_grad():
            features = tower(pixels)[0]  # LLaVA's feature_select: hidden_states[-2][:, 1:]
        tokens, size, source = info["after"][run - 1]  # the selected layer's output
        assert features.shape[0] == tokens - 1, (features.shape, tokens)
        groups, sizes = merged_tokens(size, source, tokens)
        assert all(len(group) == count for group, count in zip(groups, sizes))
        records.append({"question_id": question["question_id"], "image": question["image"], "schedule": schedule,
                        "layer_tokens": [count for count, _, _ in info["after"][:run]],
                        "layer_groups": [groups_digest(merged_tokens(size, source, count)[0])
                                         for count, size, source in info["after"][:run]],
                        "vision_tokens": features.shape[0], "groups": groups, "sizes": sizes,
                        "feature_norms": [round(float(value), 6) for value in features.norm(dim=-1)]})
    return records


def load_tower(checkpoint: Path):
    """LLaVA's own tower (`CLIPVisionTower`) from the checkpoint's tower folder, float32 as stored."""
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    config = json.loads((checkpoint / "config.json").read_text())
    args = types.SimpleNamespace(mm_vision_select_layer=config["mm_vision_select_layer"],
                                 mm_vision_select_feature=config["mm_vision_select_feature"])
    assert args.mm_vision_select_layer == SELECT_LAYER and args.mm_vision_select_feature == "patch"
    tower = CLIPVisionTower(str(checkpoint / config["mm_vision_tower"]), args)
    assert tower.dtype == torch.float32
    return tower.eval(), config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--questions", type=Path, required=True)
    parser.add_argument("--image-folder", type=Path, required=True)
    parser.add_argument("--repo", action="append", default=[], help="name=path[@commit]: llava, tome")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.repos = dict(item.split("=", 1) for item in args.repo)
    if set(args.repos) != {"llava", "tome"}:
        parser.error("give --repo llava=PATH and --repo tome=PATH")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import transformers
    from llava.mm_utils import process_images

    ToMeBlock, ToMeAttention, parse_r = import_release()
    tower, config = load_tower(args.checkpoint)
    info = patch_tower(tower, ToMeBlock, ToMeAttention)
    image_args = types.SimpleNamespace(image_aspect_ratio=config["image_aspect_ratio"])
    questions = [json.loads(line) for line in args.questions.read_text().splitlines() if line.strip()]
    images = [(question, process_images([Image.open(args.image_folder / question["image"]).convert("RGB")],
                                        tower.image_processor, image_args)) for question in questions]
    golden = {
        "method": "tome",
        "released": {"repository": "github.com/facebookresearch/ToMe",
                     "commits": {name: repository_commit(path) for name, path in sorted(args.repos.items())}},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "device": "cpu", "dtype": "float32"},
        "checkpoint": {name: sha256(args.checkpoint / name) for name in CHECKPOINT_FILES},
        "select_layer": SELECT_LAYER,
        "made_by": "tools/golden_tome.py " + " ".join(sys.argv[1:]),
        "settings": [{"options": setting, "questions": run_setting(tower, info, parse_r, setting, images)}
                     for setting in SETTINGS],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(fixture_text(golden))


def fixture_text(golden: dict) -> str:
    """The fixture as JSON, indented, but each question's record on one line (its lists are long)."""
    records = {}
    for setting in golden["settings"]:
        for index, record in enumerate(setting["questions"]):
            key = f"@record{len(records)}@"
            records[f'"{key}"'] = json.dumps(record, separators=(",", ":"))
            setting["questions"][index] = key
    text = json.dumps(golden, indent=1)
    for key, record in records.items():
        text = text.replace(key, record)
    return text + "\n"


if __name__ == "__main__":
    main()
