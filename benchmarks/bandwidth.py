"""What the store can deliver: the best of several readers and depths, for the floor.

A floor must be one: a run faster than bytes / bandwidth means the bandwidth was measured
too low. One reader on one thread is not what the disk delivers (a cold NVMe-backed volume
gave 1.13 GB/s to one populating thread and 2.96 to four), so every block chunk is read
through each reader at 1, 2, 4 and 8 threads, and the best rate is the floor's bandwidth:

- ``read``: ``LocalStore.read_into`` into a buffer per thread (the runtime's pooled reader);
- ``mmap``: ``LocalStore.map``, pages populated with 2 MiB folios (the mapped reader);
- ``direct``: ``O_DIRECT`` reads into an aligned buffer (the page cache bypassed), where
  the file system supports it.

Cold, the page cache is dropped before each reader and depth; warm, each is the best of 3.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cgroup

DEPTHS = (1, 2, 4, 8)
DIRECT_STEP = 8 << 20  # bytes per O_DIRECT read: a multiple of any logical block size


def _readers(store: Path, largest: int) -> dict[str, Callable[[str], int]]:
    import torch

    from layerstream.stores import LocalStore

    local = LocalStore(store)
    mine = threading.local()  # each thread's buffers, made on its first read

    def read(name: str) -> int:
        if not hasattr(mine, "buffer"):
            mine.buffer = memoryview(torch.empty(largest, dtype=torch.uint8).numpy())
        return local.read_into(name, mine.buffer).size

    def mapped(name: str) -> int:
        m = local.map(name)
        m.close()
        return m.size

    def direct(name: str) -> int:
        if not hasattr(mine, "aligned"):
            mine.aligned = memoryview(mmap.mmap(-1, DIRECT_STEP))  # anonymous: page-aligned
        fd = os.open(store / name, os.O_RDONLY | os.O_DIRECT)
        try:
            total = 0
            while n := os.preadv(fd, [mine.aligned], total):
                total += n
                if n < DIRECT_STEP:
                    break
            return total
        finally:
            os.close(fd)

    return {"read": read, "mmap": mapped, "direct": direct}


def measure(store: Path, files: list[str], largest: int, cold: bool) -> dict:
    """Bytes/s of reading ``files`` per reader and depth, the best of them, and which won.
    A reader the file system refuses (O_DIRECT on tmpfs) is reported with the reason."""
    rates: dict[str, float] = {}
    refused: dict[str, str] = {}
    for reader, read in _readers(store, largest).items():
        for depth in DEPTHS:
            best = 0.0
            try:
                for _ in range(1 if cold else 3):
                    if cold:
                        cgroup.drop_caches()
                    with ThreadPoolExecutor(depth) as pool:
                        start = time.perf_counter()
                        total = sum(pool.map(read, files))
                        best = max(best, total / (time.perf_counter() - start))
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                refused[reader] = f"{exc.strerror} (the file system refuses it)"
                break
            rates[f"{reader} x{depth}"] = best
    winner = max(rates, key=rates.__getitem__)
    return {"best": rates[winner], "best_by": winner, "rates": rates, "refused": refused}
