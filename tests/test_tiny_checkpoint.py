"""The tiny checkpoint has LLaVA-1.5's file layout, loads with transformers, and is reproducible."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava.model import tiny
from llava.model.random_llava import EOS_ID, IMAGE_SIZE, LLM_LAYERS, PATCH_SIZE, VISION_LAYERS
from llava.model.tiny import (
    COMPLETE_MARKER,
    TINY_SHAPE,
    VISION_TOWER_DIRNAME,
    write_tiny_checkpoint,
)

PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the user's questions. USER: \nWhat is written on "
          "the sign? Answer the question using a single word or phrase. Reference OCR token: SALE, "
          "$12.99 ASSISTANT:")
NEWLINE_BYTE_PIECE_ID = 3 + ord("\n")  # <0x0A>: byte pieces follow <unk>, <s>, </s>
COMMON_FILES = {COMPLETE_MARKER, VISION_TOWER_DIRNAME, "config.json", "generation_config.json",
                "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"}
WEIGHT_FILES = {
    "safetensors": {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                    "model.safetensors.index.json"},
    "bin": {"pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
            "pytorch_model.bin.index.json"},
}
INDEX_FILE = {"safetensors": "model.safetensors.index.json", "bin": "pytorch_model.bin.index.json"}
TOWER_FILES = {"config.json", "model.safetensors", "preprocessor_config.json"}
TENSORS_PER_LAYER = 9
PROJECTOR_TENSORS = 4
GREEDY_TOKENS = 8
UNIFORMITY_RATIO = 4  # CLS attention: the most attended patch gets at least this times the least


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Write each named checkpoint once per module."""
    root = tmp_path_factory.mktemp("tiny")
    built: dict[str, Path] = {}

    def _build(name: str, **kwargs) -> Path:
        if name not in built:
            built[name] = write_tiny_checkpoint(root / name, **kwargs)
        return built[name]

    return _build


@pytest.fixture(scope="module")
def ckpt(build: Callable[..., Path]) -> Path:
    return build("safetensors-seed0")


def _load_weights(model_dir: Path, weights_format: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The index and every tensor of every shard, with the shard file each one came from checked."""
    index = json.loads((model_dir / INDEX_FILE[weights_format]).read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        path = model_dir / shard
        part = load_file(path) if weights_format == "safetensors" else torch.load(path, weights_only=True)
        assert all(index["weight_map"][name] == shard for name in part)
        tensors.update(part)
    return index, tensors


@pytest.mark.parametrize("weights_format", ["safetensors", "bin"])
def test_original_layout_file_names(build: Callable[..., Path], weights_format: str) -> None:
    model_dir = build(f"{weights_format}-seed0", weights_format=weights_format)
    assert {p.name for p in model_dir.iterdir()} == COMMON_FILES | WEIGHT_FILES[weights_format]
    assert {p.name for p in (model_dir / VISION_TOWER_DIRNAME).iterdir()} == TOWER_FILES
    assert not list(model_dir.parent.glob(".*partial*")), "staging directory left behind"


@pytest.mark.parametrize("weights_format", ["safetensors", "bin"])
def test_index_covers_every_tensor(build: Callable[..., Path], weights_format: str) -> None:
    model_dir = build(f"{weights_format}-seed0", weights_format=weights_format)
    index, tensors = _load_weights(model_dir, weights_format)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert len(tensors) == 1 + LLM_LAYERS * TENSORS_PER_LAYER + 1 + PROJECTOR_TENSORS + 1
    assert not any("vision_tower" in name for name in tensors)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    assert tensors["lm_head.weight"].shape == (vocab, TINY_SHAPE.llm_hidden)
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (
        TINY_SHAPE.llm_kv_heads * TINY_SHAPE.llm_head_dim, TINY_SHAPE.llm_hidden)
    assert tensors["model.mm_projector.0.weight"].shape == (TINY_SHAPE.llm_hidden, TINY_SHAPE.vision_hidden)
    assert tensors["model.mm_projector.2.bias"].shape == (TINY_SHAPE.llm_hidden,)


def test_config_matches_weights_and_tokenizer(ckpt: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["LlavaLlamaForCausalLM"]
    assert config["mm_vision_tower"] == VISION_TOWER_DIRNAME
    assert config["mm_projector_type"] == "mlp2x_gelu"
    assert config["vocab_size"] == tiny._sentencepiece_vocab_size((ckpt / "tokenizer.model").read_bytes())
    generation = json.loads((ckpt / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)


def test_same_seed_gives_identical_bytes(build: Callable[..., Path], ckpt: Path) -> None:
    again = build("safetensors-seed0-again")
    other = build("safetensors-seed1", seed=1)
    for name in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "tokenizer.model", f"{VISION_TOWER_DIRNAME}/model.safetensors"]:
        assert (ckpt / name).read_bytes() == (again / name).read_bytes(), name
    for name in ["model-00001-of-00002.safetensors", f"{VISION_TOWER_DIRNAME}/model.safetensors"]:
        assert (ckpt / name).read_bytes() != (other / name).read_bytes(), name
    assert (ckpt / "tokenizer.model").read_bytes() == (other / "tokenizer.model").read_bytes()


def test_bin_and_safetensors_hold_the_same_tensors(build: Callable[..., Path], ckpt: Path) -> None:
    _, from_safetensors = _load_weights(ckpt, "safetensors")
    _, from_bin = _load_weights(build("bin-seed0", weights_format="bin"), "bin")
    assert all(torch.equal(from_safetensors[name], from_bin[name]) for name in from_safetensors)


def test_sentencepiece_training_is_deterministic() -> None:
    """The same tokenizer bytes from a fresh process (its own hash seed and thread timing) as from this one."""
    import subprocess
    import sys

    script = "import sys; from llava.model import tiny; sys.stdout.buffer.write(tiny.train_sentencepiece())"
    other_process = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True,
                                   env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert other_process == tiny.train_sentencepiece()


def test_tokenizer_loads_and_round_trips(ckpt: Path) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert tokenizer.pad_token == "<unk>"
    ids = tokenizer(PROMPT).input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids
    assert NEWLINE_BYTE_PIECE_ID in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
    assert ids[1:] == spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model")).encode(PROMPT)


def test_vision_tower_loads_with_transformers(ckpt: Path) -> None:
    from PIL import Image
    from transformers import CLIPVisionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tower_dir = ckpt / VISION_TOWER_DIRNAME
    processor = CLIPImageProcessorPil.from_pretrained(tower_dir)
    assert processor.size["shortest_edge"] == IMAGE_SIZE
    assert (processor.crop_size["height"], processor.crop_size["width"]) == (IMAGE_SIZE, IMAGE_SIZE)
    image = Image.linear_gradient("L").convert("RGB").resize((400, 300))
    pixels = processor(images=image, return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)

    model = CLIPVisionModel.from_pretrained(tower_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    num_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    assert out.last_hidden_state.shape == (1, num_patches + 1, TINY_SHAPE.vision_hidden)
    assert len(out.hidden_states) == VISION_LAYERS + 1
    assert all(torch.isfinite(h).all() for h in out.hidden_states)
    cls_to_patches = out.attentions[-1][0, :, 0, 1:].mean(0)
    assert cls_to_patches.max() > UNIFORMITY_RATIO * cls_to_patches.min(), "CLS attention is near uniform"


def test_greedy_decoding_varies(ckpt: Path) -> None:
    """The random Llama weights give several different tokens, not EOS at once, and depend on the prompt."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = json.loads((ckpt / "config.json").read_text())
    llama_keys = ["hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                  "num_hidden_layers", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                  "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"]
    model = LlamaForCausalLM(LlamaConfig(**{k: config[k] for k in llama_keys})).eval()
    _, tensors = _load_weights(ckpt, "safetensors")
    llama_tensors = {k: v for k, v in tensors.items() if "mm_projector" not in k}
    model.load_state_dict(llama_tensors, strict=True)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    answers = []
    for question in ["What color is the car?", "How many dogs are there?"]:
        ids = tokenizer(f"USER: {question} ASSISTANT:", return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=GREEDY_TOKENS, do_sample=False)
        answers.append(out[0, ids.shape[1]:].tolist())
    assert all(answer[0] != EOS_ID and len(set(answer)) > 1 for answer in answers)
    assert answers[0] != answers[1]


def test_complete_checkpoint_is_not_rewritten(ckpt: Path) -> None:
    watched = [ckpt / COMPLETE_MARKER, ckpt / "model-00001-of-00002.safetensors", ckpt / "tokenizer.model"]
    before = [p.stat().st_mtime_ns for p in watched]
    assert write_tiny_checkpoint(ckpt) == ckpt
    assert [p.stat().st_mtime_ns for p in watched] == before


def test_incomplete_or_other_settings_are_rebuilt(ckpt: Path, tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    shutil.copytree(ckpt, target)
    (target / COMPLETE_MARKER).unlink()
    (target / "model-00002-of-00002.safetensors").write_bytes(b"truncated")
    write_tiny_checkpoint(target)
    assert (target / COMPLETE_MARKER).is_file()
    for name in ["model-00002-of-00002.safetensors", "model.safetensors.index.json"]:
        assert (target / name).read_bytes() == (ckpt / name).read_bytes()

    write_tiny_checkpoint(target, seed=1)
    assert json.loads((target / COMPLETE_MARKER).read_text())["seed"] == 1
    assert (target / "model-00001-of-00002.safetensors").read_bytes() != (
        ckpt / "model-00001-of-00002.safetensors").read_bytes()


def test_foreign_directory_is_not_deleted(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        write_tiny_checkpoint(target)
    assert (target / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_failed_run_leaves_nothing_marked_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args, **kwargs) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "write_vision_tower", crash)
    with pytest.raises(KeyboardInterrupt):
        write_tiny_checkpoint(tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_bad_choice_names_the_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'npz'"):
        write_tiny_checkpoint(tmp_path, weights_format="npz")


def test_cli_prints_the_directory(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny.main(["--out", str(ckpt)])
    assert capsys.readouterr().out.strip() == str(ckpt)

