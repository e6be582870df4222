"""Prompt ids and answer texts equal those of LLaVA's tokenizer (transformers 4.37's slow LlamaTokenizer).

The reference below is written straight on `sentencepiece`, following the 4.37 rules for a
`legacy=False` checkpoint (LLaVA-1.5's): the model is loaded with `add_dummy_prefix` off; encoding puts
one "▁" in front of the text, splits it on added tokens, encodes each "▁"/" "-led part behind "<unk>"
(whose pieces are then dropped) and drops a lone leading "▁" before a special token; decoding drops
special ids and the "▁" of the first piece and lets sentencepiece write the rest. It shares no code
with llava/model/tokenizer.py.
"""

from __future__ import annotations

import random
import re

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import get_conv_template
from llava.drop.generate import SamplingConfig, generate
from llava.eval.answering.answerer import Answerer
from llava.mm_utils import load_image, process_images, tokenizer_image_token
from llava.model.builder import load_tokenizer
from llava.model.tokenizer import SentencePieceLlamaTokenizer, load_llava_tokenizer

SPIECE = "▁"
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
IM_START_END = {"mm_use_im_patch_token": False, "mm_use_im_start_end": True}
NO_EXTRA_TOKENS = {"mm_use_im_patch_token": False, "mm_use_im_start_end": False}
IM_START_END_IMAGE = "<im_start><image><im_end>"
RANDOM_SEQUENCES = 300
MAX_RANDOM_LENGTH = 20
ANSWER_TOKENS = 12
QUESTIONS = ["What is the word?", "Describe the café and its 中文 sign 😀.", "How many letters are there?"]
TEXTS = ["café", "中文", "😀 emoji", "naïve Ünïcödé, 中文 and 😀 mixed", " leading space", "  two spaces",
         "trailing space ", "line\nbreak", "tab\there", "$12.99 and 2019", "▁already marked", "x</s> y <s>z"]
BYTE_FALLBACK = [  # piece sequences, several of them not valid UTF-8
    ["<0x22>", "<0x95>"],
    ["<0xE4>", "<0xB8>"],  # the first two of the three bytes of 中
    ["<0xC3>"],
    ["<0xF0>", "<0x9F>", "<0x98>"],
    ["<0xE4>", "<0xB8>", "<0xAD>", "<0xFF>", "<0x41>"],
    ["▁H", "<0xFF>", "ell", "<0x95>", "▁W"],
    ["<0x0A>", "<0x95>", "<0x95>", "<0x22>"],
]


# --- the independent reference ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def sp(tiny_original) -> spm.SentencePieceProcessor:
    """The checkpoint's SentencePiece model with add_dummy_prefix off, as 4.37 loads it for legacy=False."""
    proto = sentencepiece_model_pb2.ModelProto.FromString((tiny_original / "tokenizer.model").read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def reference_encode(sp: spm.SentencePieceProcessor, text: str, added: dict[str, int]) -> list[int]:
    """4.37 `tokenizer(text, add_special_tokens=False).input_ids`; every added token here is special."""
    if not text:
        return []
    added = {BOS: sp.bos_id(), EOS: sp.eos_id(), UNK: sp.unk_id(), **added}
    split = re.compile("(" + "|".join(map(re.escape, sorted(added, key=len, reverse=True))) + ")")
    pieces = []
    for part in split.split(SPIECE + text.replace(SPIECE, " ")):
        if part in added:
            pieces.append(part)
        elif part.startswith((SPIECE, " ")):
            pieces += sp.encode(UNK + part, out_type=str)[len(sp.encode(UNK)):]
        elif part:
            pieces += sp.encode(part, out_type=str)
    if len(pieces) > 1 and pieces[0] == SPIECE and pieces[1] in added:
        pieces = pieces[1:]
    return [added[piece] if piece in added else sp.piece_to_id(piece) for piece in pieces]


def reference_prompt_ids(sp: spm.SentencePieceProcessor, prompt: str, added: dict[str, int]) -> list[int]:
    """LLaVA's tokenizer_image_token: BOS, then the chunks around <image> joined by the image sentinel."""
    chunks = [reference_encode(sp, chunk, added) for chunk in prompt.split("<image>")]
    ids = [sp.bos_id(), *chunks[0]]
    for chunk in chunks[1:]:
        ids += [IMAGE_TOKEN_INDEX, *chunk]
    return ids


def reference_decode(sp: spm.SentencePieceProcessor, ids: list[int], special_ids: set[int]) -> str:
    """4.37 `decode(ids, skip_special_tokens=True)` when every added token is special."""
    pieces = [sp.id_to_piece(index) for index in ids if index not in special_ids]
    if pieces and pieces[0].startswith(SPIECE):
        pieces[0] = pieces[0][1:]
    return sp.decode(pieces)


def vicuna_prompt(question: str, image_tokens: str | None) -> str:
    conversation = get_conv_template("vicuna_v1")
    conversation.append_message(conversation.roles[0], (image_tokens + "\n" if image_tokens else "") + question)
    conversation.append_message(conversation.roles[1], None)
    return conversation.get_prompt()


# --- the tokenizers under test ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tiny_original):
    return load_tokenizer(tiny_original, NO_EXTRA_TOKENS)


@pytest.fixture(scope="module")
def tokenizer_im_start_end(tiny_original):
    return load_tokenizer(tiny_original, IM_START_END)


def special_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids)


def test_llama_checkpoints_get_the_sentencepiece_tokenizer(tokenizer, loaded_original, loaded_hf):
    assert type(tokenizer) is SentencePieceLlamaTokenizer
    assert type(loaded_original[0]) is SentencePieceLlamaTokenizer
    assert type(loaded_hf[0]) is SentencePieceLlamaTokenizer  # the converted checkpoint ships tokenizer.model
    assert (tokenizer.legacy, tokenizer.add_bos_token, tokenizer.add_eos_token) == (False, True, False)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert tokenizer.pad_token == UNK


# --- (1) byte fallback -----------------------------------------------------------------------------

@pytest.mark.parametrize("pieces", BYTE_FALLBACK, ids=lambda pieces: "".join(pieces))
def test_byte_fallback_pieces_decode_like_sentencepiece(tokenizer, sp, pieces):
    ids = [sp.piece_to_id(piece) for piece in pieces]
    assert tokenizer.decode(ids, skip_special_tokens=True) == reference_decode(sp, ids, special_ids(tokenizer))


def test_an_invalid_byte_only_replaces_itself(tokenizer, sp):
    ids = [sp.piece_to_id("<0x22>"), sp.piece_to_id("<0x95>")]
    assert tokenizer.decode(ids, skip_special_tokens=True) == '"\ufffd'  # the fast tokenizer writes "\ufffd\ufffd"


def test_random_id_sequences_decode_like_sentencepiece(tokenizer, sp):
    """Any mix of word pieces, byte pieces and special ids, with and without skip_special_tokens."""
    rng = random.Random(0)
    for _ in range(RANDOM_SEQUENCES):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, MAX_RANDOM_LENGTH))]
        assert tokenizer.decode(ids, skip_special_tokens=True) == reference_decode(sp, ids, special_ids(tokenizer))


def test_kept_special_tokens_are_written_as_text(tokenizer, sp):
    """Only the very first piece loses its "▁": after a leading <s> the space stays (4.37 did the same)."""
    ids = [1, *reference_encode(sp, "Hi there", {}), 2]
    assert tokenizer.decode(ids) == BOS + sp.decode(ids[1:-1]) + EOS == "<s> Hi there</s>"


# --- (2) non-ASCII text and whitespace round trips ----------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_text_encodes_and_decodes_like_sentencepiece(tokenizer, sp, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids == reference_encode(sp, text, {})
    assert tokenizer(text).input_ids == [sp.bos_id(), *ids]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == reference_decode(sp, ids, special_ids(tokenizer))
    if BOS not in text and EOS not in text:
        assert decoded == text.replace(SPIECE, " ")


def test_config_without_legacy_flag_gets_the_legacy_rules(tiny_original):
    """4.37 read a missing `legacy` as True: the stock model (dummy prefix on) encodes the text as is."""
    stock = spm.SentencePieceProcessor(model_file=str(tiny_original / "tokenizer.model"))
    legacy = SentencePieceLlamaTokenizer(vocab_file=str(tiny_original / "tokenizer.model"))
    assert legacy.legacy is True
    for text in [text for text in TEXTS if not text.startswith((" ", SPIECE)) and "<" not in text]:
        ids = legacy(text, add_special_tokens=False).input_ids
        assert ids == stock.encode(text)
        assert legacy.decode(ids, skip_special_tokens=True) == stock.decode(ids) == text


def test_special_ids_inside_an_answer_are_skipped(tokenizer, sp):
    first, second = reference_encode(sp, "café 中文", {}), reference_encode(sp, "and 😀", {})
    ids = [1, *first, 2, 0, *second, 2]
    assert tokenizer.decode(ids, skip_special_tokens=True) == reference_decode(sp, ids, special_ids(tokenizer))
    assert tokenizer.decode(ids, skip_special_tokens=True) == "café 中文 and 😀"


# --- (3) prompt ids ------------------------------------------------------------------------------------

@pytest.mark.parametrize("question", [*QUESTIONS, " leading space?", "Line one\nline two: ¿qué?"])
@pytest.mark.parametrize("image_tokens", [None, "<image>", IM_START_END_IMAGE])
def test_prompt_ids_equal_sentencepiece_reference(tokenizer, tokenizer_im_start_end, sp, question, image_tokens):
    under_test, added = tokenizer, {}
    if image_tokens == IM_START_END_IMAGE:
        under_test = tokenizer_im_start_end
        added = {token: under_test.convert_tokens_to_ids(token) for token in ("<im_start>", "<im_end>")}
    prompt = vicuna_prompt(question, image_tokens)
    assert tokenizer_image_token(prompt, under_test) == reference_prompt_ids(sp, prompt, added)


def test_prompt_with_two_images_has_one_bos(tokenizer, sp):
    prompt = "USER: <image> and <image>\nWhich one? ASSISTANT:"
    ids = tokenizer_image_token(prompt, tokenizer)
    assert ids == reference_prompt_ids(sp, prompt, {})
    assert ids.count(sp.bos_id()) == 1 and ids.count(IMAGE_TOKEN_INDEX) == 2


def test_both_layouts_tokenize_and_decode_alike(loaded_original, loaded_hf, sp):
    original, converted = loaded_original[0], loaded_hf[0]
    prompt = vicuna_prompt(QUESTIONS[1], "<image>")
    assert tokenizer_image_token(prompt, original) == tokenizer_image_token(prompt, converted)
    ids = [index for index in range(len(original)) if index not in special_ids(original)]
    assert converted.decode(ids, skip_special_tokens=True) == original.decode(ids, skip_special_tokens=True)
    image_id = converted.convert_tokens_to_ids("<image>")
    assert converted.decode([image_id, *ids[:5]], skip_special_tokens=True) == reference_decode(sp, ids[:5], set())


# --- (4) answer texts --------------------------------------------------------------------------------

@pytest.mark.parametrize("loaded_name", ["loaded_original", "loaded_hf"])
def test_answer_text_is_the_sentencepiece_decode_of_its_ids(request, loaded_name, sp, demo_images):
    tokenizer, model, image_processor, _ = request.getfixturevalue(loaded_name)
    sampling = SamplingConfig(max_new_tokens=ANSWER_TOKENS)
    answerer = Answerer(tokenizer, model, image_processor, "vicuna_v1", sampling)
    for image_path, question in zip(demo_images, QUESTIONS):
        image = load_image(image_path)
        answer = answerer.answer(question, image)
        input_ids = tokenizer_image_token(answer.prompt, tokenizer, return_tensors="pt")
        pixel_values = process_images([image], image_processor)
        ids = generate(model, input_ids, pixel_values, sampling, answerer.eos_token_ids).token_ids
        assert answer.text == reference_decode(sp, ids, special_ids(tokenizer)).strip()


@pytest.mark.parametrize("pieces", BYTE_FALLBACK, ids=lambda pieces: "".join(pieces))
def test_byte_fallback_answer_text_is_the_sentencepiece_decode(monkeypatch, loaded_original, sp, pieces):
    """The tiny model rarely emits byte pieces, so the answer path is fed chosen ids (ending in EOS)."""
    from llava.drop.generate import GenerationOutput
    from llava.eval.answering import answerer

    tokenizer, model, image_processor, _ = loaded_original
    ids = [*reference_encode(sp, "The word", {}), *map(sp.piece_to_id, pieces), sp.eos_id()]

    def generate_these_ids(model, requests, sampling, eos_token_ids, drop, compile_backend, cuda_graph):
        assert not any(requests[0].should_stop(ids[:end]) for end in range(1, len(ids) + 1))
        return [GenerationOutput(token_ids=ids)]

    monkeypatch.setattr(answerer, "generate_batch", generate_these_ids)
    answer = Answerer(tokenizer, model, image_processor, "vicuna_v1", SamplingConfig()).answer("Word?", None)
    assert answer.text == reference_decode(sp, ids, special_ids(tokenizer)).strip()


# --- saving and the fallback -------------------------------------------------------------------------

def test_saved_tokenizer_reloads_identically(tokenizer_im_start_end, sp, tmp_path):
    tokenizer_im_start_end.save_pretrained(tmp_path)
    reloaded = load_llava_tokenizer(tmp_path)
    assert type(reloaded) is SentencePieceLlamaTokenizer and len(reloaded) == len(tokenizer_im_start_end)
    prompt = vicuna_prompt(QUESTIONS[1], IM_START_END_IMAGE)
    assert tokenizer_image_token(prompt, reloaded) == tokenizer_image_token(prompt, tokenizer_im_start_end)
    assert reloaded.all_special_ids == tokenizer_im_start_end.all_special_ids


def test_checkpoint_without_sentencepiece_model_falls_back_to_auto_tokenizer(tiny_original, tmp_path):
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_original).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").unlink(missing_ok=True)
    assert type(load_llava_tokenizer(tmp_path)) is not SentencePieceLlamaTokenizer
