"""How every CLI of the project reports bad input: one `error:` line and exit code 1, no traceback.

Kept free of heavy imports so that small tools (summaries, reports) start in a blink.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any


class RunError(Exception):
    """A problem with the run's inputs; `main_guard` prints it and exits without a traceback."""


def main_guard(run: Callable[[], Any]) -> None:
    """Run a CLI body; input problems end the program with one clear line instead of a traceback."""
    try:
        run()
    except RunError as error:
        message = f"error: {error}"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Sibling ranks share this stderr, and the interpreter writes an exit message and its newline
            # in two calls, so two ranks' lines could interleave: write the line in one call instead.
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
            sys.exit(1)
        sys.exit(message)
