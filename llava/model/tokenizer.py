"""LLaVA's tokenizer: transformers 4.37's slow, SentencePiece-backed `LlamaTokenizer`, on transformers 5.

LLaVA loads its tokenizer with `use_fast=False`. transformers 5 ignores that flag and always builds the
`tokenizers` (Rust) tokenizer, which decodes byte-fallback pieces its own way: the pieces `<0x22><0x95>`
become "\ufffd\ufffd" there but '"\ufffd' in sentencepiece (only the invalid byte is replaced), so answer
texts drift from the authors' code even where the ids agree. Its ids differ too where a text starts with
spaces (" and" after an `<image>`: one "▁" fewer), so it serves neither direction here.
`SentencePieceLlamaTokenizer` reproduces the slow tokenizer on top of transformers' `SentencePieceBackend`;
every piece of text goes through the `sentencepiece` library exactly as 4.37 sent it there:

- encode, `legacy=False` (LLaVA-1.5): the SentencePiece model is loaded with `add_dummy_prefix` off; the
  text gets one "▁" in front (after turning every "▁" in it into a space); it is split on added tokens
  (`<s>`, `<im_start>`, ...); a piece that starts with "▁" or " " is encoded behind "<unk>" and the
  pieces of "<unk>" are dropped again, any other piece is encoded as is; a lone leading "▁" right before a
  special token is dropped. `legacy=True`: the stock model (dummy prefix on), split on added tokens, no
  extra "▁". Then BOS / EOS as `add_bos_token` / `add_eos_token` say (default: BOS only).
- decode: ids of special tokens are dropped when `skip_special_tokens`; the remaining pieces are cut at
  added tokens that are not special, each run is decoded by sentencepiece after removing the "▁" of its
  first piece, and runs and added tokens are joined with single spaces. Special tokens that are kept
  (`skip_special_tokens=False`) are written as their text between sentencepiece runs.

Ids that name no token (the padded rows of an llava-hf vocabulary) decode to nothing; 4.37 raised there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import AddedToken, AutoTokenizer, PreTrainedTokenizerBase
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from llava.model.checkpoint_files import CheckpointError, check_field_types, read_json_object

SPIECE_UNDERLINE = "▁"
SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_JSON_FILES = (TOKENIZER_CONFIG_FILE, "special_tokens_map.json", "added_tokens.json")
VOCABULARY_FILES = (SENTENCEPIECE_FILE, "tokenizer.json", "vocab.json")  # one of them holds the vocabulary
SPECIAL_TOKEN_TYPES = (str, dict, type(None))  # a token's text, or an AddedToken written as a dict
TOKENIZER_FIELD_TYPES = {
    "tokenizer_class": (str, type(None)),
    "add_bos_token": (bool,),
    "add_eos_token": (bool,),
    "legacy": (bool, type(None)),
    "clean_up_tokenization_spaces": (bool,),
    "model_max_length": (int, float),
    **{name: SPECIAL_TOKEN_TYPES for name in ("bos_token", "eos_token", "unk_token", "pad_token")},
}
SAVED_CLASS_NAME = "LlamaTokenizer"  # what other tools (and transformers 4.x) load the saved files with
LLAMA_TOKENIZER_CLASSES = (None, "LlamaTokenizer", "LlamaTokenizerFast")


class SentencePieceLlamaTokenizer(SentencePieceBackend):
    """transformers 4.37's slow `LlamaTokenizer`: ids and texts as LLaVA's own code gets them.

    Configured like 4.37 by the checkpoint's tokenizer_config.json: `legacy` (unset means True),
    `add_bos_token`, `add_eos_token`, `clean_up_tokenization_spaces` and the added tokens.
    """

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token: str | AddedToken = "<unk>",
        bos_token: str | AddedToken = "<s>",
        eos_token: str | AddedToken = "</s>",
        pad_token: str | AddedToken | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        legacy: bool | None = None,
        **kwargs,
    ):
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        special = {"unk_token": unk_token, "bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        for name, token in special.items():
            if isinstance(token, str):
                special[name] = AddedToken(token, normalized=False, special=True)
        super().__init__(
            vocab_file=vocab_file,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            legacy=True if legacy is None else legacy,
            **special,
            **kwargs,
        )

    # --- encode ------------------------------------------------------------------------------------

    def tokenize(self, text: str, **kwargs) -> list[str]:
        """Pieces of `text`; with `legacy=False` the text is prefixed with "▁" (see the module docstring)."""
        if self.legacy or not text:
            return super().tokenize(text, **kwargs)
        pieces = super().tokenize(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "), **kwargs)
        if len(pieces) > 1 and pieces[0] == SPIECE_UNDERLINE and pieces[1] in self.all_special_tokens:
            pieces = pieces[1:]
        return pieces

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        ids = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            ids += bos + token_ids_1 + eos
        return ids

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos, eos = [1] if self.add_bos_token else [], [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    # --- decode ------------------------------------------------------------------------------------

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        spaces_between_special_tokens: bool = True,
        **kwargs,
    ) -> str:
        """4.37's decode: sentencepiece runs between standalone added tokens, joined with spaces."""
        ids = [token_ids] if isinstance(token_ids, int) else [int(index) for index in token_ids]
        size = self.vocab_size
        ids = [index for index in ids if 0 <= index < size or index in self._added_tokens_decoder]
        tokens = self.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)
        specials = set(self.all_special_tokens)
        # added tokens that are not special stand alone (4.37 also counted extra special tokens past the
        # SentencePiece vocabulary here; they only survive when special tokens are kept)
        standalone = {token for token in self._added_tokens_encoder if token not in specials}
        standalone |= {str(token) for token in self._extra_special_tokens
                       if self._added_tokens_encoder.get(str(token), -1) >= size}
        texts, run = [], []
        for token in tokens:
            if token not in standalone:
                run.append(token)
                continue
            if run:
                text = self.convert_tokens_to_string(run)
                if text:
                    texts.append(text)
                run = []
            texts.append(token)
        if run:
            texts.append(self.convert_tokens_to_string(run))
        text = (" " if spaces_between_special_tokens else "").join(texts)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """SentencePiece's text of `tokens`, without the "▁" that encoding put in front of the first one."""
        if not tokens:
            return ""
        tokens = list(tokens)
        if tokens[0].startswith(SPIECE_UNDERLINE):
            tokens[0] = tokens[0][1:]
        specials = set(self.all_special_tokens)
        text, run, previous_special = "", [], False
        for position, token in enumerate(tokens):
            if token in specials:
                if self.legacy and position and not previous_special:
                    text += " "
                text += self.sp_model.decode(run) + token
                run, previous_special = [], True
            else:
                run.append(token)
                previous_special = False
        return text + self.sp_model.decode(run)

    # --- save --------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> tuple[str, ...]:
        """Save like transformers, naming the class `LlamaTokenizer` so other tools can load the files."""
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        config_file = Path(save_directory) / TOKENIZER_CONFIG_FILE
        config = json.loads(config_file.read_text())
        config.update(tokenizer_class=SAVED_CLASS_NAME, add_bos_token=self.add_bos_token,
                      add_eos_token=self.add_eos_token, legacy=self.legacy)
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return saved


def declared_tokenizer_class(model_dir: Path) -> str | None:
    """The `tokenizer_class` of tokenizer_config.json, None when the file or the key is missing."""
    config_file = model_dir / TOKENIZER_CONFIG_FILE
    if not config_file.is_file():
        return None
    return read_json_object(config_file).get("tokenizer_class")


def check_tokenizer_files(model_dir: Path) -> None:
    """Check the tokenizer files a load reads, so that a missing or broken one is named in one line (the
    libraries report it as a chained traceback, or as "install sentencepiece" when the vocabulary is gone)."""
    for name in TOKENIZER_JSON_FILES:
        path = model_dir / name
        if path.exists():
            check_field_types(read_json_object(path), TOKENIZER_FIELD_TYPES if name == TOKENIZER_CONFIG_FILE else {},
                              path)
    if not any((model_dir / name).is_file() for name in VOCABULARY_FILES):
        raise CheckpointError(f"{model_dir} holds no tokenizer vocabulary (none of {', '.join(VOCABULARY_FILES)}); "
                              "download the checkpoint's tokenizer files")


def load_sentencepiece_tokenizer(model_dir: Path) -> SentencePieceLlamaTokenizer:
    try:
        return SentencePieceLlamaTokenizer.from_pretrained(model_dir)
    except (RuntimeError, OSError) as error:  # sentencepiece: "could not parse ModelProto"
        raise CheckpointError(f"cannot read {model_dir / SENTENCEPIECE_FILE} ({error}): it is not a SentencePiece "
                              "model, or truncated; download it again") from None


def load_llava_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer LLaVA's code would use for `model_dir`.

    A Llama tokenizer with a SentencePiece `tokenizer.model` (LLaVA's and llava-hf's checkpoints) gets
    `SentencePieceLlamaTokenizer`, for encoding and decoding alike. Any other checkpoint (no
    tokenizer.model, or another tokenizer class) falls back to transformers' `AutoTokenizer`, which in
    transformers 5 is always the `tokenizers` (fast) one.
    """
    check_tokenizer_files(model_dir)
    if (model_dir / SENTENCEPIECE_FILE).is_file() and declared_tokenizer_class(model_dir) in LLAMA_TOKENIZER_CLASSES:
        return load_sentencepiece_tokenizer(model_dir)
    return AutoTokenizer.from_pretrained(model_dir)
