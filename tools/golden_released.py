"""Golden fixtures: what a peer method's released code keeps and answers on the project's tiny checkpoint.

Runs the authors' own code, once, outside this project, and writes `tests/fixtures/golden_<method>.json`,
which `tests/test_golden_released.py` compares our methods against. Nothing here runs at test time and
the tests fetch nothing.

Environment (a side virtualenv; the project's own `llava` package must not be importable from it):

    python3 -m venv /tmp/sideenv
    /tmp/sideenv/bin/pip install torch==2.13.0 transformers==4.37.2 "numpy<2" sentencepiece protobuf \
        accelerate==0.21.0 einops shortuuid pillow            # torch: the CPU wheel
    # the released repositories, checked out at the commits recorded in each fixture:
    #   haotian-liu/LLaVA            -> $LLAVA  (the `llava` package the methods patch)
    #   dvlab-research/VisionZip     -> $VISIONZIP
    #   pkunlp-icler/FastV           -> $FASTV
    #   Cooperx521/PyramidDrop       -> $PDROP  (a LLaVA fork: its `llava` replaces $LLAVA)
    #   42Shawn/LLaVA-PruMerge       -> $PRUMERGE  (only its vision tower file is used; needs matplotlib)
    #   Gumpest/SparseVLMs           -> $SPARSEVLMS  (a LLaVA fork: its `llava` replaces $LLAVA; default mode,
    #                                   USE_VERSION unset)
    .venv/bin/python -m llava.model.tiny --out /tmp/golden/llava-tiny      # the project's checkpoint
    D=playground/data/eval/demo; cd /tmp    # anywhere but the project, whose `llava` would shadow LLaVA's
    PYTHONPATH=$LLAVA:$VISIONZIP /tmp/sideenv/bin/python /path/to/tools/golden_released.py --method visionzip \
        --checkpoint /tmp/golden/llava-tiny --questions $D/llava_textvqa_demo.jsonl --image-folder $D/images \
        --repo llava=$LLAVA --repo visionzip=$VISIONZIP --out tests/fixtures/golden_visionzip.json
    # fastv:    PYTHONPATH=$LLAVA,  --repo llava=$LLAVA --repo fastv=$FASTV
    # pdrop:    PYTHONPATH=$PDROP,  --repo llava=$PDROP
    # prumerge: PYTHONPATH=$LLAVA,  --repo llava=$LLAVA --repo prumerge=$PRUMERGE
    # sparsevlm: PYTHONPATH=$SPARSEVLMS,  --repo llava=$SPARSEVLMS  (also with --arch next, below)
    # (a repository exported with `git archive` is given as name=path@commit)

LLaVA-NeXT (v1.6): `--arch next` on the tiny NeXT checkpoint writes `tests/fixtures/golden_<method>_next.json`,
over the demo questions about NEXT_IMAGES (tall, square, wide: tests/conftest.py's NEXT_DEMO_IMAGES):

    .venv/bin/python -m llava.model.tiny --arch next --out /tmp/golden/llava-next-tiny
    PYTHONPATH=$LLAVA:$VISIONZIP /tmp/sideenv/bin/python /path/to/tools/golden_released.py --arch next \
        --method visionzip --checkpoint /tmp/golden/llava-next-tiny ... --out tests/fixtures/golden_visionzip_next.json

The image is processed as LLaVA's own code does for the checkpoint's `image_aspect_ratio` "anyres"
(`process_images`: the base image and its crops, [1, 1 + K, 3, 336, 336]), and `generate` gets the image's
(width, height) as `image_sizes`, as `llava.eval.model_vqa_loader` passes it.

How the released code is run: LLaVA's own loader and `model.generate` (greedy, `use_cache=True`, as
`llava.eval.model_vqa_loader` calls it), conversation `vicuna_v1`, CPU, float32. LLaVA's loader rounds the
weights through float16, so the exact float32 weights are loaded again from the checkpoint's files, and
the rotary cos/sin tables (buffers that a weight reload does not touch) are rebuilt in float32.

SparseVLM's fork is written for CUDA but is plain PyTorch: the script runs it on the CPU without changing a line
of it by standing in for `Tensor.cuda()` (its decoding position ids, which then stay on the CPU) and for the
CUDA timers it reads (`torch.cuda.Event`, `torch.cuda.synchronize`: they time nothing), and it selects each
`RETAIN_TOKN` setting by setting `score.RETAIN_TOKN`, as the environment variable does at import. Its
DPC-KNN clustering adds `torch.rand` noise from the global generator: the script seeds it (SPARSEVLM_SEED)
before every question and checks that the draws are a fresh generator's, in order. On LLaVA-NeXT the fork
raises on its own packed features; the script adapts one line (SPARSEVLM_NEXT_SPAN) and says why.

Per question the fixture records the prompt's token ids, what the method kept (indices where it selects,
counts everywhere), the KV-cache length of every layer after prefill, the generated ids and, per
generated token, the margin between the two best logits (a margin under 1e-3 marks a numerical tie).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

CHECKPOINT_FILES = ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                    "tokenizer.model", "clip-vision-tower/config.json", "clip-vision-tower/model.safetensors",
                    "clip-vision-tower/preprocessor_config.json")
VISION_TOWER_DIR = "clip-vision-tower"
MAX_NEW_TOKENS = 16
CONV_MODE = "vicuna_v1"
LLAVA_MODEL_NAMES = {"v1.5": "llava-v1.5-tiny", "next": "llava-v1.6-tiny"}  # LLaVA's loader picks its
# LLaVA-Llama class by the name ("llava" in it); the rest says which checkpoint it is
# The demo images LLaVA-NeXT's fixtures cover (tests/conftest.py's NEXT_DEMO_IMAGES): how the tiny NeXT
# checkpoint tiles them, base image + crops: tall 180x300 -> 1 + 2 (a column), square 400x400 -> 1 + 4 (2 x 2),
# wide 500x160 -> 1 + 2 (a row).
NEXT_IMAGES = {"tall": "175e99412607ad5f.png", "square": "3fc86ee644365862.png", "wide": "4c6552be651e1ca5.png"}
PATCHES = 576

# The paper settings each fixture covers.
VISIONZIP_SETTINGS = ({"dominant": 54, "contextual": 10}, {"dominant": 108, "contextual": 20},
                      {"dominant": 162, "contextual": 30})
# LLaVA-NeXT: the paper's 640 / 320 / 160 tokens for an image of 5 tower images (2 x 2 crops), i.e. 128 / 64 / 32
# per tower image, split 54 : 10 as on LLaVA-1.5 (the released code gives every tower image the same counts).
VISIONZIP_NEXT_SETTINGS = ({"dominant": 108, "contextual": 20}, {"dominant": 54, "contextual": 10},
                           {"dominant": 27, "contextual": 5})
FASTV_SETTINGS = ({"k": 2, "keep": 288}, {"k": 2, "keep": 144}, {"k": 2, "keep": 64})
# PyramidDrop's released LLaVA-1.5 scripts (`scripts/v1_5/pdrop_eval/*.sh`), then the early stages our budget
# mode starts from.
PDROP_SETTINGS = ({"layers": [8, 16, 24], "ratios": [0.5, 0.25, 0.125]},
                  {"layers": [2, 6, 12], "ratios": [0.5, 0.25, 0.125]})


# --- the environment and the released code -------------------------------------------------------------------

def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checkpoint_digests(checkpoint: Path) -> dict[str, str]:
    """The checkpoint files the fixture depends on: a test refuses a checkpoint that no longer matches."""
    return {name: sha256(checkpoint / name) for name in CHECKPOINT_FILES}


def repository_commit(path: Path) -> str:
    """The commit a released repository was checked out at (given as `name=path@commit` when it is not a git
    work tree, e.g. a `git archive` export)."""
    text = str(path)
    if "@" in text:
        return text.rsplit("@", 1)[1]
    return subprocess.run(["git", "-C", text, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def environment() -> dict:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": "cpu", "dtype": "float32"}


# --- loading LLaVA as released, with exact float32 weights ----------------------------------------------------

def checkpoint_arch(checkpoint: Path) -> str:
    """"next" for a LLaVA-NeXT checkpoint (its config tiles images: `image_aspect_ratio` "anyres"), else "v1.5"."""
    config = json.loads((checkpoint / "config.json").read_text())
    return "next" if config.get("image_aspect_ratio") == "anyres" else "v1.5"


def load_released_llava(checkpoint: Path, *loader_flags):
    """LLaVA's own loader (it rounds through float16), then the exact float32 weights and RoPE tables;
    `loader_flags` are a fork's extra positional arguments (PyramidDrop's `pdrop_infer`)."""
    from llava.model.builder import load_pretrained_model

    os.chdir(checkpoint)  # the config names its vision tower by a relative path
    tokenizer, model, image_processor, _ = load_pretrained_model(
        str(checkpoint), None, LLAVA_MODEL_NAMES[checkpoint_arch(checkpoint)], *loader_flags, device="cpu")
    model.float()
    reload_exact_weights(model, checkpoint)
    rebuild_rotary_tables(model)
    model.eval()
    return tokenizer, model, image_processor


# SparseVLM's loader attaches to each decoder layer a FlashAttention-2 copy of its attention (`flash_attn`), filled
# from the layer's `self_attn`; its decoder layers never call it (they run `self_attn`, the SDPA class they assert).
ATTENTION_COPY = ".flash_attn."
EMBEDDED_TOWER_PREFIX = "model.vision_tower.vision_tower."  # LLaVA-NeXT's fine-tuned tower, inside its shards


def reload_exact_weights(model, checkpoint: Path) -> None:
    """Every weight from the checkpoint's files in float32; refuse a weight left unloaded. The tower's come
    from where LLaVA's loader takes them: LLaVA-NeXT's shards hold a fine-tuned copy of the tower
    (`unfreeze_mm_vision_tower`), which the loader uses instead of the tower folder's; LLaVA-1.5's do not."""
    language = {}
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        language.update(load_file(checkpoint / shard))
    missing = set(model.state_dict()) - set(language)
    unloaded = [name for name in missing if ".vision_tower." not in name and ATTENTION_COPY not in name]
    if unloaded:
        raise RuntimeError(f"weights the checkpoint does not hold: {unloaded[:5]}")
    model.load_state_dict(language, strict=False)
    tower = model.get_vision_tower().vision_tower
    tower_weights = {name[len(EMBEDDED_TOWER_PREFIX) :]: tensor for name, tensor in language.items()
                     if name.startswith(EMBEDDED_TOWER_PREFIX)}
    if not tower_weights:
        tower_weights = load_file(checkpoint / VISION_TOWER_DIR / "model.safetensors")
    wanted = {name: tensor for name, tensor in tower_weights.items() if name in tower.state_dict()}
    left = set(tower.state_dict()) - set(wanted) - {"vision_model.embeddings.position_ids"}
    if left:
        raise RuntimeError(f"vision tower weights missing from the checkpoint: {sorted(left)[:5]}")
    tower.load_state_dict(wanted, strict=False)
    for layer in model.model.layers:
        if hasattr(layer, "flash_attn"):  # as the SparseVLM builder fills its copy, from the layer's own attention
            layer.flash_attn.load_state_dict(layer.self_attn.state_dict(), strict=False)
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            raise RuntimeError(f"{name} is {tensor.dtype} after the reload")


def rebuild_rotary_tables(model) -> None:
    """transformers 4.37 keeps RoPE's inverse frequencies and cos/sin tables as buffers, built in float16 by
    a float16 load; rebuild them in float32 as a float32 load would have."""
    for layer in model.model.layers:
        rotary = layer.self_attn.rotary_emb
        inverse = 1.0 / (rotary.base ** (torch.arange(0, rotary.dim, 2, dtype=torch.int64).float() / rotary.dim))
        rotary.register_buffer("inv_freq", inverse, persistent=False)
        rotary._set_cos_sin_cache(seq_len=rotary.max_seq_len_cached, device=inverse.device, dtype=torch.float32)


# --- one question, as model_vqa_loader asks it ----------------------------------------------------------------

def question_inputs(question: dict, image_folder: Path, tokenizer, image_processor, model):
    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token

    conversation = conv_templates[CONV_MODE].copy()
    conversation.append_message(conversation.roles[0], DEFAULT_IMAGE_TOKEN + "\n" + question["text"])
    conversation.append_message(conversation.roles[1], None)
    input_ids = tokenizer_image_token(conversation.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
    image = Image.open(image_folder / question["image"]).convert("RGB")
    pixels = process_images([image], image_processor, model.config).to(torch.float32)
    return input_ids[None], pixels, image.size


def top2_margins(scores: tuple[torch.Tensor, ...]) -> list[float]:
    """Per generated token, the best logit minus the second best."""
    margins = []
    for step in scores:
        best = step[0].float().topk(2).values
        margins.append(float(best[0] - best[1]))
    return margins


class PrefillCache:
    """The KV-cache length of every layer after the prompt's forward pass (the first call of the model)."""

    def __init__(self, model):
        self.lengths: list[int] | None = None
        self.handle = model.register_forward_hook(self.record)

    def record(self, module, args, output) -> None:
        if isinstance(output, tuple):  # SparseVLM's fork returns (its decision, a probability, the output)
            output = output[-1]
        if self.lengths is None and output.past_key_values is not None:
            self.lengths = [layer[0].shape[2] for layer in output.past_key_values]

    def reset(self) -> None:
        self.lengths = None


def answer(model, tokenizer, input_ids, pixels, image_size) -> dict:
    """Greedy answer with `use_cache=True`, the generated ids and their logit margins."""
    output = model.generate(input_ids, images=pixels, image_sizes=[image_size], do_sample=False, temperature=0,
                            top_p=None, num_beams=1, max_new_tokens=MAX_NEW_TOKENS, use_cache=True,
                            output_scores=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    # transformers 4.37 starts an answer generated from inputs_embeds with the BOS id: not a generated token
    sequence = output.sequences[0].tolist()
    if sequence[0] != tokenizer.bos_token_id or len(sequence) != len(output.scores) + 1:
        raise RuntimeError(f"unexpected generate() output {sequence[:4]}...")
    return {"generated_ids": sequence[1:], "top2_margins": top2_margins(output.scores)}


def run_questions(model, tokenizer, image_processor, questions: list[dict], image_folder: Path,
                  record: Callable[[], dict], reset: Callable[[], None]) -> list[dict]:
    """Every question through the released code; `record` reads what the method kept for it."""
    cache = PrefillCache(model)
    results = []
    for question in questions:
        reset()
        cache.reset()
        input_ids, pixels, size = question_inputs(question, image_folder, tokenizer, image_processor, model)
        with torch.inference_mode():
            generated = answer(model, tokenizer, input_ids, pixels, size)
        tiled = {"image_size": list(size), "tower_images": pixels.shape[1]} if pixels.dim() == 5 else {}
        results.append({"question_id": question["question_id"], "image": question["image"], **tiled,
                        "input_ids": input_ids[0].tolist(), **record(), "kv_lengths": cache.lengths, **generated})
    cache.handle.remove()
    return results


# --- VisionZip ----------------------------------------------------------------------------------------------

class VisionZipRecorder:
    """What the released VisionZip tower returned for the image: its kept indices (CLS and the dominant
    patches, in the tower's sequence) and the norms of the projected vision tokens."""

    def __init__(self, model):
        from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

        zipped_forward = CLIPVisionTower.forward  # VisionZip's, installed by `visionzip()`
        projector = model.get_model().mm_projector
        self.seen: dict = {}

        def recording(tower, images):
            features, kept = zipped_forward(tower, images)
            self.seen = {"kept": kept[0].tolist(), "features": projector(features)[0]}
            return features, kept

        CLIPVisionTower.forward = recording

    def record(self) -> dict:
        kept = self.seen["kept"]
        return {"cls_kept": kept[0] == 0, "dominant_patches": sorted(index - 1 for index in kept[1:]),
                "vision_tokens": self.seen["features"].shape[0],
                "feature_norms": [round(float(value), 6) for value in self.seen["features"].norm(dim=-1)]}

    def reset(self) -> None:
        self.seen = {}


class VisionZipNextRecorder:
    """LLaVA-NeXT: what the released VisionZip tower kept of each tower image (the base image, then the crops:
    CLS and its dominant patches), and the norms of the vision tokens the LLM receives, in the order the
    released `prepare_inputs_labels_for_multimodal_visionzip` lays them out (its span of `inputs_embeds`)."""

    def __init__(self, model):
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.model.llava_arch import LlavaMetaForCausalLM
        from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

        zipped_forward = CLIPVisionTower.forward  # VisionZip's, installed by `visionzip()`
        prepare = LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal  # VisionZip's too
        self.kept: list[list[int]] | None = None
        self.features: torch.Tensor | None = None

        def recording(tower, images):
            features, kept = zipped_forward(tower, images)
            self.kept = kept.tolist()
            return features, kept

        def preparing(llava, input_ids, *args, **kwargs):
            prepared = prepare(llava, input_ids, *args, **kwargs)
            embeds = prepared[4]
            if embeds is not None and self.features is None:  # the prompt's (decoding steps return None)
                start = input_ids[0].tolist().index(IMAGE_TOKEN_INDEX)
                self.features = embeds[0, start : start + embeds.shape[1] - input_ids.shape[1] + 1]
            return prepared

        CLIPVisionTower.forward = recording
        LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal = preparing

    def record(self) -> dict:
        images = [{"cls_kept": kept[0] == 0, "dominant_patches": sorted(index - 1 for index in kept[1:])}
                  for kept in self.kept]
        return {"images": images, "vision_tokens": self.features.shape[0],
                "feature_norms": [round(float(value), 6) for value in self.features.norm(dim=-1)]}

    def reset(self) -> None:
        self.kept, self.features = None, None


def run_visionzip(args, questions: list[dict]) -> list[dict]:
    settings = []
    next_arch = args.arch == "next"
    for options in VISIONZIP_NEXT_SETTINGS if next_arch else VISIONZIP_SETTINGS:
        tokenizer, model, image_processor = load_released_llava(args.checkpoint)
        from visionzip import visionzip

        visionzip(model, dominant=options["dominant"], contextual=options["contextual"])
        recorder = VisionZipNextRecorder(model) if next_arch else VisionZipRecorder(model)
        settings.append({"options": options, "questions": run_questions(
            model, tokenizer, image_processor, questions, args.image_folder, recorder.record, recorder.reset)})
    return settings


# --- FastV (the KV-cache variant for LLaVA on transformers 4.37) ----------------------------------------------

FASTV_FILE = "src/FastV/lmms-eval/fastv_kvcache.py"


def fastv_source(repository: Path, k: int, keep: int, vision_start: int) -> str:
    """The released `fastv_kvcache.py` with its constants set for this prompt, as its README says to ("change the
    K and R hyper-parameters"): K, the kept count, and the image span (35:611 for LLaVA-1.5-7B's prompt)."""
    source = (repository / FASTV_FILE).read_text()
    vision_end = vision_start + PATCHES
    replacements = {
        "K = 3\n": f"K = {k}\n",
        "topk(int(576 * ratio))": f"topk({keep})",
        "[35:611]": f"[{vision_start}:{vision_end}]",
        "indices + 35": f"indices + {vision_start}",
        "torch.arange(35,device=device)": f"torch.arange({vision_start},device=device)",
        "torch.arange(611,seq_length,device=device)": f"torch.arange({vision_end},seq_length,device=device)",
    }
    for old, new in replacements.items():
        if source.count(old) != 1:
            raise RuntimeError(f"{FASTV_FILE} no longer reads {old!r} once; check the released code")
        source = source.replace(old, new)
    return source


def import_source(name: str, source: str, folder: Path):
    path = folder / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def whole_rotary_table(self, x, seq_len=None):
    """README step 5 of the KV-cache variant: RoPE tables long enough for the largest position id (kept tokens
    keep their original positions, beyond the shorter cache's length), here the whole float32 table."""
    return self.cos_cached.to(dtype=x.dtype), self.sin_cached.to(dtype=x.dtype)


class FastVRecorder:
    """The position ids the layer after the drop receives: in prefill the kept tokens' original positions, at
    the first decoding step the position the first fed-back token gets."""

    def __init__(self, layer, vision_start: int):
        self.vision_start = vision_start
        self.prefill: list[int] | None = None
        self.first_decode: int | None = None
        layer.register_forward_pre_hook(self.see, with_kwargs=True)

    def see(self, module, args, kwargs) -> None:
        positions = kwargs["position_ids"][0].tolist()
        if len(positions) > 1 and self.prefill is None:
            self.prefill = positions
        elif len(positions) == 1 and self.first_decode is None:
            self.first_decode = positions[0]

    def record(self) -> dict:
        start, end = self.vision_start, self.vision_start + PATCHES
        kept = [position - start for position in self.prefill if start <= position < end]
        return {"kept_vision": kept, "vision_tokens_after_drop": len(kept), "positions_after_drop": self.prefill,
                "first_decode_position": self.first_decode}

    def reset(self) -> None:
        self.prefill, self.first_decode = None, None


def prompt_vision_start(questions: list[dict], args) -> int:
    """Where the image sits in the vicuna_v1 prompt: the same system text before it in every question."""
    from llava.constants import IMAGE_TOKEN_INDEX

    tokenizer, model, image_processor = load_released_llava(args.checkpoint)
    starts = {question_inputs(question, args.image_folder, tokenizer, image_processor, model)[0][0].tolist().index(
        IMAGE_TOKEN_INDEX) for question in questions}
    if len(starts) != 1:
        raise RuntimeError(f"the image does not sit at one place in every prompt: {sorted(starts)}")
    return starts.pop()


def run_fastv(args, questions: list[dict]) -> list[dict]:
    from transformers.models.llama import modeling_llama

    vision_start = prompt_vision_start(questions, args)
    modeling_llama.LlamaRotaryEmbedding.forward = whole_rotary_table
    settings = []
    for options in FASTV_SETTINGS:
        fastv = import_source(f"fastv_kvcache_k{options['k']}_{options['keep']}",
                              fastv_source(args.repos["fastv"], options["k"], options["keep"], vision_start),
                              args.work)
        tokenizer, model, image_processor = load_released_llava(args.checkpoint)
        install_fastv(model, fastv.FastVLlamaModel)
        recorder = FastVRecorder(model.model.layers[options["k"]], vision_start)
        settings.append({"options": options, "vision_start": vision_start, "questions": run_questions(
            model, tokenizer, image_processor, questions, args.image_folder, recorder.record, recorder.reset)})
    return settings


def install_fastv(model, fastv_model: type) -> None:
    """README step 4 (`class LlavaLlamaModel(LlavaMetaModel, FastVLlamaModel)`), on the loaded model: its
    decoder runs FastVLlamaModel's forward."""
    decoder = model.model
    decoder.__class__ = type("FastVLlavaLlamaModel", (type(decoder), fastv_model), {"forward": fastv_model.forward})
    decoder.last_attention = None


# --- PyramidDrop (its LLaVA fork, `LlavaLlamaForCausalLM_PDrop`) ------------------------------------------------

def decode_positions(layers) -> tuple[dict[int, int], list]:
    """Every layer's position id at the first decoding step (the fork hands a list of tensors after a stage)."""
    seen: dict[int, int] = {}

    def seer(index: int):
        def see(module, args, kwargs):
            positions = kwargs["position_ids"]
            positions = torch.stack(list(positions)) if isinstance(positions, (list, tuple)) else positions
            if positions.numel() == 1:
                seen.setdefault(index, int(positions.flatten()[0]))
        return see

    return seen, [layer.register_forward_pre_hook(seer(index), with_kwargs=True) for index, layer in enumerate(layers)]


class PDropRecorder:
    """The vision tokens each of the fork's drops keeps, as indices among that stage's vision tokens: the fork
    copies the kept rows (`features[i][top_rank_index]`), so each kept row equals exactly one row it was given."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.stages: list[dict] = []
        ranked_drop = decoder.pdrop_rank_drop

        def recording(cur_num, rank_layer, features, **kwargs):
            result = ranked_drop(cur_num=cur_num, rank_layer=rank_layer, features=features, **kwargs)
            self.stages.append(self.kept(cur_num, rank_layer, features[0], result[2][0]))
            return result

        decoder.pdrop_rank_drop = recording
        self.first_decode, self.handles = decode_positions(decoder.layers)

    def kept(self, stage: int, rank_layer: int, before: torch.Tensor, after: torch.Tensor) -> dict:
        start = self.decoder.image_token_posi[0]
        count = int(self.decoder.image_tokens[0] * self.decoder.image_token_ratio_list[stage])
        keep = int(self.decoder.image_tokens[0] * self.decoder.image_token_ratio_list[stage + 1])
        given, kept = before[start : start + count], after[start : start + keep]
        matches = (kept[:, None] == given[None]).all(dim=-1).nonzero()
        if matches.shape[0] != keep:
            raise RuntimeError(f"stage {stage}: {matches.shape[0]} exact row matches for {keep} kept tokens")
        return {"after_layer": rank_layer - 1, "vision_tokens_in": count, "kept_vision": matches[:, 1].tolist()}

    def record(self) -> dict:
        return {"stages": self.stages, "first_decode_positions": [self.first_decode[index]
                                                                  for index in sorted(self.first_decode)]}

    def reset(self) -> None:
        self.stages = []
        self.first_decode.clear()


PDROP_MODULE = "llava.model.modeling_llama_pdrop"
# The fork scores with one query row against the layer's keys without repeating them over the query heads
# (`repeat_kv`): right for LLaVA-1.5-7B (as many key heads as query heads), a shape error on a model with
# grouped keys such as the tiny checkpoint (4 query, 2 key heads). Repeating them is what every Llama
# attention does and changes nothing where the heads are equal.
PDROP_GROUPED_KEYS = {"cur_key_states = key_states[i]":
                      "cur_key_states = repeat_kv(key_states, self_attn.num_key_value_groups)[i]"}


def install_patched_module(name: str, replacements: dict[str, str]) -> None:
    """Import module `name` from its file with each `replacements` key (found exactly once) replaced."""
    import llava.model

    path = Path(llava.model.__file__).parent / (name.rsplit(".", 1)[1] + ".py")
    source = path.read_text()
    for old, new in replacements.items():
        if source.count(old) != 1:
            raise RuntimeError(f"{path} no longer reads {old!r} once; check the released code")
        source = source.replace(old, new)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path))
    sys.modules[name] = module
    exec(compile(source, str(path), "exec"), module.__dict__)


def run_pdrop(args, questions: list[dict]) -> list[dict]:
    install_patched_module(PDROP_MODULE, PDROP_GROUPED_KEYS)
    settings = []
    for options in PDROP_SETTINGS:
        tokenizer, model, image_processor = load_released_llava(args.checkpoint, True)
        model.model.layer_list = list(options["layers"])
        model.model.image_token_ratio_list = [1.0, *options["ratios"]]  # as its model_vqa_loader sets them
        recorder = PDropRecorder(model.model)
        settings.append({"options": options, "questions": run_questions(
            model, tokenizer, image_processor, questions, args.image_folder, recorder.record, recorder.reset)})
    return settings


# --- PruMerge, PruMerge+ (its LLaVA fork's vision tower, on LLaVA's) -----------------------------------------------

PRUMERGE_FILE = "llava/model/multimodal_encoder/clip_encoder.py"
PRUMERGE_VARIANTS = {"prumerge": "token_prune_merge_advanced", "prumerge_plus": "token_prune_merge_advanced_plus"}


class RecordingTorch:
    """`torch` as the fork's module sees it, noting the index of its first `gather` along the patches: the
    kept patches, in the order their tokens come out (x_others = gather(image_features, 1, index))."""

    def __init__(self):
        self.kept: list[int] | None = None

    def __getattr__(self, name):
        return getattr(torch, name)

    def gather(self, source, dim, index, **kwargs):
        if self.kept is None and index.dim() == 3:
            self.kept = index[0, :, 0].tolist()
        return torch.gather(source, dim, index, **kwargs)


class PruMergeRecorder:
    """The kept patches and the projected vision tokens of the fork's reduction, run as LLaVA's tower forward
    (the fork's own `forward` picks a variant by commented-out lines; this calls the one asked for)."""

    def __init__(self, model, fork, variant: str):
        from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

        self.torch = RecordingTorch()
        fork.torch = self.torch
        reduce = getattr(fork.CLIPVisionTower, PRUMERGE_VARIANTS[variant])
        projector = model.get_model().mm_projector
        self.features = None

        def forward(tower, images):
            features = reduce(tower, images, if_adaptive=True, reduction_ratio=1 / 8)
            self.features = projector(features)[0]
            return features

        CLIPVisionTower.forward = forward

    def record(self) -> dict:
        return {"kept_patches": self.torch.kept, "vision_tokens": self.features.shape[0],
                "feature_norms": [round(float(value), 6) for value in self.features.norm(dim=-1)]}

    def reset(self) -> None:
        self.torch.kept, self.features = None, None


def run_prumerge(args, questions: list[dict]) -> list[dict]:
    fork = import_source("prumerge_clip_encoder", (args.repos["prumerge"] / PRUMERGE_FILE).read_text(), args.work)
    settings = []
    for variant in PRUMERGE_VARIANTS:
        tokenizer, model, image_processor = load_released_llava(args.checkpoint)
        recorder = PruMergeRecorder(model, fork, variant)
        settings.append({"options": {"variant": variant}, "questions": run_questions(
            model, tokenizer, image_processor, questions, args.image_folder, recorder.record, recorder.reset)})
    return settings


# --- SparseVLM (its LLaVA fork, `LlavaLlamaDynamicForCausalLM`, default mode) --------------------------------------

# The fork's named settings (`RETAIN_TOKN`, `llava/model/language_model/score.py`): the vision tokens kept after
# layers 2, 6 and 15, default mode (`USE_VERSION` unset, "1_0"; "2_0" is SparseVLM+).
SPARSEVLM_SETTINGS = (192, 128, 96, 64)
SPARSEVLM_SEED = 0  # torch.manual_seed before each question: DPC-KNN's density noise (`torch.rand`) draws from it
SPARSEVLM_MODEL = "llava.model.language_model.modelling_sparse_llama"
SPARSEVLM_UTILS = "llava.model.language_model.utils"
SPARSEVLM_SCORE = "llava.model.language_model.score"


class CudaEventStandIn:
    """`torch.cuda.Event` for the fork's prefill / generation timers on a machine without CUDA: times nothing."""

    def __init__(self, **kwargs):
        pass

    def record(self) -> None:
        pass

    def elapsed_time(self, other) -> float:
        return 0.0


class CpuStandIns:
    """What lets the fork run on the CPU without a line of it changed: `Tensor.cuda()` (its decoding position
    ids, `torch.tensor([[cache length]]).cuda()` in every layer) stays on the CPU and is noted, and its CUDA
    timers (`torch.cuda.Event`, `torch.cuda.synchronize`) time nothing."""

    def __init__(self):
        self.cuda_calls: list[torch.Tensor] = []
        recorder = self

        def stay(tensor, *args, **kwargs):
            recorder.cuda_calls.append(tensor.clone())
            return tensor

        torch.Tensor.cuda = stay
        torch.cuda.Event = CudaEventStandIn
        torch.cuda.synchronize = lambda *args, **kwargs: None


class RandomDraws:
    """`torch` as the fork's `utils` module sees it, noting every `torch.rand` draw (DPC-KNN's density noise)."""

    def __init__(self):
        self.draws: list[torch.Tensor] = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def rand(self, *args, **kwargs):
        drawn = torch.rand(*args, **kwargs)
        self.draws.append(drawn.clone())
        return drawn


class SparseVLMRecorder:
    """What the fork's decoder did to one question: its text raters (indices among the tokens after the image,
    chosen once from the input embeddings), and at each sparse layer the vision tokens it kept (indices among that
    stage's vision tokens), the dropped ones it recycled (indices, in the order they enter DPC-KNN: best-scored
    first), the cluster centres DPC-KNN chose (indices into that order, in cluster order) and the norms of the
    merged tokens; then each layer's decoding position at the first generated token, and the noise draws,
    checked against a fresh generator seeded as the question was."""

    def __init__(self, model, stand_ins: CpuStandIns, released: tuple[Callable, Callable, Callable]):
        import importlib

        sparse = importlib.import_module(SPARSEVLM_MODEL)
        utils = importlib.import_module(SPARSEVLM_UTILS)
        self.stand_ins = stand_ins
        self.layers = model.model.layers
        self.prompt_tokens = 0
        self.outputs: dict[int, torch.Tensor] = {}
        self.stages: list[dict] = []
        self.raters: list[int] | None = None
        self.random = RandomDraws()
        utils.torch = self.random
        postprocess, cluster, index_points = released
        self.centres: torch.Tensor | None = None

        def scoring(attention, v_token_start, v_token_num, text_token_start, t_token_idx, layer_idx):
            mask, merge, scores = postprocess(attention, v_token_start, v_token_num, text_token_start, t_token_idx,
                                              layer_idx)
            raters = t_token_idx[1].tolist()
            if self.raters is None:
                self.raters = raters
            elif raters != self.raters:
                raise RuntimeError(f"layer {layer_idx}: the raters changed from {self.raters} to {raters}")
            count = int(v_token_num)
            self.stages.append({"after_layer": layer_idx, "vision_tokens_in": count,
                                "kept_vision": mask[0].nonzero().flatten().tolist(), "vision_start": v_token_start})
            return mask, merge, scores

        def merging(tokens, cluster_num):
            merged = cluster(tokens, cluster_num)
            stage = self.stages[-1]
            start, count = stage.pop("vision_start"), stage["vision_tokens_in"]
            given = self.outputs[stage["after_layer"]][0, start : start + count]
            matches = (tokens[0][:, None] == given[None]).all(dim=-1).nonzero()
            if matches.shape[0] != tokens.shape[1] or matches[:, 0].tolist() != list(range(tokens.shape[1])):
                raise RuntimeError(f"layer {stage['after_layer']}: {matches.shape[0]} exact row matches for "
                                   f"{tokens.shape[1]} recycled tokens")
            stage.update({"recycled": matches[:, 1].tolist(), "clusters": cluster_num,
                          "centres": self.centres[0].tolist(),
                          "merged_norms": [round(float(value), 6) for value in merged[0].norm(dim=-1)],
                          "vision_tokens_out": len(stage["kept_vision"]) + cluster_num})
            return merged

        def centre_rows(points, idx):
            self.centres = idx.clone()
            return index_points(points, idx)

        sparse.attn_postprocess_topk = scoring
        sparse.cluster_and_merge = merging
        utils.index_points = centre_rows
        for index in sparse_layers(model):
            self.layers[index].register_forward_hook(self.output_of(index))

    def output_of(self, index: int):
        def see(module, args, output):
            if output[0].shape[1] > 1:
                self.outputs[index] = output[0]
        return see

    def record(self) -> dict:
        calls = self.stand_ins.cuda_calls
        if len(calls) < len(self.layers):
            raise RuntimeError(f"{len(calls)} decoding position ids for {len(self.layers)} layers")
        first_decode = [int(call.flatten()[0]) for call in calls[: len(self.layers)]]
        replay = torch.Generator().manual_seed(SPARSEVLM_SEED)
        for drawn in self.random.draws:
            again = torch.rand(drawn.shape, generator=replay, dtype=drawn.dtype)
            if not torch.equal(drawn, again):
                raise RuntimeError("the density noise is not the seeded generator's next draw")
        for stage in self.stages:
            stage.pop("vision_start", None)
        return {"noise_seed": SPARSEVLM_SEED, "noise_shapes": [list(drawn.shape) for drawn in self.random.draws],
                "raters": self.raters, "stages": self.stages, "first_decode_positions": first_decode}

    def reset(self) -> None:
        torch.manual_seed(SPARSEVLM_SEED)
        self.stand_ins.cuda_calls.clear()
        self.outputs.clear()
        self.stages = []
        self.raters = None
        self.random.draws.clear()


# LLaVA-NeXT: the fork packs a NeXT image in the model's own layout (a list of packed features, one per prompt),
# then reads the vision span's length as `image_features.shape[1]`, written for LLaVA-1.5's [1, 576, hidden] tensor:
# on the list it raises AttributeError. The length of the prompt's packed feature is what the rest of its code
# takes it for (`image_shape` tokens after the system prompt); on LLaVA-1.5 the two readings agree.
SPARSEVLM_NEXT_SPAN = {
    "        self.image_shape = image_features.shape[1]\n": "        self.image_shape = image_features[0].shape[0]\n",
    ",image_features.shape[1],token_length_list,": ",image_features[0].shape[0],token_length_list,",
}


def install_next_span() -> None:
    """The fork's `prepare_sparse_inputs_labels_for_multimodal` with SPARSEVLM_NEXT_SPAN, on its LLaVA class."""
    from llava.model.language_model.sparse_llava_llama import LlavaLlamaDynamicForCausalLM

    install_patched_module("llava.model.llava_arch", SPARSEVLM_NEXT_SPAN)
    prepare = sys.modules["llava.model.llava_arch"].LlavaMetaForCausalLM.prepare_sparse_inputs_labels_for_multimodal
    LlavaLlamaDynamicForCausalLM.prepare_sparse_inputs_labels_for_multimodal = prepare


def sparse_layers(model) -> list[int]:
    return list(model.model.pruning_loc)


def run_sparsevlm(args, questions: list[dict]) -> list[dict]:
    import importlib

    if os.environ.get("USE_VERSION", "1_0") != "1_0":
        raise SystemExit("unset USE_VERSION: the fixtures hold the fork's default mode (SparseVLM+ is USE_VERSION=2_0)")
    stand_ins = CpuStandIns()
    if args.arch == "next":
        install_next_span()
    score = importlib.import_module(SPARSEVLM_SCORE)
    sparse, utils = importlib.import_module(SPARSEVLM_MODEL), importlib.import_module(SPARSEVLM_UTILS)
    released = sparse.attn_postprocess_topk, sparse.cluster_and_merge, utils.index_points
    settings = []
    for retained in SPARSEVLM_SETTINGS:
        score.RETAIN_TOKN = retained  # what RETAIN_TOKN=<n> in the environment sets when score.py is imported
        tokenizer, model, image_processor = load_released_llava(args.checkpoint)
        recorder = SparseVLMRecorder(model, stand_ins, released)
        options = {"retained_tokens": retained, "layers": sparse_layers(model),
                   "keep": list(score.sparse_token_dict[retained])}
        settings.append({"options": options, "noise_seed": SPARSEVLM_SEED, "questions": run_questions(
            model, tokenizer, image_processor, questions, args.image_folder, recorder.record, recorder.reset)})
    return settings


# --- entry point --------------------------------------------------------------------------------------------

RUNNERS = {"visionzip": (run_visionzip, "github.com/dvlab-research/VisionZip"),
           "fastv": (run_fastv, "github.com/pkunlp-icler/FastV"),
           "pdrop": (run_pdrop, "github.com/Cooperx521/PyramidDrop"),
           "prumerge": (run_prumerge, "github.com/42Shawn/LLaVA-PruMerge"),
           "sparsevlm": (run_sparsevlm, "github.com/Gumpest/SparseVLMs")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=sorted(RUNNERS), required=True)
    parser.add_argument("--arch", choices=sorted(LLAVA_MODEL_NAMES), default="v1.5",
                        help="next: LLaVA-NeXT, over the demo questions about NEXT_IMAGES")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--questions", type=Path, required=True)
    parser.add_argument("--image-folder", type=Path, required=True)
    parser.add_argument("--repo", action="append", default=[], help="name=path[@commit] of a released repository")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--work", type=Path, default=Path("/tmp/golden/work"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.repos = {name: Path(path.split("@")[0]) for name, path in (item.split("=", 1) for item in args.repo)}
    args.commits = {name: repository_commit(Path(path)) for name, path in (item.split("=", 1) for item in args.repo)}
    for name in ("checkpoint", "questions", "image_folder", "out", "work"):
        setattr(args, name, getattr(args, name).resolve())
    return args


def fixture_text(fixture: dict) -> str:
    """Indented JSON with every question on one line: small, and a diff shows which question changed."""
    settings = fixture["settings"]
    head = json.dumps({**fixture, "settings": []}, indent=1)[: -len('"settings": []\n}')]
    blocks = []
    for setting in settings:
        rest = {key: value for key, value in setting.items() if key != "questions"}
        lines = [json.dumps(question) for question in setting["questions"]]
        blocks.append(json.dumps(rest)[:-1] + ', "questions": [\n  ' + ",\n  ".join(lines) + "\n ]}")
    return head + '"settings": [\n ' + ",\n ".join(blocks) + "\n]\n}\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if "llava" not in args.repos:
        raise SystemExit("give the LLaVA checkout (PyramidDrop: its own LLaVA fork): --repo llava=PATH")
    args.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if checkpoint_arch(args.checkpoint) != args.arch:
        raise SystemExit(f"--arch {args.arch}, but {args.checkpoint} is a {checkpoint_arch(args.checkpoint)} checkpoint")
    questions = [json.loads(line) for line in args.questions.read_text().splitlines() if line.strip()]
    if args.arch == "next":
        questions = [question for question in questions if question["image"] in NEXT_IMAGES.values()]
    questions = questions[: args.limit]
    runner, repository = RUNNERS[args.method]
    fixture = {
        "method": args.method,
        "arch": args.arch,
        "released": {"repository": repository, "commits": args.commits},
        "environment": environment(),
        "checkpoint": checkpoint_digests(args.checkpoint),
        "conv_mode": CONV_MODE,
        "max_new_tokens": MAX_NEW_TOKENS,
        "made_by": "tools/golden_released.py " + " ".join(sys.argv[1:]),
        "settings": runner(args, questions),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(fixture_text(fixture))
    print(args.out)


if __name__ == "__main__":
    main()
