"""Checks on the paths a tool will write, made before any work: a folder where a file belongs, a file where
a folder belongs, or a place the user cannot write would otherwise fail after minutes of loading or scoring.

Kept free of heavy imports and of the rest of the package, so that every layer's CLI can use it.
"""

from __future__ import annotations

import os
from pathlib import Path

WRITABLE_FOLDER = os.W_OK | os.X_OK  # creating an entry in a folder needs both


class OutputPathError(ValueError):
    """An output path the tool cannot write; the message names the flag and the path."""


def check_output_file(path: str | Path, flag: str) -> None:
    """Refuse an output file that is an existing folder, lies under a file, or cannot be written."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputPathError(f"{flag} {path} is a folder; give a file path")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise OutputPathError(f"{flag} {path}: the file cannot be written (read-only or immutable)")
        return
    check_creatable(path, flag)


def check_output_folder(path: str | Path, flag: str) -> None:
    """Refuse an output folder that is an existing file, lies under a file, or cannot be written in."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{flag} {path} is an existing file; give a folder")
    if path.is_dir():
        if not os.access(path, WRITABLE_FOLDER):
            raise OutputPathError(f"{flag} {path}: the folder cannot be written in (read-only or immutable)")
        return
    check_creatable(path, flag)


def check_creatable(path: Path, flag: str) -> None:
    """`path` does not exist yet: the nearest existing folder above it must be a folder we can write in."""
    ancestor = next(parent for parent in path.parents if parent.exists())
    if not ancestor.is_dir():
        raise OutputPathError(f"{flag} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, WRITABLE_FOLDER):
        raise OutputPathError(f"{flag} {path}: cannot create it in {ancestor} (read-only or immutable)")
