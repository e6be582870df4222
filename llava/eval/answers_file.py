"""Resumable JSONL answer files: every answer is flushed as written, and a re-run skips what is done.

Answers are written in question order, so resuming means skipping as many questions as there are
complete lines. The skipped question ids are checked against the file, because TextVQA-style question
files repeat ids (one per image) and an answers file from another question file must not be extended.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import IO


class AnswersFileError(ValueError):
    """The answers file does not belong to this question list; the message says how to proceed."""


def read_jsonl(path: str | Path, what: str = "file") -> list[dict]:
    """Read a JSONL file, naming the file and line of any malformed JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{what} {path}, line {number}: not valid JSON ({error.msg})") from None
    return records


def get_chunk(items: list, num_chunks: int, chunk_idx: int) -> list:
    """LLaVA's sharding: ceil(len / num_chunks) consecutive items per chunk."""
    if num_chunks < 1 or not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"--chunk-idx must be in [0, --num-chunks), got {chunk_idx} of {num_chunks}")
    size = math.ceil(len(items) / num_chunks)
    return items[chunk_idx * size : (chunk_idx + 1) * size]


def complete_lines(path: Path) -> list[dict]:
    """Parse the finished answers in `path`, cutting off a last line that a kill left half-written."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    finished = data[: data.rfind(b"\n") + 1]
    if len(finished) != len(data):
        with path.open("r+b") as handle:
            handle.truncate(len(finished))
    return [json.loads(line) for line in finished.decode("utf-8").splitlines() if line.strip()]


def resume_position(path: Path, question_ids: list) -> int:
    """How many questions are already answered in `path` (checked against the question ids)."""
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
    return len(done)


def open_for_append(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a", encoding="utf-8")


def write_line(handle: IO[str], record: dict) -> None:
    """One answer, on disk before the next question starts."""
    handle.write(json.dumps(record) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def write_scores(path: str | Path | None, scores: dict) -> None:
    """A scorer's result as JSON beside the answers, for `summary.json` (nothing when path is None)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(scores, indent=2) + "\n")


def answers_by_question_id(path: str | Path, known_ids: set[str] | None = None, unknown_hint: str = "") -> dict[str, str]:
    """Answer text by question id (as a string: LLaVA's files hold ids as numbers or strings).

    Every answer must name its question once; with `known_ids`, only questions of that set (a file
    from another split or benchmark fails here, with `unknown_hint` saying what to check).
    """
    answers: dict[str, str] = {}
    for number, record in enumerate(read_jsonl(path, "result file"), start=1):
        if not isinstance(record, dict) or "question_id" not in record or "text" not in record:
            raise AnswersFileError(f"result file {path}, answer {number}: needs 'question_id' and 'text'")
        question_id = str(record["question_id"])
        if known_ids is not None and question_id not in known_ids:
            raise AnswersFileError(f"result file {path}, answer {number}: question_id {question_id} {unknown_hint}")
        if question_id in answers:
            raise AnswersFileError(f"result file {path}: question_id {question_id} is answered twice")
        answers[question_id] = record["text"]
    return answers
