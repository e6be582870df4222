"""Wall-clock timing that is honest on GPUs: wait for queued CUDA work before reading the clock."""

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
    """Result of `fn()` and its wall time in seconds."""
    start = now(device)
    result = fn()
    return result, now(device) - start
