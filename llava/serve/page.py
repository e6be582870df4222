"""The web page: an image, a question and the methods to compare in; one column per method out, the unpruned
model's first, each with its answer, what it kept at each stage and what that cost.

Built with Gradio. Its queue runs one request at a time, so the one loaded model never answers two at once,
and the times shown are each answer's alone. A request that cannot be answered shows the one line the CLIs
print (`error: ...`) and the page stays up for the next.
"""

from __future__ import annotations

import html
import sys
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from llava.eval.cli_errors import RunError
from llava.eval.jsonl import read_jsonl
from llava.mm_utils import ImageLoadError, load_image
from llava.serve.kept_pictures import kept_pictures
from llava.serve.page_methods import (
    MUSTDROP,
    PAGE_THRESHOLDS,
    UNPRUNED,
    choosable_methods,
    page_methods,
    setting_label,
)
from llava.serve.result_card import result_card
from llava.serve.side_by_side import Comparison, MethodResult, SideBySide

API_NAME = "compare"  # the endpoint gradio_client calls: /compare
TITLE = "MustDrop: what each method keeps"
DEMO_DIR = Path(__file__).resolve().parents[2] / "playground" / "data" / "eval" / "demo"
DEMO_QUESTION_FILE = DEMO_DIR / "llava_textvqa_demo.jsonl"
DEMO_IMAGE_DIR = DEMO_DIR / "images"
DEFAULT_CHOICES = [MUSTDROP, "fastv"]
EXAMPLES_PER_PAGE = 4
NO_BUDGET = 0  # what the budget field holds when empty (the browser sends 0 for it): each method's own setting
ERROR_TITLE = "Cannot answer"
MODEL_RUNS_AT_ONCE = 1  # the one model answers one request at a time; the others wait in Gradio's queue
# Gradio keeps every picture it serves in its cache folder; a server left running removes them after an hour
CACHE_CLEANUP = (3600, 3600)  # (how often, how old) in seconds
NO_PICTURES = ("*No pictures: this method changes the vision tokens in a way the pictures cannot place on this "
               "checkpoint's images (LLaVA-NeXT's and Qwen's are drawn for the methods that keep the model's own "
               "tokens).*")
# The page works offline (a lab's GPU box): system fonts instead of the default theme's Google Fonts.
SANS_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "monospace"]


@dataclass
class MethodColumn:
    """One method's column; hidden until a request chooses the method."""

    column: gr.Column
    title: gr.Markdown
    answer: gr.Textbox
    pictures: gr.Gallery
    card: gr.Markdown

    def outputs(self) -> list:
        return [self.column, self.title, self.answer, self.pictures, self.card]


def method_column(name: str) -> MethodColumn:
    with gr.Column(visible=False, min_width=320) as column:
        title = gr.Markdown(f"### {name}")
        answer = gr.Textbox(label="answer", interactive=False, lines=2)
        pictures = gr.Gallery(label="what it kept, stage by stage", preview=True, format="png", object_fit="contain")
        card = gr.Markdown()
    return MethodColumn(column, title, answer, pictures, card)


def demo_examples() -> list[list[str]]:
    """[image, question] for each bundled demo image: its TextVQA-style question without the OCR hints."""
    if not DEMO_QUESTION_FILE.is_file():  # an installed package without the repository's playground/
        return []
    return [[str(DEMO_IMAGE_DIR / record["image"]), record["text"].splitlines()[0]]
            for record in read_jsonl(DEMO_QUESTION_FILE)]


def uploaded_image(upload: dict | None):
    """The uploaded file (Gradio's FileData, unopened) as an RGB image; a RunError names the file as the user
    called it."""
    if upload is None:
        raise RunError("upload an image or pick a demo image first")
    path = upload["path"]
    name = upload.get("orig_name") or Path(path).name
    try:
        return load_image(path, name=name)
    except ImageLoadError as error:  # Pillow's reason may name the file too: by its upload path
        raise RunError(str(error).replace(path, name)) from None


def filled_column(result: MethodResult, comparison: Comparison, num_layers: int) -> list:
    """A chosen method's column: shown, its setting, answer, pictures and statistics."""
    name = result.method.name
    card = result_card(result.answer.stats, num_layers)
    if result.stages is None:
        pictures, card = [], f"{NO_PICTURES}\n\n{card}"
    else:
        pictures = kept_pictures(comparison.model_view, result.stages, name)
    return [gr.Column(visible=True), f"### {name}\n{setting_label(result.method)}", result.answer.text, pictures, card]


def column_values(comparison: Comparison, num_layers: int, names: list[str]) -> list:
    """Every column's outputs, in the page's column order: the chosen ones filled and shown, the others hidden."""
    results = {result.method.name: result for result in comparison.results}
    values = []
    for name in names:
        if name in results:
            values += filled_column(results[name], comparison, num_layers)
        else:
            values += [gr.Column(visible=False), f"### {name}", "", [], ""]
    return values


def build_page(side_by_side: SideBySide) -> gr.Blocks:
    """The page, with its one endpoint (/compare), queued."""
    names = [UNPRUNED, *choosable_methods()]

    def compare(upload, question, chosen, budget, keep, global_thr, individual_thr):
        try:
            image = uploaded_image(upload)
            if not question or not question.strip():
                raise RunError("type a question about the image")
            try:
                methods = page_methods(chosen or [], budget or None, global_thr, individual_thr, keep or None)
            except ValueError as error:  # an unknown method, a budget that is no budget
                raise RunError(str(error)) from None
            comparison = side_by_side.compare(image, question.strip(), methods)
        except RunError as error:
            line = f"error: {error}"
            print(line, file=sys.stderr, flush=True)
            raise gr.Error(html.escape(line, quote=False), duration=None, title=ERROR_TITLE,
                           print_exception=False) from None
        return column_values(comparison, side_by_side.num_layers, names)

    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=CACHE_CLEANUP) as page:
        gr.Markdown(f"# {TITLE}\nAsk about an image; each chosen method answers next to the unpruned model, "
                    "with what it kept at each stage and what that saved.")
        question = gr.Textbox(label="question", lines=2, placeholder="What does the sign say?", render=False)
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="image", sources=["upload", "clipboard"], height=320)
                examples = demo_examples()
                if examples:
                    gr.Examples(examples, [image, question], label="demo images", examples_per_page=EXAMPLES_PER_PAGE)
            with gr.Column():
                question.render()
                methods = gr.CheckboxGroup(choosable_methods(), value=DEFAULT_CHOICES,
                                           label="methods (the unpruned model always answers too)")
                budget = gr.Number(value=NO_BUDGET, label="budget",
                                   info="vision tokens per decoder layer on average (e.g. 192, 128, 64); 0: MustDrop "
                                        "at the thresholds below, the others at their defaults")
                keep = gr.Number(value=NO_BUDGET, label="kept share",
                                 info="instead of a budget: the share in (0, 1] of each image's vision tokens to keep "
                                      "(0.111 is 64 of LLaVA-1.5's 576; Qwen's images bring as many tokens as their "
                                      "size gives); 0: none")
                with gr.Row():
                    global_thr = gr.Number(value=PAGE_THRESHOLDS.global_thr, label="MustDrop global threshold")
                    individual_thr = gr.Number(value=PAGE_THRESHOLDS.individual_thr,
                                               label="MustDrop individual threshold")
                run = gr.Button("Compare", variant="primary")
        with gr.Row(equal_height=False):
            columns = [method_column(name) for name in names]
        # preprocess=False: the form's values reach `compare` as sent, the image as the uploaded file's path and
        # name, unopened, so that a file that is no image is refused by the project's loader with the CLIs'
        # message rather than by Gradio's own check.
        run.click(compare, [image, question, methods, budget, keep, global_thr, individual_thr],
                  [component for column in columns for component in column.outputs()], api_name=API_NAME,
                  concurrency_limit=MODEL_RUNS_AT_ONCE, preprocess=False)
    return page.queue()


def theme() -> gr.themes.Base:
    return gr.themes.Default(font=SANS_FONTS, font_mono=MONO_FONTS)
