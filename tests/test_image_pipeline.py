"""Image loading, LLaVA-1.5 padding + CLIP preprocessing, and `<image>`-aware tokenization."""

import importlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import (
    ImageLoadError,
    expand2square,
    load_image,
    mean_color,
    process_images,
    tokenizer_image_token,
)
from llava.model.image_processor import (
    PREPROCESSOR_CONFIG_NAME,
    default_clip_image_processor,
    load_image_processor,
)

IMAGE_SIZE = 336
CLIP_MEAN_COLOR = (122, 116, 104)  # int(m * 255) for OpenAI CLIP's mean
RED = (255, 0, 0)
BACKGROUND = (10, 20, 30)
TOLERANCE = 1e-5


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


# --- expand2square -------------------------------------------------------------------------------


def test_expand2square_wide_image_is_centred_vertically():
    padded = np.asarray(expand2square(Image.new("RGB", (4, 2), RED), BACKGROUND))
    assert padded.shape == (4, 4, 3)
    assert (padded[[0, 3]] == BACKGROUND).all()
    assert (padded[1:3] == RED).all()


def test_expand2square_odd_difference_puts_extra_row_after_image():
    padded = np.asarray(expand2square(Image.new("RGB", (5, 2), RED), BACKGROUND))
    assert padded.shape == (5, 5, 3)
    assert (padded[0] == BACKGROUND).all()  # offset (5 - 2) // 2 == 1
    assert (padded[1:3] == RED).all()
    assert (padded[3:] == BACKGROUND).all()


def test_expand2square_tall_image_is_centred_horizontally():
    padded = np.asarray(expand2square(Image.new("RGB", (2, 5), RED), BACKGROUND))
    assert padded.shape == (5, 5, 3)
    assert (padded[:, 0] == BACKGROUND).all()
    assert (padded[:, 1:3] == RED).all()
    assert (padded[:, 3:] == BACKGROUND).all()


def test_expand2square_keeps_pixels_in_place():
    image = random_image(3, 6)
    padded = np.asarray(expand2square(image, BACKGROUND))
    np.testing.assert_array_equal(padded[:, 1:4], np.asarray(image))


def test_expand2square_returns_square_image_unchanged():
    image = random_image(3, 3)
    assert expand2square(image, BACKGROUND) is image


def test_padding_colour_is_clip_mean():
    assert mean_color(default_clip_image_processor()) == CLIP_MEAN_COLOR


# --- process_images ------------------------------------------------------------------------------


def reference_clip_pixels(image: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """CLIP preprocessing written out by hand, as the PIL-based processor does it.

    The long edge becomes int(size * long / short): truncated, not rounded.
    """
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    resized = np.asarray(image.resize(new_size, resample=Image.Resampling.BICUBIC))
    top = (resized.shape[0] - size) // 2
    left = (resized.shape[1] - size) // 2
    cropped = resized[top : top + size, left : left + size]
    scaled = cropped.astype(np.float64) / 255
    normalised = (scaled - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)
    return normalised.transpose(2, 0, 1)


def test_process_images_pad_matches_reference():
    image = random_image(40, 25)
    pixels = process_images([image], default_clip_image_processor(), "pad")
    assert pixels.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert pixels.dtype == torch.float32
    expected = reference_clip_pixels(expand2square(image, CLIP_MEAN_COLOR))
    np.testing.assert_allclose(pixels[0].numpy(), expected, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("aspect_ratio", ["square", None])
def test_process_images_square_resizes_and_crops(aspect_ratio):
    # 200x130: the long edge becomes int(336 * 200 / 130) = 516 (517 if it were rounded).
    images = [random_image(200, 130, seed=1), random_image(130, 200, seed=2)]
    pixels = process_images(images, default_clip_image_processor(), aspect_ratio)
    assert pixels.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    for got, image in zip(pixels, images):
        np.testing.assert_allclose(got.numpy(), reference_clip_pixels(image), rtol=0, atol=TOLERANCE)


def test_process_images_rejects_unknown_aspect_ratio_and_anyres_without_pinpoints():
    with pytest.raises(ValueError, match="unsupported image_aspect_ratio 'tiles'"):
        process_images([random_image(4, 4)], default_clip_image_processor(), "tiles")
    with pytest.raises(ValueError, match="'anyres'.*needs grid_pinpoints"):
        process_images([random_image(4, 4)], default_clip_image_processor(), "anyres")


def fast_clip_processor_or_skip():
    """The torchvision-based processor, or a skip where torchvision cannot be imported."""
    try:
        importlib.import_module("torchvision")
    except Exception as error:  # a torch/torchvision mismatch raises more than ImportError
        pytest.skip(f"torchvision is not importable here ({error}); the fast CLIP processor needs it")
    from transformers.models.clip.image_processing_clip import CLIPImageProcessor

    return CLIPImageProcessor(**default_clip_image_processor().to_dict())


def test_fast_processor_agrees_with_pil_processor():
    fast = fast_clip_processor_or_skip()
    image = random_image(40, 25)
    slow_pixels = process_images([image], default_clip_image_processor(), "pad")
    fast_pixels = process_images([image], fast, "pad")
    torch.testing.assert_close(fast_pixels, slow_pixels, rtol=0, atol=TOLERANCE)


# --- tokenizer_image_token -----------------------------------------------------------------------

VOCAB = ["<s>", "</s>", "<unk>", "USER", ":", "What", "?", "ASSISTANT", "and"]
ID = {token: index for index, token in enumerate(VOCAB)}
BOS = ID["<s>"]


def tiny_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def ids(text: str) -> list[int]:
    return [ID[token] for token in text.split()]


def test_no_image_placeholder():
    assert tokenizer_image_token("USER : What ?", tiny_tokenizer()) == [BOS, *ids("USER : What ?")]


def test_one_image_placeholder():
    prompt = "USER: <image>\nWhat? ASSISTANT:"
    expected = [BOS, *ids("USER :"), IMAGE_TOKEN_INDEX, *ids("What ? ASSISTANT :")]
    assert tokenizer_image_token(prompt, tiny_tokenizer()) == expected


def test_two_image_placeholders_and_bos_only_at_start():
    prompt = "<image> and <image>\nWhat?"
    got = tokenizer_image_token(prompt, tiny_tokenizer())
    assert got == [BOS, IMAGE_TOKEN_INDEX, ID["and"], IMAGE_TOKEN_INDEX, *ids("What ?")]
    assert got.count(BOS) == 1


def test_custom_sentinel_and_trailing_placeholder():
    got = tokenizer_image_token("What <image>", tiny_tokenizer(), image_token_index=-7)
    assert got == [BOS, ID["What"], -7]


def test_tokenizer_without_bos_gets_none_invented():
    prompt = "USER: <image>\nWhat?"
    expected = [*ids("USER :"), IMAGE_TOKEN_INDEX, *ids("What ?")]
    assert tokenizer_image_token(prompt, tiny_tokenizer(add_bos=False)) == expected


def test_return_tensors_pt_gives_long_batch_of_one():
    got = tokenizer_image_token("USER: <image>\nWhat?", tiny_tokenizer(), return_tensors="pt")
    assert got.dtype == torch.long
    assert got.tolist() == [[BOS, *ids("USER :"), IMAGE_TOKEN_INDEX, *ids("What ?")]]


def test_return_tensors_other_than_pt_rejected():
    with pytest.raises(ValueError, match="'np'"):
        tokenizer_image_token("What?", tiny_tokenizer(), return_tensors="np")


# --- load_image ----------------------------------------------------------------------------------


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (3, 2), (1, 2, 3, 4)).save(path)
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.size == (3, 2)
    assert image.getpixel((0, 0)) == (1, 2, 3)


def test_load_image_missing_file_names_path(tmp_path):
    path = tmp_path / "missing.jpg"
    with pytest.raises(ImageLoadError, match="image not found") as excinfo:
        load_image(path)
    assert str(path) in str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)


def test_load_image_unreadable_file_names_path(tmp_path):
    path = tmp_path / "not_an_image.png"
    path.write_text("plain text, not a PNG")
    with pytest.raises(ImageLoadError, match="cannot read image") as excinfo:
        load_image(path)
    assert str(path) in str(excinfo.value)


def test_load_image_truncated_file_fails_at_load(tmp_path):
    path = tmp_path / "truncated.png"
    random_image(64, 64).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageLoadError, match="cannot read image"):
        load_image(path)


# --- load_image_processor ------------------------------------------------------------------------


def test_load_image_processor_round_trip(tmp_path):
    default_clip_image_processor().save_pretrained(tmp_path)
    loaded = load_image_processor(tmp_path)
    assert type(loaded) is type(default_clip_image_processor())
    assert loaded.size.shortest_edge == IMAGE_SIZE
    assert (loaded.crop_size.height, loaded.crop_size.width) == (IMAGE_SIZE, IMAGE_SIZE)
    image = random_image(30, 50)
    expected = process_images([image], default_clip_image_processor())
    torch.testing.assert_close(process_images([image], loaded), expected, rtol=0, atol=0)


def test_load_image_processor_reads_openai_clip_tower_config(tmp_path):
    # openai/clip-vit-large-patch14-336 predates the dict form of `size` and `crop_size`.
    config = {
        "crop_size": IMAGE_SIZE,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "resample": 3,
        "size": IMAGE_SIZE,
    }
    (tmp_path / PREPROCESSOR_CONFIG_NAME).write_text(json.dumps(config))
    loaded = load_image_processor(tmp_path)
    image = random_image(30, 50)
    got = process_images([image], loaded, "square")[0].numpy()
    np.testing.assert_allclose(got, reference_clip_pixels(image), rtol=0, atol=TOLERANCE)


def test_load_image_processor_missing_config_names_dir_and_file(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        load_image_processor(tmp_path)
    assert str(tmp_path) in str(excinfo.value)
    assert PREPROCESSOR_CONFIG_NAME in str(excinfo.value)
