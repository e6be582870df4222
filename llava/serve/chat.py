"""One conversation about one image, answered as LLaVA's chat answers it.

Each turn's prompt is the whole conversation so far in the checkpoint's template, the image's placeholder
in the first user turn, so the text that ranks the vision tokens (MustDrop's dual filter, FastV's
attention, ...) is the conversation's, and the vision stage runs again for every turn.
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image

from llava.conversation import get_conv_template
from llava.eval.answering.answerer import Answer, Answerer
from llava.model.inputs import encode_prompt, with_image


class Chat:
    """The conversation so far and the image it is about; `ask` adds one turn."""

    def __init__(self, answerer: Answerer, image: Image.Image):
        self.answerer = answerer
        self.image = image
        self.conversation = get_conv_template(answerer.conv_mode)

    def ask(self, message: str, on_token: Callable[[int], None] | None = None) -> Answer:
        """The model's answer to `message` after the turns before it; `on_token` hears each token as it is
        decoded. A turn that fails (e.g. the conversation outgrew the context) leaves the conversation as it was."""
        user, assistant = self.conversation.roles
        if not self.conversation.messages:
            message = with_image(message, self.answerer.model.config)
        self.conversation.append_message(user, message)
        self.conversation.append_message(assistant, None)
        try:
            inputs = encode_prompt(self.conversation.get_prompt(), self.conversation.stop_str, self.image,
                                   self.answerer.model, self.answerer.tokenizer, self.answerer.image_processor)
            answer = self.answerer.answer_inputs(inputs, on_token)
        except BaseException:
            del self.conversation.messages[-2:]
            raise
        self.conversation.messages[-1] = (assistant, answer.text)
        return answer
