"""LLaVA-NeXT (v1.6) loading: both tiny layouts become transformers' LlavaNext model with equal weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from llava.mm_utils import load_image
from llava.model import tiny
from llava.model.builder import load_pretrained_model
from llava.model.checkpoint_files import CheckpointError, iter_tensors, weight_files
from llava.model.convert import main as convert_main
from llava.model.geometry import ModelGeometry, geometry_of_model, read_geometry
from llava.model.original_layout import swap_pairs
from llava.model.random_llava import LLM_LAYERS

NEXT_GEOMETRY = ModelGeometry(decoder_layers=LLM_LAYERS, vision_tokens=576, patch_tokens=576,
                              context_length=tiny.NEXT_MAX_POSITIONS, max_crops=4,
                              max_vision_tokens=5 * 576 + 48)  # 2x2 crops + base, one newline per 48-patch row
QUESTION = "\nWhat is the word? ASSISTANT:"
NEW_TOKENS = 3
IMAGE_0_TOKENS = 576 + 40 * 25


def original_tensors(checkpoint) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(weight_files(checkpoint)))


def test_both_layouts_load_as_llava_next(loaded_next_original, loaded_next_hf):
    for _, model, _, context_len in (loaded_next_original, loaded_next_hf):
        assert type(model) is LlavaNextForConditionalGeneration
        assert model.config.image_aspect_ratio == "anyres"
        assert model.config.image_grid_pinpoints == swap_pairs(tiny.NEXT_GRID_PINPOINTS)  # transformers' order
        assert model.config.mm_patch_merge_type == "spatial_unpad"
        assert model.config.mm_use_im_start_end is False
        assert model.config.mm_vision_select_layer == -2
        assert model.model.image_newline.shape == (tiny.TINY_SHAPE.llm_hidden,)
        assert context_len == tiny.NEXT_MAX_POSITIONS


def test_image_processors(loaded_next_original, loaded_next_hf):
    assert type(loaded_next_original[2]) is CLIPImageProcessorPil  # the anyres tiling is done by our own code
    processor = loaded_next_hf[2]
    assert type(processor) is LlavaNextImageProcessorPil
    assert processor.image_grid_pinpoints == swap_pairs(tiny.NEXT_GRID_PINPOINTS)
    assert processor.crop_size == {"height": 336, "width": 336}
    assert list(processor.image_mean) == tiny.CLIP_MEAN


def test_original_weights_land_under_transformers_names(tiny_next_original, loaded_next_original):
    shards = original_tensors(tiny_next_original)
    params = dict(loaded_next_original[1].named_parameters())
    torch.testing.assert_close(params["model.image_newline"], shards["model.image_newline"], rtol=0, atol=0)
    torch.testing.assert_close(params["model.multi_modal_projector.linear_2.weight"],
                               shards["model.mm_projector.2.weight"], rtol=0, atol=0)
    tuned = "model.vision_tower.vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight"
    torch.testing.assert_close(params["model.vision_tower.encoder.layers.3.mlp.fc1.weight"], shards[tuned],
                               rtol=0, atol=0)


def test_fine_tuned_tower_in_the_shards_wins(tiny_next_original, loaded_next_original):
    """v1.6 trained its tower: the copy in the shards, not the stand-alone tower, is what LLaVA runs."""
    stand_alone = load_file(str(tiny_next_original / tiny.VISION_TOWER_DIRNAME / "model.safetensors"))
    loaded = loaded_next_original[1].model.vision_tower.embeddings.patch_embedding.weight
    assert not torch.equal(loaded, stand_alone["vision_model.embeddings.patch_embedding.weight"])


def test_converted_weights_equal_the_original_ones(loaded_next_original, loaded_next_hf):
    converted = loaded_next_hf[1].state_dict()
    original = loaded_next_original[1].state_dict()
    assert set(converted) == set(original)
    for name, tensor in original.items():
        rows = tensor.shape[0]
        torch.testing.assert_close(converted[name][:rows], tensor, rtol=0, atol=0, msg=name)
    vocab = original["lm_head.weight"].shape[0]
    assert converted["lm_head.weight"].shape[0] == -(-(vocab + 2) // 64) * 64  # <image>, <pad>, padded to 64


def test_geometry_of_both_layouts(tiny_next_original, tiny_next_hf, loaded_next_original, loaded_next_hf):
    assert read_geometry(str(tiny_next_original)) == NEXT_GEOMETRY
    assert read_geometry(str(tiny_next_hf)) == NEXT_GEOMETRY
    assert geometry_of_model(loaded_next_original[1]) == NEXT_GEOMETRY
    assert geometry_of_model(loaded_next_hf[1]) == NEXT_GEOMETRY


def test_llava_1_5_geometry_has_no_crops(tiny_original):
    assert read_geometry(str(tiny_original)).max_crops == 0


def test_hf_layout_files(tiny_next_hf):
    config = json.loads((tiny_next_hf / "config.json").read_text())
    assert config["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert config["image_grid_pinpoints"] == swap_pairs(tiny.NEXT_GRID_PINPOINTS)
    assert "mm_patch_merge_type" not in config and "image_aspect_ratio" not in config
    processor = json.loads((tiny_next_hf / "processor_config.json").read_text())
    assert processor["processor_class"] == "LlavaNextProcessor"
    assert processor["image_processor"]["image_grid_pinpoints"] == swap_pairs(tiny.NEXT_GRID_PINPOINTS)


def anyres_pixels(loaded_next_hf, demo_images):
    """The hf checkpoint's anyres processor on a demo image: base image plus K grid crops."""
    processed = loaded_next_hf[2]([load_image(demo_images[0])], return_tensors="pt")
    return processed["pixel_values"], processed["image_sizes"]


def prompt_ids(tokenizer, image_token_id: int, image_tokens: int) -> torch.Tensor:
    """<s> USER: <image> x image_tokens, then the question, as one batch row."""
    before = tokenizer("USER: ").input_ids
    after = tokenizer(QUESTION, add_special_tokens=False).input_ids
    return torch.tensor([before + [image_token_id] * image_tokens + after])


def test_generate_through_transformers_matches_across_layouts(loaded_next_original, loaded_next_hf, demo_images):
    pixel_values, image_sizes = anyres_pixels(loaded_next_hf, demo_images)
    assert pixel_values.shape == (1, 3, 3, 336, 336)  # base image and two crops
    assert image_sizes.tolist() == [[300, 180]]  # (height, width) of the 180 x 300 image
    tokenizer, hf_model = loaded_next_hf[0], loaded_next_hf[1]
    original_model = loaded_next_original[1]
    with torch.no_grad():
        features = original_model.get_image_features(pixel_values, image_sizes).pooler_output[0]
        hf_features = hf_model.get_image_features(pixel_values, image_sizes).pooler_output[0]
    torch.testing.assert_close(hf_features, features, rtol=0, atol=0)
    # 576 base tokens, then the two crops stacked as LLaVA tiles a small tall image (a 24-wide, 48-high
    # grid), cut back to the image's 180:300 aspect (40 rows x 24 columns), a newline after each row
    assert features.shape == (IMAGE_0_TOKENS, tiny.TINY_SHAPE.llm_hidden)

    input_ids = prompt_ids(tokenizer, hf_model.config.image_token_id, features.shape[0])
    with torch.no_grad():
        hf_out = hf_model.generate(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes,
                                   max_new_tokens=NEW_TOKENS, do_sample=False)
        # The original vocabulary has no <image> token (LLaVA splices at id -200), so its ids cannot be
        # embedded: splice the model's own anyres features into the embeddings instead.
        image_positions = input_ids == hf_model.config.image_token_id
        embeds = original_model.get_input_embeddings()(input_ids.masked_fill(image_positions, 0))
        embeds[image_positions] = features
        original_out = original_model.generate(inputs_embeds=embeds, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert hf_out.shape == (1, input_ids.shape[1] + NEW_TOKENS)
    assert original_out.shape == (1, NEW_TOKENS)
    assert hf_out[0, input_ids.shape[1]:].tolist() == original_out[0].tolist()


def test_hf_processor_expands_image_to_the_model_token_count(tiny_next_hf, loaded_next_hf, demo_images):
    processor = LlavaNextProcessor.from_pretrained(tiny_next_hf)
    inputs = processor(images=[load_image(demo_images[0])], text=["USER: <image>" + QUESTION], return_tensors="pt")
    assert (inputs["input_ids"] == loaded_next_hf[1].config.image_token_id).sum().item() == IMAGE_0_TOKENS


def test_prompt_with_the_wrong_image_token_count_is_refused(loaded_next_hf, demo_images):
    pixel_values, image_sizes = anyres_pixels(loaded_next_hf, demo_images)
    tokenizer, model = loaded_next_hf[0], loaded_next_hf[1]
    input_ids = prompt_ids(tokenizer, model.config.image_token_id, 576)
    with pytest.raises(ValueError, match="Image features and image tokens do not match"), torch.no_grad():
        model(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes)


def with_config(checkpoint, tmp_path, **changes):
    """A copy of `checkpoint` whose config.json has `changes` applied."""
    copy = shutil.copytree(checkpoint, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **changes}))
    return copy


@pytest.mark.parametrize("merge_type", ["spatial", "spatial_unpad_anyres_max_9"])
def test_unsupported_merge_type_is_refused(tiny_next_original, tmp_path, merge_type):
    copy = with_config(tiny_next_original, tmp_path, mm_patch_merge_type=merge_type)
    with pytest.raises(CheckpointError, match=f"mm_patch_merge_type '{merge_type}' is not supported"):
        load_pretrained_model(str(copy), device="cpu", torch_dtype="fp32")


def without_newline(checkpoint, tmp_path, **changes):
    """A copy of `checkpoint` (config changed by `changes`) whose shards lack `model.image_newline`."""
    copy = with_config(checkpoint, tmp_path, **changes)
    index_path = copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = copy / index["weight_map"].pop("model.image_newline")
    tensors = load_file(str(shard))
    del tensors["model.image_newline"]
    tiny._save_shard(tensors, shard, "safetensors")
    index_path.write_text(json.dumps(index))
    return copy


def test_missing_newline_is_named(tiny_next_original, tmp_path):
    copy = without_newline(tiny_next_original, tmp_path)
    with pytest.raises(CheckpointError, match="missing weights: model.image_newline"):
        load_pretrained_model(str(copy), device="cpu", torch_dtype="fp32")


def test_flat_merging_needs_no_newline(tiny_next_original, tmp_path):
    """LLaVA only trains a newline for `*unpad*` merging; a flat checkpoint gets an unused zero one."""
    copy = without_newline(tiny_next_original, tmp_path, mm_patch_merge_type="flat")
    _, model, _, _ = load_pretrained_model(str(copy), device="cpu", torch_dtype="fp32")
    assert type(model) is LlavaNextForConditionalGeneration
    assert model.config.mm_patch_merge_type == "flat"
    assert torch.equal(model.model.image_newline, torch.zeros(tiny.TINY_SHAPE.llm_hidden))


def test_convert_cli_writes_a_llava_next_checkpoint(tiny_next_original, tmp_path):
    convert_main(["--model-path", str(tiny_next_original), "--out", str(tmp_path / "hf")])
    tokenizer, model, image_processor, _ = load_pretrained_model(str(tmp_path / "hf"), device="cpu")
    assert type(model) is LlavaNextForConditionalGeneration
    assert type(image_processor) is LlavaNextImageProcessorPil
    assert tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id


def test_cli_marker_records_the_arch(tiny_next_original, capsys):
    tiny.main(["--out", str(tiny_next_original), "--arch", "next"])
    assert capsys.readouterr().out.strip() == str(tiny_next_original)
    marker = json.loads((tiny_next_original / tiny.COMPLETE_MARKER).read_text())
    assert marker == {"layout": "original", "seed": 0, "weights_format": "safetensors", "arch": "next"}
