"""A streamed block's quantized tensors, dequantized by two threads at once.

Dequantizing costs CPU time of the order of reading the quantized bytes (format/
quantization.py), so neither thread alone keeps up: the thread that read the block starts
on its first tensor as soon as the read ends, and the compute thread, once it needs the
block, takes the tensors left from the last one. Each tensor is dequantized once, into the
room its lease holds for it; the lease is not given back while one is being written.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..format.quantization import Quantization


@dataclass(frozen=True)
class Job:
    key: str
    weight: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype
    out: torch.Tensor | None  # where the result goes (None: memory of its own)
    quantization: Quantization


class Dequantization:
    def __init__(self, jobs: list[Job], count: Callable[[float], None]):
        self._jobs = collections.deque(jobs)
        self._count = count  # seconds spent, for the stats
        self._lock = threading.Condition()
        self._running = 0
        self._closed = False
        self._error: BaseException | None = None
        self._out: dict[str, torch.Tensor] = {}

    def work(self, first: bool = True) -> None:
        """Dequantize tensors until none is left: from the first (the reading thread) or
        from the last (the computing thread)."""
        while (job := self._take(first)) is not None:
            start = time.perf_counter()
            result = error = None
            try:
                result = job.quantization.dequantize(job.weight, job.scales, job.dtype, job.out)
            except BaseException as exc:  # handed to whoever finishes
                error = exc
            with self._lock:
                self._running -= 1
                if error is not None:
                    self._error = self._error or error
                else:
                    self._out[job.key] = result
                self._lock.notify_all()
            self._count(time.perf_counter() - start)

    def finish(self) -> dict[str, torch.Tensor]:
        """Every tensor dequantized (helping with those left), by key."""
        self.work(first=False)
        with self._lock:
            self._lock.wait_for(lambda: self._running == 0)
            if self._error is not None:
                raise self._error
            return self._out

    def close(self) -> None:
        """No more work is started; returns once none is running (its room can be reused)."""
        with self._lock:
            self._closed = True
            self._jobs.clear()
            self._lock.wait_for(lambda: self._running == 0)
            self._out = {}

    def _take(self, first: bool) -> Job | None:
        with self._lock:
            if self._closed or not self._jobs:
                return None
            self._running += 1
            return self._jobs.popleft() if first else self._jobs.pop()
