"""The one sharding path of every answering run: ranks of `torchrun` / `accelerate launch`, or one
process per listed GPU as LLaVA's scripts start them, without a process group.

Each shard answers its chunk of the questions into its own file; whichever shard, holding the merged
file's lock, finds every chunk complete writes the merged answers in question order (so two shards
finishing at once cannot both miss the merge). A shard that died is re-run alone with the same RANK
and WORLD_SIZE: it resumes its file, and then merges. `run_on_gpus` starts the per-GPU processes as
such ranks, each seeing only its own GPU.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llava.eval.answering.answers_file import finished_lines, get_chunk
from llava.eval.cli_errors import PARENT_REPORTS_INTERRUPT

WORLD_SIZE_ENV, RANK_ENV, LOCAL_RANK_ENV = "WORLD_SIZE", "RANK", "LOCAL_RANK"
INTERRUPT_GRACE_S = 5.0  # how long processes interrupted with this one get to stop on their own


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    local_rank: int


ONE_PROCESS = Shard(0, 1, 0)
ChunkNaming = Callable[[Path, Shard], Path]


def launcher_shard() -> Shard | None:
    """The shard torchrun / accelerate launch (or `run_on_gpus`) assigned to this process, if any."""
    world_size = int(os.environ.get(WORLD_SIZE_ENV, "1"))
    if world_size <= 1:
        return None
    rank = int(os.environ[RANK_ENV])
    return Shard(rank, world_size, int(os.environ.get(LOCAL_RANK_ENV, rank)))


def shard_path(answers_file: Path, shard: Shard) -> Path:
    """A CLI's shard file, next to its --answers-file."""
    return answers_file.with_name(f"{answers_file.stem}.shard-{shard.index:05d}-of-{shard.count:05d}.jsonl")


def llava_chunk_path(answers_file: Path, shard: Shard) -> Path:
    """LLaVA's scripts' chunk file, `<count>_<index>.jsonl` beside the merged answers."""
    return answers_file.with_name(f"{shard.count}_{shard.index}.jsonl")


def merged_answers(answers_file: Path, questions: list, count: int, naming: ChunkNaming = shard_path) -> bytes | None:
    """The merged answers, chunk after chunk, if every chunk file holds its whole chunk; else None."""
    parts = []
    for index in range(count):
        path = naming(answers_file, Shard(index, count, index))
        expected = len(get_chunk(questions, count, index))
        if not path.is_file() or len(finished_lines(path)) != expected:
            return None
        parts.append(path.read_bytes())
    return b"".join(parts)


def replace_if_changed(path: Path, content: bytes) -> bool:
    """Write `content` to `path` in one step (never half-written) unless it already holds it; True if written."""
    if path.is_file() and path.read_bytes() == content:
        return False
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(content)
    os.replace(temporary, path)
    return True


def run_on_gpus(command: Sequence[str], gpus: Sequence[str]) -> list[int]:
    """Run `command` once per GPU, all at once, as the ranks of one sharded run; their exit codes
    (negative: killed by that signal). On Ctrl-C they are stopped too (`interrupt_all`), and it goes on."""
    processes = []
    for rank, gpu in enumerate(gpus):
        env = {**os.environ, WORLD_SIZE_ENV: str(len(gpus)), RANK_ENV: str(rank), LOCAL_RANK_ENV: "0",
               "CUDA_VISIBLE_DEVICES": gpu, PARENT_REPORTS_INTERRUPT: "1"}
        processes.append(subprocess.Popen(list(command), env=env))
    try:
        return [process.wait() for process in processes]
    except KeyboardInterrupt:
        interrupt_all(processes)
        raise


def interrupt_all(processes: Sequence[subprocess.Popen]) -> None:
    """Stop the processes after a Ctrl-C and wait for them. A terminal's Ctrl-C has reached them already (a
    second one could cut their own clean stop short); a SIGINT sent to this process alone has not, so those
    still running after a grace period get one."""
    deadline = time.monotonic() + INTERRUPT_GRACE_S
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)
    for process in processes:
        process.wait()
