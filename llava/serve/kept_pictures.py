"""The pictures of what a method kept at each stage, as images the web page can show.

The drawing is `llava.viz`'s (one panel per stage: dropped patches shaded blue, merged windows outlined, key
tokens dotted, each with its legend); here it is only rendered to images instead of PNG files.
"""

from __future__ import annotations

from io import BytesIO

from matplotlib.figure import Figure
from PIL import Image

from llava.viz import PatchGrid, StageView, panels_figure


def figure_image(figure: Figure) -> Image.Image:
    """The figure rendered as it would be saved to a PNG file."""
    buffer = BytesIO()
    figure.savefig(buffer, format="png")
    buffer.seek(0)
    return Image.open(buffer)


def kept_pictures(model_view: list[PatchGrid], stages: list[StageView], method: str) -> list[tuple[Image.Image, str]]:
    """One (picture, caption) per stage, in the order the stages ran."""
    return [(figure_image(panels_figure(model_view, [stage], method)), stage.name) for stage in stages]
