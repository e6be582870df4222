"""LLaVA's conversation templates, reproduced byte for byte.

Benchmark numbers depend on the exact prompt string the model saw during instruction tuning, so each
template here must render the same text as LLaVA's `conv_templates` for the same messages.
"""

from __future__ import annotations

import dataclasses
from enum import Enum, auto


class SeparatorStyle(Enum):
    """How a template joins the system prompt, role names and messages."""

    TWO = auto()  # "ROLE: message" with alternating separators (Vicuna v1)
    PLAIN = auto()  # messages only, no roles (pre-training captions)
    LLAMA_2 = auto()  # "[INST] ... [/INST]" with an optional <<SYS>> block
    MPT = auto()  # role prefixes carry their own markup (ChatML)


LLAMA_2_SYSTEM_TEMPLATE = "<<SYS>>\n{system}\n<</SYS>>\n\n"
LLAMA_2_INSTRUCTION_TEMPLATE = "[INST] {message} [/INST]"


@dataclasses.dataclass
class Conversation:
    """A system prompt plus alternating (role, message) turns.

    A message that is None (or empty) is the open slot the model fills in: it renders as the bare
    role prompt, exactly as in LLaVA.
    """

    system: str
    roles: tuple[str, str]
    sep_style: SeparatorStyle
    sep: str
    sep2: str | None = None
    messages: list[tuple[str, str | None]] = dataclasses.field(default_factory=list)

    def copy(self) -> Conversation:
        """Return an independent conversation so that templates are never mutated by callers."""
        return dataclasses.replace(self, messages=list(self.messages))

    def append_message(self, role: str, message: str | None) -> None:
        """Add one turn; pass `message=None` for the turn the model should generate."""
        self.messages.append((role, message))

    @property
    def stop_str(self) -> str:
        """The string that ends the assistant's answer (LLaVA's rule: sep2 for TWO, sep otherwise)."""
        if self.sep_style is SeparatorStyle.TWO:
            return self.sep2
        if self.sep_style is SeparatorStyle.MPT:
            return self.sep.rstrip("\n")  # Qwen's turns end "<|im_end|>\n"; the answer ends at "<|im_end|>"
        return self.sep

    def get_prompt(self) -> str:
        """Render the conversation as the exact text the model is prompted with."""
        renderers = {
            SeparatorStyle.TWO: self._render_two,
            SeparatorStyle.PLAIN: self._render_plain,
            SeparatorStyle.LLAMA_2: self._render_llama_2,
            SeparatorStyle.MPT: self._render_mpt,
        }
        return renderers[self.sep_style]()

    def _render_two(self) -> str:
        seps = (self.sep, self.sep2)
        prompt = self.system + self.sep
        for i, (role, message) in enumerate(self.messages):
            if message:
                prompt += f"{role}: {message}{seps[i % 2]}"
            else:
                prompt += f"{role}:"
        return prompt

    def _render_plain(self) -> str:
        return self.system + "".join(message + self.sep for _, message in self.messages if message)

    def _render_llama_2(self) -> str:
        prompt = ""
        for i, (_, message) in enumerate(self.messages):
            if not message:
                continue
            if i == 0 and self.system:
                message = LLAMA_2_SYSTEM_TEMPLATE.format(system=self.system) + message
            if i % 2 == 0:
                prompt += self.sep + LLAMA_2_INSTRUCTION_TEMPLATE.format(message=message)
            else:
                prompt += f" {message} {self.sep2}"
        return prompt.lstrip(self.sep)

    def _render_mpt(self) -> str:
        prompt = self.system + self.sep
        for role, message in self.messages:
            prompt += (role + message + self.sep) if message else role
        return prompt


VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural language."
)

_vicuna_v1 = Conversation(
    system=VICUNA_V1_SYSTEM,
    roles=("USER", "ASSISTANT"),
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)

conv_templates: dict[str, Conversation] = {
    "vicuna_v1": _vicuna_v1,
    "v1": _vicuna_v1,
    "llava_v1": dataclasses.replace(_vicuna_v1, system=LLAVA_V1_SYSTEM),
    "plain": Conversation(system="", roles=("", ""), sep_style=SeparatorStyle.PLAIN, sep="\n"),
    "llava_llama_2": Conversation(
        system=LLAVA_LLAMA_2_SYSTEM,
        roles=("USER", "ASSISTANT"),
        sep_style=SeparatorStyle.LLAMA_2,
        sep="<s>",
        sep2="</s>",
    ),
    "mistral_instruct": Conversation(
        system="",
        roles=("USER", "ASSISTANT"),
        sep_style=SeparatorStyle.LLAMA_2,
        sep="",
        sep2="</s>",
    ),
    "chatml_direct": Conversation(
        system="<|im_start|>system\nAnswer the questions.",
        roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
        sep_style=SeparatorStyle.MPT,
        sep="<|im_end|>",
    ),
    # Qwen2-VL / Qwen2.5-VL's chat template: ChatML with its default system turn, one newline after each turn.
    "qwen": Conversation(
        system="<|im_start|>system\nYou are a helpful assistant.",
        roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
        sep_style=SeparatorStyle.MPT,
        sep="<|im_end|>\n",
    ),
}


def get_conv_template(name: str) -> Conversation:
    """Return a fresh copy of the template registered as `name` (the `--conv-mode` value)."""
    try:
        template = conv_templates[name]
    except KeyError:
        valid = ", ".join(sorted(conv_templates))
        raise ValueError(f"unknown conversation mode {name!r}; valid modes: {valid}") from None
    return template.copy()
