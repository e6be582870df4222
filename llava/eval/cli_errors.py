"""How every CLI of the project reports bad input: one `error:` line and exit code 1, no traceback; and
Ctrl-C: one `interrupted:` line (what is kept, how to resume) and exit code 130, as a shell reports it.

Kept free of heavy imports so that small tools (summaries, reports) start in a blink.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, TypeVar

METHOD_ARGS_FLAG = "--method-args"
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT  # 130, what a shell reports for a Ctrl-C'd command
PARENT_REPORTS_INTERRUPT = "LLAVA_PARENT_REPORTS_INTERRUPT"  # set for the runner's per-GPU processes
RERUN_HINT = "run the same command again"
RESUME_HINT = f"{RERUN_HINT} to resume"
Main = TypeVar("Main", bound=Callable[..., Any])


class RunError(Exception):
    """A problem with the run's inputs; `main_guard` prints it and exits without a traceback."""


class Interrupted(RunError):
    """Ctrl-C during a run, saying what it keeps and how to resume; `main_guard` exits with 130 on it."""


class CtrlCWatch:
    """Remembers that a Ctrl-C arrived, and raises KeyboardInterrupt as Python's own handler does. Code in C
    that probes a Python object (torch's loader and `torch.tensor` among them) may swallow that
    KeyboardInterrupt and raise an error of its own instead ("could not determine the shape of object type
    ..."), which would then read as bad input: `main_guard` asks `seen` before reporting an error."""

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, signum, frame) -> None:
        self.seen = True
        signal.default_int_handler(signum, frame)

    def install(self) -> None:
        """Watch Ctrl-C from here on, unless the CLI has a handler of its own (or runs off the main thread)."""
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, self)


CTRL_C = CtrlCWatch()


def main_guard(run: Callable[[], Any]) -> None:
    """Run a CLI body; input problems end the program with one clear line instead of a traceback, and so
    does a Ctrl-C that the run turned into `Interrupted` (a bare one is `interruptible`'s, or the CLI's own).
    An error raised after a Ctrl-C, whatever its type, is reported as the Ctrl-C it came from."""
    CTRL_C.install()
    try:
        run()
    except Interrupted as error:
        exit_interrupted(str(error))
    except Exception as error:
        if CTRL_C.seen:
            exit_interrupted(f"stopped; {RERUN_HINT}")
        if not isinstance(error, RunError):
            raise
        message = f"error: {error}"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            write_line(message)
            sys.exit(1)
        sys.exit(message)


def interruptible(main: Main) -> Main:
    """A CLI's `main` with Ctrl-C as one line and exit code 130 instead of a traceback; the answering runs
    say more (what they kept, in `Interrupted`)."""
    @functools.wraps(main)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            exit_interrupted(f"stopped; {RERUN_HINT}")

    return guarded  # type: ignore[return-value]


def exit_interrupted(what_is_kept: str) -> NoReturn:
    """End a Ctrl-C'd program: one line, exit code 130. The runner's per-GPU processes stay silent: their
    parent, interrupted with them, says once what all of them kept."""
    if not os.environ.get(PARENT_REPORTS_INTERRUPT):
        write_line(f"interrupted: {what_is_kept}")
    sys.exit(INTERRUPTED_EXIT_CODE)


def write_line(line: str) -> None:
    """One line on stderr in one call: sibling ranks share this stderr, and the interpreter writes an exit
    message and its newline in two calls, so two ranks' lines could interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def kept_note(answers: int, where: object) -> str:
    """What an interrupted run keeps, naming `where` only when it holds answers."""
    return f"{answers} answers kept in {where}; {RESUME_HINT}" if answers else "no answer was written"


def refuse_non_finite_flags(args: argparse.Namespace) -> None:
    """Refuse NaN and infinities in every float flag, by name: argparse's `float` takes them, and a method
    given one loops forever, writes NaN into the answers (which no resume matches again) or fails deep inside."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise RunError(f"--{name} must be a finite number, got {value}")


def refuse_non_finite_options(options: Mapping[str, str], flag: str = METHOD_ARGS_FLAG) -> None:
    """The same for a method's options as typed (`key=value`, a tuple's numbers split by ';' or spaces),
    before they become the method's options dataclass."""
    for name, text in options.items():
        if any(is_non_finite_number(part) for part in text.replace(";", " ").split()):
            raise RunError(f"{flag} {name}={text}: {name} must be finite, got {text!r}")


def is_non_finite_number(text: str) -> bool:
    """True for the spellings `float` reads as NaN or an infinity ("nan", "-inf", "Infinity", ...)."""
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False
