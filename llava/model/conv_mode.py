"""`--conv-mode auto`: the conversation template a checkpoint was instruction-tuned with, from its config files.

LLaVA's v1.6 checkpoints were tuned with different templates, and a wrong one silently costs accuracy:
`llava-v1.6-vicuna-7b/13b` (and every LLaVA-1.5 checkpoint) use `vicuna_v1`, `llava-v1.6-mistral-7b`
uses `mistral_instruct`, and `llava-v1.6-34b` (Nous-Hermes-2-Yi, whose tokenizer speaks ChatML) uses
`chatml_direct`. The rule reads only `config.json` and the tokenizer's JSON files, so it runs before
any weight loads, and it never looks at the directory name (a renamed copy gets the same answer):

- the language model is Mistral (original layout: `model_type` / `architectures`, e.g. `llava_mistral`,
  `LlavaMistralForCausalLM`; transformers layout: `text_config.model_type` / `.architectures`)
  -> `mistral_instruct`;
- the tokenizer's special or added tokens include `<|im_start|>` -> `chatml_direct`;
- otherwise `vicuna_v1`.

A Qwen2-VL / Qwen2.5-VL checkpoint (`model_type` `qwen2_vl` / `qwen2_5_vl`) gets `qwen`, its chat template.

Contradictory evidence (config fields that disagree about Mistral, or a Mistral model with a ChatML
tokenizer) or an unreadable file is refused with one line naming the file: pass --conv-mode instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from llava.model.builder import read_config, resolve_model_dir
from llava.model.checkpoint_files import CheckpointError
from llava.model.original_layout import is_original_layout
from llava.model.qwen import QWEN_CONV_MODE, is_qwen_config

AUTO_CONV_MODE = "auto"
VICUNA_MODE = "vicuna_v1"
MISTRAL_MODE = "mistral_instruct"
CHATML_MODE = "chatml_direct"
MISTRAL_NAME = "mistral"  # in a model_type or architecture name, any case
CHATML_TOKEN = "<|im_start|>"
CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Older (slow) tokenizers also keep their added and special tokens in these, when present.
ADDED_TOKENS_FILE = "added_tokens.json"  # {token: id}
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"  # {name: token or AddedToken dict}
TOKEN_LIST_KEYS = ("added_tokens_decoder", "additional_special_tokens", "extra_special_tokens")
LANGUAGE_MODEL_KEYS = ("model_type", "architectures")
ESCAPE_HINT = "pass --conv-mode vicuna_v1, mistral_instruct or chatml_direct"


class ConvModeChoice(NamedTuple):
    """The chosen template and the file whose fields decided it (printed, so the user can check)."""

    mode: str
    source: Path


def detect_conv_mode(model_path: str, model_base: str | None = None) -> ConvModeChoice:
    """The conversation mode `model_path` calls for (see the module docstring); CheckpointError if unsure.

    With `model_base` (an original-layout checkpoint on top of a base model) the tokenizer is the
    base's, as the loader takes it from there.
    """
    model_dir = resolve_model_dir(model_path)
    try:
        config = read_config(model_dir)
    except CheckpointError as error:
        raise CheckpointError(f"--conv-mode auto: {error}") from None
    config_path = model_dir / CONFIG_FILE
    if is_qwen_config(config):
        return ConvModeChoice(QWEN_CONV_MODE, config_path)
    original = is_original_layout(config)
    tokenizer_dir = resolve_model_dir(model_base) if model_base and original else model_dir
    is_mistral = mistral_language_model(language_model_fields(config, original), config_path)
    chatml_file = file_with_chatml_token(tokenizer_dir)
    if is_mistral and chatml_file is not None:
        raise CheckpointError(f"--conv-mode auto: {config_path} names a Mistral language model but {chatml_file} "
                              f"has the ChatML token {CHATML_TOKEN}; {ESCAPE_HINT}")
    if is_mistral:
        return ConvModeChoice(MISTRAL_MODE, config_path)
    if chatml_file is not None:
        return ConvModeChoice(CHATML_MODE, chatml_file)
    return ConvModeChoice(VICUNA_MODE, config_path)


def language_model_fields(config: dict, original: bool) -> dict[str, object]:
    """The config fields that name the language model: the top level of an original-layout config (LLaVA
    subclasses the LM's config), `text_config` of a transformers one (its top level says only llava_next;
    `read_config` has checked that it is an object)."""
    if original:
        section, prefix = config, ""
    else:
        section, prefix = config.get("text_config") or {}, "text_config."
    return {prefix + key: section[key] for key in LANGUAGE_MODEL_KEYS if key in section}


def mistral_language_model(fields: dict[str, object], config_path: Path) -> bool:
    """Whether the named models are Mistral; names that disagree, or values that are not names, are
    refused rather than outvoted (null counts as absent, as transformers writes it for unset fields)."""
    names = []
    for key, value in fields.items():
        values = value if isinstance(value, list) else [value]
        if value is not None and not (values and all(isinstance(name, str) for name in values)):
            raise CheckpointError(f"--conv-mode auto: {config_path}: {key} is {value!r}, not a model name; "
                                  f"{ESCAPE_HINT}")
        names += [(key, name) for name in values if name is not None]
    verdicts = {MISTRAL_NAME in name.lower() for _, name in names}
    if len(verdicts) > 1:
        shown = ", ".join(f"{key} {name!r}" for key, name in names)
        raise CheckpointError(f"--conv-mode auto: {config_path} disagrees about a Mistral language model "
                              f"({shown}); {ESCAPE_HINT}")
    return verdicts == {True}


def file_with_chatml_token(tokenizer_dir: Path) -> Path | None:
    """The first tokenizer file whose special or added tokens include <|im_start|>, else None.

    tokenizer_config.json must be there and readable (every LLaVA checkpoint ships one): without it
    there is no telling a ChatML tokenizer from another.
    """
    config_path = tokenizer_dir / TOKENIZER_CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"--conv-mode auto: {config_path} not found, so the tokenizer's special tokens "
                              f"are unknown; {ESCAPE_HINT}")
    candidates = [config_path, tokenizer_dir / ADDED_TOKENS_FILE, tokenizer_dir / SPECIAL_TOKENS_MAP_FILE]
    for path in candidates:
        if path.is_file() and CHATML_TOKEN in special_tokens(path):
            return path
    return None


def special_tokens(path: Path) -> set[str]:
    """Every special or added token a tokenizer JSON file names (not its chat template or other text)."""
    content = read_json_object(path)
    if path.name == ADDED_TOKENS_FILE:
        return set(content)
    if path.name == SPECIAL_TOKENS_MAP_FILE:
        fields = list(content.values())
    else:
        fields = [value for key, value in content.items() if key in TOKEN_LIST_KEYS or key.endswith("_token")]
    return {token for field in fields for token in token_strings(field)}


def token_strings(value: object) -> Iterator[str]:
    """The token texts in one field: a string, an AddedToken dict ({"content": ...}), or lists and maps of them."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict) and isinstance(value.get("content"), str):
        yield value["content"]
    elif isinstance(value, dict):
        for item in value.values():
            yield from token_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from token_strings(item)


def read_json_object(path: Path) -> dict:
    """A tokenizer JSON file's top-level object; anything else is refused, naming the file."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"--conv-mode auto: cannot read {path} ({error}); {ESCAPE_HINT}") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"--conv-mode auto: {path} is not a JSON object; {ESCAPE_HINT}")
    return content
