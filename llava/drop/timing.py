"""Timing that is honest on GPUs without stalling them: device events, read back once at the end."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def now(device: torch.device) -> float:
    """Seconds on a monotonic clock, after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """Result of `fn()` and its time in seconds (device events on CUDA, so no synchronisation here)."""
    stopwatch = Stopwatch(device)
    with stopwatch:
        result = fn()
    return result, stopwatch.seconds()


class Stopwatch:
    """Adds up the time spent inside `with stopwatch:` blocks. On CUDA each block records a pair of events
    on the current stream, and `seconds()` waits for the last one once: the blocks themselves never wait for
    the device. On a CPU the clock is read directly."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple] = []
        self.cpu_seconds = 0.0
        self._started: object = None

    def __enter__(self) -> "Stopwatch":
        if self.cuda:
            self._started = torch.cuda.Event(enable_timing=True)
            self._started.record()
        else:
            self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            ended = torch.cuda.Event(enable_timing=True)
            ended.record()
            self.spans.append((self._started, ended))
        else:
            self.cpu_seconds += time.perf_counter() - self._started

    def seconds(self) -> float:
        if not self.cuda:
            return self.cpu_seconds
        if self.spans:
            self.spans[-1][1].synchronize()
        return sum(start.elapsed_time(end) for start, end in self.spans) / 1000.0
