"""The conversation templates must render LLaVA's prompts byte for byte."""

import pytest

from llava.conversation import SeparatorStyle, conv_templates, get_conv_template

QUESTION = "<image>\nWhat is shown?"

EXPECTED_ONE_QUESTION = {
    "vicuna_v1": (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions. "
        "USER: <image>\nWhat is shown? ASSISTANT:"
    ),
    "v1": (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions. "
        "USER: <image>\nWhat is shown? ASSISTANT:"
    ),
    "llava_v1": (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions. "
        "USER: <image>\nWhat is shown? ASSISTANT:"
    ),
    "plain": "<image>\nWhat is shown?\n",
    "llava_llama_2": (
        "[INST] <<SYS>>\n"
        "You are a helpful language and vision assistant. You are able to understand the visual "
        "content that the user provides, and assist the user with a variety of tasks using natural "
        "language.\n"
        "<</SYS>>\n\n"
        "<image>\nWhat is shown? [/INST]"
    ),
    "mistral_instruct": "[INST] <image>\nWhat is shown? [/INST]",
    "chatml_direct": (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>"
        "<|im_start|>assistant\n"
    ),
    "qwen": (  # a LLaVA model config: the image on its own line (Qwen's own placement is in tests/test_qwen.py)
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
}


def one_question_prompt(mode: str) -> str:
    conv = get_conv_template(mode)
    conv.append_message(conv.roles[0], QUESTION)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@pytest.mark.parametrize("mode", sorted(EXPECTED_ONE_QUESTION))
def test_one_question_prompt(mode):
    assert one_question_prompt(mode) == EXPECTED_ONE_QUESTION[mode]


def test_every_template_is_covered():
    assert set(conv_templates) == set(EXPECTED_ONE_QUESTION)


def test_two_turn_vicuna():
    conv = get_conv_template("vicuna_v1")
    conv.append_message("USER", "<image>\nWhat is it?")
    conv.append_message("ASSISTANT", "A cat.")
    conv.append_message("USER", "What colour?")
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt() == (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions. "
        "USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: What colour? ASSISTANT:"
    )


def test_two_turn_llama_2_ends_assistant_turn_with_sep2():
    conv = get_conv_template("mistral_instruct")
    conv.append_message("USER", "Hi")
    conv.append_message("ASSISTANT", "Hello")
    conv.append_message("USER", "Bye")
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt() == "[INST] Hi [/INST] Hello </s>[INST] Bye [/INST]"


@pytest.mark.parametrize(
    ("mode", "stop"),
    [
        ("vicuna_v1", "</s>"),
        ("v1", "</s>"),
        ("llava_v1", "</s>"),
        ("plain", "\n"),
        ("llava_llama_2", "<s>"),
        ("mistral_instruct", ""),
        ("chatml_direct", "<|im_end|>"),
    ],
)
def test_stop_str(mode, stop):
    assert get_conv_template(mode).stop_str == stop


def test_separator_styles():
    assert conv_templates["vicuna_v1"].sep_style is SeparatorStyle.TWO
    assert conv_templates["plain"].sep_style is SeparatorStyle.PLAIN
    assert conv_templates["llava_llama_2"].sep_style is SeparatorStyle.LLAMA_2
    assert conv_templates["chatml_direct"].sep_style is SeparatorStyle.MPT


def test_unknown_mode_names_it_and_lists_valid_modes():
    with pytest.raises(ValueError) as excinfo:
        get_conv_template("vicuna_v9")
    message = str(excinfo.value)
    assert "'vicuna_v9'" in message
    for mode in conv_templates:
        assert mode in message


def test_copies_do_not_share_messages():
    first = get_conv_template("vicuna_v1")
    first.append_message("USER", "hello")
    second = get_conv_template("vicuna_v1")
    assert second.messages == []
    assert conv_templates["vicuna_v1"].messages == []

    clone = first.copy()
    clone.append_message("ASSISTANT", None)
    assert len(first.messages) == 1
    assert len(clone.messages) == 2
