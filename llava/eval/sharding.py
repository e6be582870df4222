"""Multi-process and multi-node sharding for `accelerate launch` / `torchrun`, without a process group.

Each process answers one chunk into its own shard file next to the answers file. Whichever process
finds every shard complete writes the merged answers file in question order (atomically, so two
finishing at once cannot interleave). A shard that died is re-run alone with the same RANK and
WORLD_SIZE: it resumes its file, and then merges.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llava.eval.answers_file import finished_lines, get_chunk

WORLD_SIZE_ENV, RANK_ENV, LOCAL_RANK_ENV = "WORLD_SIZE", "RANK", "LOCAL_RANK"


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    local_rank: int


def launcher_shard() -> Shard | None:
    """The shard torchrun / accelerate launch assigned to this process, if launched by one."""
    world_size = int(os.environ.get(WORLD_SIZE_ENV, "1"))
    if world_size <= 1:
        return None
    rank = int(os.environ[RANK_ENV])
    return Shard(rank, world_size, int(os.environ.get(LOCAL_RANK_ENV, rank)))


def shard_path(answers_file: Path, shard: Shard) -> Path:
    return answers_file.with_name(f"{answers_file.stem}.shard-{shard.index:05d}-of-{shard.count:05d}.jsonl")


def merge_if_complete(answers_file: Path, questions: list, count: int) -> bool:
    """Write `answers_file` from all shard files if each holds its whole chunk; True if merged."""
    parts = []
    for index in range(count):
        path = shard_path(answers_file, Shard(index, count, index))
        expected = len(get_chunk(questions, count, index))
        if not path.is_file() or len(finished_lines(path)) != expected:
            return False
        parts.append(path.read_bytes())
    temporary = answers_file.with_name(f".{answers_file.name}.{os.getpid()}.tmp")
    temporary.write_bytes(b"".join(parts))
    os.replace(temporary, answers_file)
    return True
