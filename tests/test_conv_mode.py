"""`--conv-mode auto`: the checkpoint's own conversation template from its config files, in both layouts;
contradictory or unreadable evidence is refused with one line naming the file."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from llava.conversation import conv_templates
from llava.eval.model_vqa_loader import main as vqa_main
from llava.model.checkpoint_files import CheckpointError
from llava.model.conv_mode import CHATML_MODE, MISTRAL_MODE, VICUNA_MODE, detect_conv_mode
from tests.conftest import cli_args, first_questions

CHECKPOINTS = ("tiny_original", "tiny_hf", "tiny_next_original", "tiny_next_hf")
IM_START = {"content": "<|im_start|>", "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def config_copy(checkpoint: Path, out: Path, edit_config: Callable[[dict], None] | None = None,
                edit_tokenizer: Callable[[dict], None] | None = None) -> Path:
    """The checkpoint's JSON files alone (no weights: auto must not need them), edited as asked."""
    out.mkdir()
    for path in checkpoint.glob("*.json"):
        shutil.copy(path, out / path.name)
    for name, edit in (("config.json", edit_config), ("tokenizer_config.json", edit_tokenizer)):
        if edit is not None:
            content = json.loads((out / name).read_text())
            edit(content)
            (out / name).write_text(json.dumps(content))
    return out


def mistral(config: dict) -> None:
    """What llava-v1.6-mistral-7b (original layout) or llava-v1.6-mistral-7b-hf says about its language model."""
    if "text_config" in config:
        config["text_config"].update(model_type="mistral", architectures=["MistralForCausalLM"])
    else:
        config.update(model_type="llava_mistral", architectures=["LlavaMistralForCausalLM"])


def chatml(tokenizer_config: dict) -> None:
    """llava-v1.6-34b's tokenizer (Nous-Hermes-2-Yi): ChatML's <|im_start|> among its added tokens."""
    tokenizer_config.setdefault("added_tokens_decoder", {})["6"] = IM_START


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_llava_1_5_and_next_vicuna_checkpoints_get_vicuna_v1(request, checkpoint):
    model = request.getfixturevalue(checkpoint)
    assert detect_conv_mode(str(model)) == (VICUNA_MODE, model / "config.json")


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_a_mistral_language_model_gets_mistral_instruct(request, checkpoint, tmp_path):
    model = config_copy(request.getfixturevalue(checkpoint), tmp_path / "m", edit_config=mistral)
    assert detect_conv_mode(str(model)) == (MISTRAL_MODE, model / "config.json")


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_a_chatml_tokenizer_gets_chatml_direct(request, checkpoint, tmp_path):
    model = config_copy(request.getfixturevalue(checkpoint), tmp_path / "m", edit_tokenizer=chatml)
    assert detect_conv_mode(str(model)) == (CHATML_MODE, model / "tokenizer_config.json")


def test_chatml_found_in_a_slow_tokenizers_added_tokens_file(tiny_original, tmp_path):
    model = config_copy(tiny_original, tmp_path / "m")
    (model / "added_tokens.json").write_text(json.dumps({"<|im_start|>": 64000, "<|im_end|>": 64001}))
    assert detect_conv_mode(str(model)) == (CHATML_MODE, model / "added_tokens.json")


def test_the_directory_name_and_chat_template_text_do_not_decide(tiny_next_original, tmp_path):
    def chat_template_only(tokenizer_config: dict) -> None:
        tokenizer_config["chat_template"] = "<|im_start|>{{ message }}"  # text, not a token of the tokenizer

    model = config_copy(tiny_next_original, tmp_path / "llava-v1.6-mistral-7b", edit_tokenizer=chat_template_only)
    assert detect_conv_mode(str(model)).mode == VICUNA_MODE


def test_the_tokenizer_of_model_base_is_read(tiny_original, tmp_path):
    """An original-layout checkpoint over --model-base loads the base's tokenizer, so auto reads that."""
    base = config_copy(tiny_original, tmp_path / "base", edit_tokenizer=chatml)
    model = config_copy(tiny_original, tmp_path / "projector")
    assert detect_conv_mode(str(model), str(base)) == (CHATML_MODE, base / "tokenizer_config.json")


def test_the_modes_auto_picks_are_templates():
    assert {VICUNA_MODE, MISTRAL_MODE, CHATML_MODE} <= set(conv_templates)


def contradictory_architecture(config: dict) -> None:
    config.update(model_type="llava_mistral", architectures=["LlavaLlamaForCausalLM"])


def contradictory_text_config(config: dict) -> None:
    config["text_config"].update(model_type="mistral", architectures=["LlamaForCausalLM"])


def not_a_name(config: dict) -> None:
    config["architectures"] = [7]


@pytest.mark.parametrize("checkpoint,edit_config,edit_tokenizer,fragment", [
    ("tiny_original", contradictory_architecture, None, "config.json disagrees about a Mistral language model "
     "(model_type 'llava_mistral', architectures 'LlavaLlamaForCausalLM')"),
    ("tiny_next_hf", contradictory_text_config, None, "config.json disagrees about a Mistral language model "
     "(text_config.model_type 'mistral', text_config.architectures 'LlamaForCausalLM')"),
    ("tiny_original", not_a_name, None, "config.json: architectures is [7], not a model name"),
    ("tiny_next_original", mistral, chatml, "config.json names a Mistral language model but"),
], ids=["original-layout", "hf-layout", "not-a-name", "mistral-and-chatml"])
def test_contradictory_evidence_is_refused(request, tmp_path, checkpoint, edit_config, edit_tokenizer, fragment):
    model = config_copy(request.getfixturevalue(checkpoint), tmp_path / "m", edit_config, edit_tokenizer)
    with pytest.raises(CheckpointError) as refused:
        detect_conv_mode(str(model))
    message = str(refused.value)
    assert message.startswith("--conv-mode auto: ") and fragment in message and "\n" not in message
    assert str(model / "config.json") in message and "pass --conv-mode" in message


@pytest.mark.parametrize("damage,file,fragment", [
    (lambda model: (model / "tokenizer_config.json").write_text("{not json"), "tokenizer_config.json", "cannot read"),
    (lambda model: (model / "tokenizer_config.json").write_text("[]"), "tokenizer_config.json", "not a JSON object"),
    (lambda model: (model / "tokenizer_config.json").unlink(), "tokenizer_config.json", "not found"),
    (lambda model: (model / "config.json").write_text("{not json"), "config.json", "cannot parse"),
    (lambda model: (model / "config.json").unlink(), "", "has no config.json"),
    (lambda model: (model / "config.json").write_text('{"text_config": "mistral"}'), "config.json",
     "field 'text_config' must be dict, got str 'mistral'"),
], ids=["tokenizer-not-json", "tokenizer-not-object", "tokenizer-missing", "config-not-json", "config-missing",
        "text-config-not-object"])
def test_unreadable_files_are_refused_naming_them(tiny_original, tmp_path, damage, file, fragment):
    model = config_copy(tiny_original, tmp_path / "m")
    damage(model)
    with pytest.raises(CheckpointError) as refused:
        detect_conv_mode(str(model))
    message = str(refused.value)
    assert message.startswith("--conv-mode auto: ") and fragment in message and str(model / file) in message


def test_auto_answers_with_the_resolved_mode_and_resumes_as_that_mode(tiny_original, tmp_path, capsys):
    """The answers' run identity holds vicuna_v1, not auto: the same run resumed with either flag."""
    questions, answers = first_questions(tmp_path, 1), tmp_path / "answers.jsonl"
    auto = cli_args(tiny_original, questions, answers, max_new_tokens=2)
    auto[auto.index("--conv-mode") + 1] = "auto"
    vqa_main(auto)
    printed = capsys.readouterr().out
    assert printed.count("conversation mode:") == 1
    assert f"conversation mode: vicuna_v1 (from {tiny_original / 'config.json'})" in printed
    assert json.loads(answers.read_text())["metadata"]["run"]["conv_mode"] == VICUNA_MODE
    vqa_main(cli_args(tiny_original, questions, answers, max_new_tokens=2))  # explicit vicuna_v1: nothing to do
    assert "all 1 questions already answered" in capsys.readouterr().out


def test_auto_refusal_is_one_error_line_before_anything_is_written(tiny_original, tmp_path):
    model = config_copy(tiny_original, tmp_path / "m", edit_config=contradictory_architecture)
    questions, answers = first_questions(tmp_path, 1), tmp_path / "out" / "answers.jsonl"
    argv = cli_args(model, questions, answers)
    argv[argv.index("--conv-mode") + 1] = "auto"
    with pytest.raises(SystemExit) as stop:
        vqa_main(argv)
    assert str(stop.value.code).startswith("error: --conv-mode auto: ") and "\n" not in str(stop.value.code)
    assert not (tmp_path / "out").exists()
