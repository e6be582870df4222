"""One question about one image answered by several methods with one loaded model, as the web page shows them.

Every method answers from the same encoded prompt through `Answerer`, so each answer and its statistics are
the ones `model_vqa_loader` writes for that question and method. What each method kept is traced as
`llava.viz` traces it: the vision stage and prefill once more, without decoding, so the times shown are the
answer's own.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from llava.drop.generate import SamplingConfig
from llava.drop.methods import DropMethod
from llava.eval.answering.answerer import Answer, Answerer
from llava.eval.cli_errors import RunError
from llava.model.geometry import decoder_layer_count, geometry_of_model
from llava.model.inputs import encode_question
from llava.viz import PatchGrid, StageView, check_drawable, picture_grids, trace_stages

# A first answer pays one-off costs (CUDA context, kernel loads, allocator growth); the server pays them
# before its first visitor, so that the unpruned column, which always runs first, is not timed cold.
WARM_UP_QUESTION = "Describe the image."
WARM_UP_IMAGE_SIDE = 64
WARM_UP_TOKENS = 2


@dataclass
class MethodResult:
    method: DropMethod
    answer: Answer
    stages: list[StageView] | None  # what survived each stage; None where llava.viz cannot map it (LLaVA-NeXT)


@dataclass
class Comparison:
    model_view: list[PatchGrid]  # the pictures the tower saw (LLaVA-NeXT: base image and crops), under their grids
    results: list[MethodResult]


class SideBySide:
    """The one loaded model every request shares, and the settings of every answer (template, sampling)."""

    def __init__(self, tokenizer, model, image_processor, conv_mode: str, sampling: SamplingConfig,
                 decode_step: dict | None = None):
        self.tokenizer = tokenizer
        self.model = model
        self.image_processor = image_processor
        self.conv_mode = conv_mode
        self.sampling = sampling
        self.decode_step = decode_step or {}  # Answerer's compile_backend / cuda_graph
        self.num_layers = decoder_layer_count(model)

    def answerer(self, method: DropMethod, sampling: SamplingConfig | None = None) -> Answerer:
        return Answerer(self.tokenizer, self.model, self.image_processor, self.conv_mode, sampling or self.sampling,
                        method, **self.decode_step)

    def check(self, methods: list[DropMethod]) -> None:
        """Refuse a method this model cannot run (a budget it cannot reach, a layer it lacks), as the CLIs do."""
        geometry = geometry_of_model(self.model)
        for method in methods:
            try:
                method.check_model(geometry)
            except ValueError as error:
                raise RunError(f"--method {method.name}: {error}") from None

    def compare(self, image: Image.Image, question: str, methods: list[DropMethod]) -> Comparison:
        """Each method's answer to `question` about `image` and what it kept; a RunError says why not."""
        self.check(methods)
        inputs = encode_question(question, image, self.model, self.tokenizer, self.image_processor, self.conv_mode)
        results = []
        for method in methods:
            try:
                answer = self.answerer(method).answer_inputs(inputs)
            except ValueError as error:  # the prompt is longer than the context, for one
                raise RunError(str(error)) from None
            stages = None
            if self.draws(method):
                stages = trace_stages(self.model, method, inputs.input_ids, inputs.pixel_values, inputs.image_sizes)
            results.append(MethodResult(method, answer, stages))
        model_view = picture_grids(self.model, self.image_processor, inputs.pixel_values, inputs.image_sizes)
        return Comparison(model_view, results)

    def draws(self, method: DropMethod) -> bool:
        """Whether llava.viz can place what `method` keeps on this model's pictures (on LLaVA-NeXT only the
        methods that keep the model's own vision tokens can be)."""
        try:
            check_drawable(method, geometry_of_model(self.model))
        except ValueError:
            return False
        return True

    def warm_up(self) -> None:
        """Answer once, unpruned, a few tokens about a blank image."""
        blank = Image.new("RGB", (WARM_UP_IMAGE_SIDE, WARM_UP_IMAGE_SIDE))
        self.answerer(DropMethod(), SamplingConfig(max_new_tokens=WARM_UP_TOKENS)).answer(WARM_UP_QUESTION, blank)
