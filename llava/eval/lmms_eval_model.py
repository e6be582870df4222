"""Every method as an lmms-eval model named `mustdrop`:

    lmms-eval --model mustdrop \\
        --model_args pretrained=checkpoints/llava-v1.5-7b,method=fastv,budget=64,conv_mode=vicuna_v1 \\
        --tasks textvqa_val --batch_size 1

lmms-eval (0.7.x) finds the model through the entry-point group `lmms_eval.models`, which our
pyproject.toml fills with `llava.eval.lmms_plugin:manifests`; lmms-eval imports this module only when a
run asks for `mustdrop`. Install with `pip install -e ".[lmms]"`.

`model_args` are the answering CLIs' flags by their underscore names (`pretrained` is --model-path),
validated by the CLIs' own parser (llava/eval/lmms_args.py); any other key is an option of the method
(what `--method-args` takes, e.g. `method=pdrop,drop_after=1;5;11`). An answer goes through the CLIs' own `Answerer`: the same prompt template, image processing and engine,
so a task whose context is the question file's text gets `model_vqa_loader`'s answers.

Requests: `generate_until` (VQA-style tasks), with the task's `until` strings cutting the answer and
`max_new_tokens`, `temperature`, `top_p`, `num_beams` (1 only) from its generation kwargs. Scoring a
continuation's log-likelihood would put the continuation among the text that ranks the vision tokens,
so what is dropped would depend on the answer being scored: `loglikelihood` and multi-round requests
stop with a clear error instead.

Statistics: each answer's token counts reach lmms-eval's per-sample log (`--log_samples`) under
`token_counts`: `input_tokens` (the prompt as the decoder receives it, after the vision stage and
before any prefill dropping), `output_tokens`, and under `mustdrop` our per-answer statistics (vision tokens per stage, layer-averaged count, KV cache,
FLOPs ratio, times), as the CLIs write them into `metadata`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from llava.eval.answering import loop
from llava.eval.answering.answerer import Answerer
from llava.eval.lmms_args import load_run, sampling_from
from llava.eval.lmms_plugin import MODEL_NAME


def only_image(visuals, task: str, doc_id) -> Image.Image | None:
    """The one image a question may carry (LLaVA answers about one image per prompt)."""
    images = [visual for visual in (visuals or []) if visual is not None]
    if len(images) > 1:
        raise ValueError(f"task {task}, doc {doc_id}: {len(images)} images; our models answer about one image per question")
    if images and not isinstance(images[0], Image.Image):
        raise ValueError(f"task {task}, doc {doc_id}: expected a PIL image, got {type(images[0]).__name__} (video and "
                         "audio are not supported)")
    return images[0].convert("RGB") if images else None


@dataclass
class MustDropCounts(TokenCounts):
    """lmms-eval's per-sample token counts, plus our per-answer statistics under `mustdrop`."""

    stats: dict | None = None

    def to_dict(self) -> dict:
        return {**super().to_dict(), MODEL_NAME: self.stats or {}}


class MustDropLMM(lmms):
    """One loaded checkpoint and one dropping method, answering lmms-eval's generation requests."""

    def __init__(self, batch_size: int | str = 1, max_batch_size: int | None = None, **model_args):
        """`model_args` as lmms-eval parsed them; `batch_size` from its --batch_size (`max_batch_size`, for
        its automatic batch sizes, is not used: a batch is what --batch_size says)."""
        super().__init__()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(f"{MODEL_NAME} runs in one process; use --batch_size N to answer N questions at once")
        self.run = load_run(model_args, int(batch_size))
        self.args, self.drop = self.run.args, self.run.drop
        self.answerers: dict[tuple, Answerer] = {}

    def answerer_for(self, gen_kwargs: dict) -> Answerer:
        """An Answerer for these generation kwargs (one per distinct setting, built once)."""
        sampling, until = sampling_from(gen_kwargs, self.args.max_new_tokens, self.args.seed)
        key = (dataclasses.astuple(sampling), until)
        if key not in self.answerers:
            self.answerers[key] = Answerer(self.run.tokenizer, self.run.model, self.run.image_processor,
                                           self.args.conv_mode, sampling, self.drop, stop_strings=until,
                                           **loop.decode_step_args(self.args))
        return self.answerers[key]

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Each request's answer, in order; requests with the same generation kwargs go `batch_size` at a time."""
        results: list[GenerationResult] = []
        progress = tqdm(total=len(requests), desc=f"{MODEL_NAME} ({self.drop.name})", disable=self.rank != 0)
        for start in range(0, len(requests), self.args.batch_size):
            chunk = requests[start : start + self.args.batch_size]
            for group in same_kwargs_runs(chunk):
                results += self.answer_group(group)
            progress.update(len(chunk))
        progress.close()
        return results

    def answer_group(self, group: list[Instance]) -> list[GenerationResult]:
        questions = []
        for request in group:
            context, _, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
            questions.append((context, only_image(visuals, task, doc_id)))
        answerer = self.answerer_for(group[0].args[1])
        answers = answerer.answer_batch(questions) if len(questions) > 1 else [answerer.answer(*questions[0])]
        return [GenerationResult(answer.text, MustDropCounts(answer.stats.get("prompt_tokens"),
                                                             answer.stats.get("new_tokens"), stats=answer.stats))
                for answer in answers]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(f"{MODEL_NAME} answers generation tasks only: scoring a continuation's "
                                  "log-likelihood is not supported (dropping ranks vision tokens by the text, so the "
                                  "continuation would change what is kept); choose a generate_until task")

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{MODEL_NAME} answers single-turn generation tasks only; multi-round requests "
                                  "are not supported")


def same_kwargs_runs(requests: list[Instance]) -> list[list[Instance]]:
    """Consecutive requests split wherever the generation kwargs change (an Answerer decodes one setting)."""
    runs: list[list[Instance]] = []
    for request in requests:
        if runs and runs[-1][-1].args[1] == request.args[1]:
            runs[-1].append(request)
        else:
            runs.append([request])
    return runs
