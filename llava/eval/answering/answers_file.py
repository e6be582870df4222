"""Resumable JSONL answer files: every answer is flushed as written, and a re-run skips what is done.

Answers are written in question order, so resuming means skipping as many questions as there are
complete lines. The skipped question ids are checked against the file, because TextVQA-style question
files repeat ids (one per image) and an answers file from another question file must not be extended;
so are the run settings every line records, so that a resumed file never mixes two settings, and the
fingerprint of each answered question (its text and image), so that an edited question file is not
extended either. A run holds an exclusive lock on its file, so two runs cannot interleave their lines.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from llava.eval.jsonl import parse_line

RUN_KEY = "run"  # metadata field holding the settings an answer was made with
ASKED_KEY = "asked"  # metadata field holding a fingerprint of the question as it was asked
LOCK_SUFFIX = ".lock"
MISSING = "<not recorded>"


class AnswersFileError(ValueError):
    """The answers file does not belong to this question list; the message says how to proceed."""


def get_chunk(items: list, num_chunks: int, chunk_idx: int) -> list:
    """LLaVA's sharding: ceil(len / num_chunks) consecutive items per chunk."""
    if num_chunks < 1 or not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"--chunk-idx must be in [0, --num-chunks), got {chunk_idx} of {num_chunks}")
    size = math.ceil(len(items) / num_chunks)
    return items[chunk_idx * size : (chunk_idx + 1) * size]


def complete_lines(path: Path) -> list[dict]:
    """Parse the finished answers in `path`, cutting off a last line that a kill left half-written.

    Call it only while holding the file's lock (`locked_answers_file`): it may truncate the file.
    """
    if not path.is_file():
        return []
    data = path.read_bytes()
    finished = data[: data.rfind(b"\n") + 1]
    if len(finished) != len(data):
        with path.open("r+b") as handle:
            handle.truncate(len(finished))
    return parse_answers(path, finished)


def finished_lines(path: Path) -> list[dict]:
    """The finished answers in `path`, leaving the file alone (another process may be writing it)."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    return parse_answers(path, data[: data.rfind(b"\n") + 1])


def parse_answers(path: Path, finished: bytes) -> list[dict]:
    """Complete answer lines as objects; errors name the file and the 1-based line."""
    try:
        lines = finished.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise AnswersFileError(f"answers file {path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = parse_line(line, path, number, "answers file")
        if not isinstance(record, dict):
            raise AnswersFileError(f"answers file {path}, line {number}: not a JSON object")
        records.append(record)
    return records


def resume_position(path: Path, question_ids: list, identity: dict | None = None,
                    fingerprints: list[str] | None = None) -> int:
    """How many questions are already answered in `path`, checked against the question ids and, when
    given, against the run settings every line records (`metadata["run"]`) and the fingerprint of each
    question as it was asked (`metadata["asked"]`: its text and image)."""
    done = complete_lines(path)
    if len(done) > len(question_ids):
        raise AnswersFileError(f"{path} has {len(done)} answers but there are only {len(question_ids)} questions")
    for index, answer in enumerate(done):
        if answer.get("question_id") != question_ids[index]:
            raise AnswersFileError(
                f"{path} line {index + 1} answers question {answer.get('question_id')!r} but question "
                f"{index + 1} is {question_ids[index]!r}: the file comes from another question file or "
                "chunk; delete it or choose another --answers-file"
            )
        if identity is not None:
            check_same_run(path, index + 1, answer, identity)
        if fingerprints is not None:
            check_same_question(path, index + 1, answer, fingerprints[index])
    return len(done)


def check_same_question(path: Path, line: int, answer: dict, fingerprint: str) -> None:
    """Refuse to extend a file whose answered question has changed since (same id, other text or image).
    Lines written before fingerprints were recorded are not checked."""
    metadata = answer.get("metadata")
    recorded = metadata.get(ASKED_KEY) if isinstance(metadata, dict) else None
    if recorded is not None and recorded != fingerprint:
        raise AnswersFileError(
            f"{path} line {line} answers question {answer.get('question_id')!r} as it was asked then, but the "
            "question file now asks it with another text or image; delete the file or choose another --answers-file"
        )


def check_same_run(path: Path, line: int, answer: dict, identity: dict) -> None:
    """Refuse to extend a file written with other settings, naming the first setting that differs."""
    metadata = answer.get("metadata")
    recorded = metadata.get(RUN_KEY) if isinstance(metadata, dict) else None
    if not isinstance(recorded, dict):
        raise AnswersFileError(
            f"{path} line {line} does not record the settings it was made with (an older version or another "
            "tool wrote it), so resuming could mix settings; delete it or choose another --answers-file"
        )
    difference = first_difference(recorded, identity)
    if difference is not None:  # a line answered before the options' renaming compares under today's names
        difference = first_difference(with_current_option_names(recorded), identity)
    if difference is not None:
        name, before, now = difference
        raise AnswersFileError(
            f"{path} line {line} was answered with {name}={before!r} but this run has {name}={now!r}; "
            "resume with the same settings, or delete the file or choose another --answers-file"
        )


def with_current_option_names(run: dict) -> dict:
    """A run's settings as a line recorded them, with its method's options under today's names: lines answered
    before the options had one vocabulary (docs/method_options.md) recorded FastV's `k` and `ratio`, MustDrop's
    `drop_layers`, ..., which the method's registered aliases convert. Only called for settings that differ as
    recorded, so that reading an answers file imports no method."""
    options = run.get("method_options")
    if not isinstance(options, dict) or not isinstance(run.get("method"), str):
        return run
    from llava.drop.methods.registry import canonical_recorded_options  # the methods import torch

    canonical = canonical_recorded_options(run["method"], options)
    return {**run, "method_options": json.loads(json.dumps(canonical))}  # tuples become lists, as in a file


def first_difference(recorded: dict, current: dict, prefix: str = "") -> tuple[str, object, object] | None:
    """(dotted name, recorded value, current value) of the first setting that differs, or None."""
    for name in sorted(set(recorded) | set(current), key=lambda key: (key not in current, key)):
        before, now = recorded.get(name, MISSING), current.get(name, MISSING)
        if isinstance(before, dict) and isinstance(now, dict):
            nested = first_difference(before, now, f"{prefix}{name}.")
            if nested is not None:
                return nested
        elif before != now:
            return f"{prefix}{name}", before, now
    return None


@contextmanager
def locked_answers_file(path: Path, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on `path` for the whole run, so that a second run on the same answers
    file stops at once (or, with `wait`, waits its turn) instead of interleaving lines.

    The lock is `flock` on a sidecar `<name>.lock` holding the owner's pid. The kernel releases it when
    its process dies, so a lock file left by a killed run is simply taken over. POSIX only. A run that
    stops before its first answer leaves neither the answers file nor the folders it created.
    """
    if path.is_dir():
        raise AnswersFileError(f"--answers-file {path} is a directory; give a file path such as {path / 'answers.jsonl'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise AnswersFileError(f"--answers-file {path} cannot be written (read-only or immutable); make it writable "
                               "or choose another --answers-file")
    lock_path = path.with_name(path.name + LOCK_SUFFIX)
    created = [folder for folder in path.parents if not folder.exists()]
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AnswersFileError(f"cannot create the folder of --answers-file {path}: {error.strerror or error}") from None
    try:
        handle = acquire_writable(lock_path, path, wait)
        try:
            yield
        finally:
            if not existed and path.is_file() and path.stat().st_size == 0:
                path.unlink()
            lock_path.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
    finally:
        remove_if_empty(created)


def remove_if_empty(folders: list[Path]) -> None:
    """Take back the folders a run created when it stopped before writing anything into them."""
    for folder in folders:  # innermost first
        try:
            folder.rmdir()
        except OSError:
            return


def acquire_writable(lock_path: Path, answers_path: Path, wait: bool) -> IO[str]:
    """The lock, whose sidecar file is the first thing a run writes beside its answers: a folder the run
    cannot write in is refused here, before the model loads, not after the first answer."""
    try:
        return _acquire(lock_path, answers_path, wait)
    except OSError as error:
        raise AnswersFileError(f"cannot write in the folder of --answers-file {answers_path}: "
                               f"{error.strerror or error} (creating {lock_path.name})") from None


def _acquire(lock_path: Path, answers_path: Path, wait: bool) -> IO[str]:
    """Open and lock the sidecar; retry if another process replaced it between our open and lock."""
    while True:
        handle = lock_path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise AnswersFileError(
                f"{answers_path} is being written by another run (pid {owner}, lock {lock_path}); wait for it "
                "to finish or choose another --answers-file"
            ) from None
        try:
            current = os.path.samestat(os.fstat(handle.fileno()), os.stat(lock_path))
        except FileNotFoundError:
            current = False
        if current:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            return handle
        handle.close()  # the holder released and removed it after our open: lock the new file


def open_for_append(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a", encoding="utf-8")


def write_line(handle: IO[str], record: dict) -> None:
    """One answer, on disk before the next question starts."""
    handle.write(json.dumps(record) + "\n")
    handle.flush()
    os.fsync(handle.fileno())
