"""How a streamed block's bytes reach memory: two readers with one interface.

``BlockReader.lease(j, info)`` reads (or maps) block j's chunk and checks its bytes, on an I/O
thread or, on a miss, the compute thread; it returns a ``Lease``. The compute thread then
makes the lease's tensor views, the block's hook installs them, and once the block has run
the lease is confirmed and released. Nothing outside this module sees a buffer or mapping.

- ``PooledReader`` copies each chunk into a buffer of a fixed pool (any store).
- ``MappedReader`` (mapped.py) keeps each chunk file mapped and drops its pages
  after use (local stores only, no copy).
"""

from __future__ import annotations

import mmap
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from ..errors import ChunkStoreError
from ..format.manifest import ChunkInfo
from ..format.quantization import aligned
from ..stores import ChunkStore, MappableStore
from ..words import Word
from .checks import ChunkChecks, VerifyMode
from .dequantization import Dequantization

READERS = ("auto", "mmap", "read")


class ReaderKind(Word):
    MMAP = "mmap"  # streams without a copy
    READ = "read"  # copies into the pool


def pick_reader(
    reader: str, store: ChunkStore, verify: VerifyMode, quantized: bool = False
) -> ReaderKind:
    """The ``reader`` setting's reader; "auto" maps local files, except with
    verify_checksums="always", which must hash the very bytes it then uses, and for a
    ``quantized`` store, whose blocks are dequantized into memory of their own anyway."""
    if reader not in READERS:
        raise ValueError(f"reader must be one of {', '.join(READERS)}, not {reader!r}")
    mappable = isinstance(store, MappableStore)
    if reader == "mmap" and not mappable:
        raise ChunkStoreError(f"chunk store {store.uri} cannot be memory-mapped; use reader=read")
    if reader == "auto":
        mapped = mappable and verify is not VerifyMode.ALWAYS and not quantized
        return ReaderKind.MMAP if mapped else ReaderKind.READ
    return ReaderKind(reader)


class Lease(ABC):
    """A streamed block's checked bytes, on loan from its reader until ``release``."""

    # the tensors view memory that outlives the lease (a kept mapping, a block's home): they
    # may stay installed in the module after release
    kept = False
    # a quantized chunk's tensors, dequantized by the reading thread and the computing one
    dequantization: Dequantization | None = None

    def __init__(self, index: int, info: ChunkInfo, version: str | None):
        self.index = index
        self.info = info
        self.version = version
        self.tensors: dict[str, torch.Tensor] = {}
        self._released = False

    def make_views(self) -> None:
        """Fill ``tensors`` (on the compute thread: the I/O threads run as little Python as
        possible, because every bit of it holds the GIL that compute needs between ops)."""
        self.tensors = self._views()

    def confirm(self) -> None:
        """After the block has run: raise if its bytes may have changed while it ran."""
        return None  # a private copy cannot change under the block

    def release(self) -> None:
        """Give the bytes back (idempotent). The views go first (not clear(): a kept
        mapping's dict is shared and stays valid), since the bytes are reused next."""
        if self._released:
            return
        self._released = True
        self.tensors = {}
        if self.dequantization is not None:
            self.dequantization.close()  # nothing writes into the bytes once given back
        self._give_back()

    def work_ahead(self) -> None:
        """On the thread that read it, once delivered: dequantize what the block needs."""
        if self.dequantization is not None:
            self.dequantization.work(first=True)

    def _dequantized(self) -> dict[str, torch.Tensor] | None:
        return None if self.dequantization is None else self.dequantization.finish()

    @abstractmethod
    def _views(self) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def _give_back(self) -> None: ...


class BlockReader(ABC):
    kind: ReaderKind

    def __init__(self, checks: ChunkChecks):
        self.checks = checks

    @abstractmethod
    def lease(self, j: int, info: ChunkInfo) -> Lease:
        """Block j's chunk read and checked; blocks while every buffer is on loan."""

    @abstractmethod
    def load_resident(self, info: ChunkInfo) -> dict[str, torch.Tensor]:
        """A chunk's tensors in memory of their own, for good (the rest, pinned blocks)."""

    def in_memory(self, info: ChunkInfo) -> bool:
        """Whether ``info`` is in memory already, so reading it ahead would gain nothing."""
        return False

    def settle(self) -> None:
        """Wait for the work handed off after blocks ran (tests and benchmarks)."""
        return None  # nothing is handed off

    def close(self) -> None:
        """Release what the reader holds, once no lease is out."""
        return None  # the pool's buffers go with the reader


class BufferPool:
    """A fixed set of reusable block buffers.

    Allocating a fresh buffer per streamed block makes glibc keep the freed memory (RSS
    creeps up token after token); a pool allocated once keeps RSS flat. ``acquire`` blocks
    while every buffer is in use, which also bounds read-ahead memory.
    """

    def __init__(self, count: int, nbytes: int):
        # told the bytes whose pages are given back each time a buffer is taken, before its
        # taker writes there (the expert cache borrows them: expert_cache.py)
        self.on_taken: Callable[[int], None] | None = None
        self._free: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        self.buffers: list[torch.Tensor] = []  # every buffer, free or not
        self._maps: dict[int, mmap.mmap] = {}  # by buffer address
        self._written: dict[int, int] = {}  # by buffer address: its bytes maybe written
        for _ in range(count):
            # page-aligned (anonymous mappings are), so reads past the page cache (O_DIRECT)
            # can land in it; a tensor's address mod 64 stays its offset's, as with malloc.
            # Private, so that pages given back (``ticket``) cost nothing until written
            memory = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE)
            self.buffers.append(torch.frombuffer(memory, dtype=torch.uint8)[:nbytes])
            self._maps[self.buffers[-1].data_ptr()] = memory
            self._free.put(self.buffers[-1])

    def acquire(self) -> torch.Tensor:
        buffer = self._free.get()
        self._written[buffer.data_ptr()] = buffer.numel()
        self._taken()
        return buffer

    def ticket(self, keep: int = 0) -> torch.Tensor:
        """A buffer of which only the first ``keep`` bytes will be written: the rest counts
        against the pool for memory its holder uses elsewhere, so its pages go back to the
        system (where written since the last time)."""
        buffer = self._free.get()
        address = buffer.data_ptr()
        if self._written.get(address, 0) > keep:
            start = -(-keep // mmap.PAGESIZE) * mmap.PAGESIZE
            memory = self._maps[address]
            if start < len(memory):
                memory.madvise(mmap.MADV_DONTNEED, start, len(memory) - start)
        self._written[address] = keep
        self._taken()
        return buffer

    def unwritten(self) -> int:
        """Bytes of the buffers whose pages are given back (never written, or since)."""
        return sum(b.numel() - self._written.get(b.data_ptr(), 0) for b in self.buffers)

    def _taken(self) -> None:
        if self.on_taken is not None:
            self.on_taken(self.unwritten())

    def release(self, buffer: torch.Tensor) -> None:
        self._free.put(buffer)


class PooledLease(Lease):
    def __init__(
        self,
        index: int,
        info: ChunkInfo,
        version: str | None,
        data: torch.Tensor,
        buffer: torch.Tensor,
        reader: PooledReader,
        dequantization: Dequantization | None = None,
    ):
        super().__init__(index, info, version)
        self._data: torch.Tensor | None = data
        self._buffer = buffer
        self._reader = reader
        self.dequantization = dequantization

    def _views(self) -> dict[str, torch.Tensor]:
        assert self._data is not None
        return self._reader.checks.tensors(self.info, self._data, self.version, self._dequantized())

    def _give_back(self) -> None:
        self._data = None
        self._reader.pool.release(self._buffer)


class PooledReader(BlockReader):
    """Reads each streamed chunk into a buffer of ``pool`` (one per block in flight)."""

    kind = ReaderKind.READ

    def __init__(
        self,
        store: ChunkStore,
        checks: ChunkChecks,
        buffers: int,
        buffer_bytes: int,
        dequantized: int = 0,
    ):
        super().__init__(checks)
        self.store = store
        # a quantized store's buffers hold a block's bytes, then (from an aligned boundary)
        # its tensors dequantized
        self._dequantized_at = aligned(buffer_bytes) if dequantized else buffer_bytes
        self.pool = BufferPool(buffers, self._dequantized_at + dequantized)
        self._staging = threading.Lock()  # one quantized chunk read outside the pool at once

    def read_chunk(
        self, info: ChunkInfo, buffer: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, str | None]:
        """Read and check one chunk into ``buffer`` (or a new exact-size one); return its
        bytes and the store's version of it."""
        if buffer is None:
            buffer = torch.empty(info.bytes, dtype=torch.uint8)
        if buffer.numel() < info.bytes:
            raise ChunkStoreError(f"chunk {info.name} is larger than its streaming buffer")
        target = buffer

        def read() -> tuple[torch.Tensor, str | None]:
            start = time.perf_counter()
            got = self.store.read_into(info.file, memoryview(target.numpy()), info.bytes)
            self.checks.check(info, target[: got.size], got.version, start, got.verified)
            return target[: info.bytes], got.version

        return self.checks.refetching(info, read)

    def lease(self, j: int, info: ChunkInfo) -> Lease:
        buffer = self.pool.acquire()
        try:
            data, version = self.read_chunk(info, buffer)
            into = buffer[self._dequantized_at :]
            work = self.checks.dequantization(info, data, version, into)
        except BaseException:
            self.pool.release(buffer)
            raise
        return PooledLease(j, info, version, data, buffer, self, work)

    def load_resident(self, info: ChunkInfo) -> dict[str, torch.Tensor]:
        """A plain chunk is read into memory of its own and held there. A quantized one is
        read through a streaming buffer, or where none takes it through memory of its own,
        one chunk at a time (the plan's ``staging``): only its tensors dequantized stay
        (checks.held)."""
        if self.checks.quantization(info) is None:
            data, version = self.read_chunk(info)
            return self.checks.tensors(info, data, version)
        if self.pool.buffers and info.bytes <= self.pool.buffers[0].numel():
            buffer = self.pool.acquire()
            try:
                data, version = self.read_chunk(info, buffer)
                return self.checks.held(info, data, version)
            finally:
                self.pool.release(buffer)
        with self._staging:
            data, version = self.read_chunk(info)
            return self.checks.held(info, data, version)
