"""Loading: both checkpoint layouts give the same model; bad checkpoints fail with clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from llava.drop.prefill import build_prompt
from llava.drop.vision import encode_image
from llava.mm_utils import load_image, process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.model.checkpoint_files import CheckpointError
from llava.model.convert import main as convert_main

PROMPT = "A chat between a curious user and an artificial intelligence assistant. USER: <image>\nWhat is the word? ASSISTANT:"


def full_logits(loaded, image) -> torch.Tensor:
    """Logits of every prompt position from transformers' own forward on our spliced embeddings."""
    tokenizer, model, image_processor, _ = loaded
    input_ids = tokenizer_image_token(PROMPT, tokenizer, return_tensors="pt")
    vision = encode_image(model, process_images([image], image_processor))
    with torch.no_grad():
        prompt = build_prompt(model, input_ids, vision)
        return model(inputs_embeds=prompt.embeds).logits[0]


def test_both_layouts_give_identical_logits(loaded_original, loaded_hf, demo_images):
    image = load_image(demo_images[0])
    original = full_logits(loaded_original, image)
    converted = full_logits(loaded_hf, image)
    vocab = original.shape[-1]
    assert converted.shape[-1] >= vocab  # the transformers layout adds <image> and <pad>
    torch.testing.assert_close(converted[:, :vocab], original, rtol=0, atol=0)


def test_same_tokenizer_ids_in_both_layouts(loaded_original, loaded_hf):
    ids_original = tokenizer_image_token(PROMPT, loaded_original[0])
    ids_hf = tokenizer_image_token(PROMPT, loaded_hf[0])
    assert ids_original == ids_hf
    assert ids_original[0] == 1 and ids_original.count(-200) == 1


def test_bin_shards_load_like_safetensors(tmp_path, loaded_original, demo_images):
    from llava.model.tiny import write_tiny_checkpoint

    bin_dir = write_tiny_checkpoint(tmp_path / "bin", weights_format="bin")
    assert (bin_dir / "pytorch_model.bin.index.json").is_file()
    loaded_bin = load_pretrained_model(str(bin_dir), device="cpu", torch_dtype="fp32")
    image = load_image(demo_images[1])
    torch.testing.assert_close(full_logits(loaded_bin, image), full_logits(loaded_original, image), rtol=0, atol=0)


def test_llava_options_are_on_the_config(loaded_original, loaded_hf):
    for _, model, _, context_len in (loaded_original, loaded_hf):
        assert model.config.image_aspect_ratio == "pad"
        assert model.config.mm_use_im_start_end is False
        assert context_len == 2048


def test_converted_checkpoint_loads_in_plain_transformers(tiny_hf):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_hf)
    assert model.config.image_token_id is not None
    assert model.config.vision_feature_layer == -2


def test_convert_cli_writes_a_loadable_checkpoint(tiny_original, tmp_path):
    convert_main(["--model-path", str(tiny_original), "--out", str(tmp_path / "hf")])
    tokenizer, model, _, _ = load_pretrained_model(str(tmp_path / "hf"), device="cpu")
    assert tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_vision_tower_names_it_and_says_what_to_do(tiny_original, tmp_path):
    model_dir = copy_checkpoint(tiny_original, tmp_path / "m")
    shutil.rmtree(model_dir / "clip-vision-tower")
    with pytest.raises(CheckpointError, match=r"clip-vision-tower.*not found locally.*--vision-tower"):
        load_pretrained_model(str(model_dir), device="cpu")


def test_vision_tower_override_and_hub_cache(tiny_original, tmp_path, monkeypatch):
    model_dir = copy_checkpoint(tiny_original, tmp_path / "m")
    tower = model_dir / "clip-vision-tower"
    config = json.loads((model_dir / "config.json").read_text())
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (model_dir / "config.json").write_text(json.dumps(config))
    # --vision-tower wins over the name in config.json
    _, model, _, _ = load_pretrained_model(str(model_dir), device="cpu", vision_tower=str(tower))
    assert len(model.model.vision_tower.encoder.layers) == 24
    # the hub id is found in the local Hugging Face cache (offline)
    cache = tmp_path / "hub"
    snapshot = cache / "models--openai--clip-vit-large-patch14-336" / "snapshots" / "abc123"
    shutil.copytree(tower, snapshot)
    (cache / "models--openai--clip-vit-large-patch14-336" / "refs").mkdir()
    (cache / "models--openai--clip-vit-large-patch14-336" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    _, model, _, _ = load_pretrained_model(str(model_dir), device="cpu")
    assert model.model.vision_tower.embeddings.patch_embedding.weight.shape[0] == 64


def test_missing_weight_file_is_named(tiny_original, tmp_path):
    model_dir = copy_checkpoint(tiny_original, tmp_path / "m")
    (model_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors"):
        load_pretrained_model(str(model_dir), device="cpu")


def test_missing_tensor_is_named(tiny_original, tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = copy_checkpoint(tiny_original, tmp_path / "m")
    shard = model_dir / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    del tensors["lm_head.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing weights: lm_head\.weight"):
        load_pretrained_model(str(model_dir), device="cpu")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained_model(str(tmp_path), device="cpu")
    with pytest.raises(CheckpointError, match="neither a local directory nor in the Hugging Face cache"):
        load_pretrained_model("nobody/no-such-model-xyz", device="cpu")


def test_unknown_dtype(tiny_original):
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        load_pretrained_model(str(tiny_original), device="cpu", torch_dtype="fp8")
