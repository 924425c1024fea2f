"""A fixed set of reusable block buffers.

Allocating a fresh buffer per streamed block makes glibc keep the freed memory (RSS creeps
up token after token); a pool allocated once keeps RSS flat. ``acquire`` blocks while every
buffer is in use, which also bounds read-ahead memory.
"""

from __future__ import annotations

import queue

import torch


class BufferPool:
    def __init__(self, count: int, nbytes: int):
        self.nbytes = nbytes
        self.count = count
        self._free: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(torch.empty(nbytes, dtype=torch.uint8))

    def acquire(self, timeout: float | None = None) -> torch.Tensor:
        return self._free.get(timeout=timeout)

    def release(self, buffer: torch.Tensor) -> None:
        self._free.put(buffer)
