"""Reads block chunks from the store: resident ones once, streamed ones through the pool.

The compute thread asks for block j; the streamer hands it the read-ahead it already
started, or reads synchronously on a miss. Read-ahead follows the learned block order
(what ran after j last time), so encoder-decoder models and decode loops that wrap from
the last block to the first are predicted correctly.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import mmap
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from ..errors import ChunkIntegrityError, ChunkStoreError
from ..format.manifest import ChunkInfo, Manifest
from ..format.safetensors import (
    ChunkSpec,
    TensorEntry,
    check_layout,
    parse_layout,
    tensors_from_layout,
    verify,
)
from ..stores import ChunkStore, FileMapping, LocalStore, MappableStore
from .buffers import BufferPool
from .integrity import ChunkHealth, once_more
from .plan import ResidencyPlan

log = logging.getLogger(__name__)
T = TypeVar("T")

# "once": hash each chunk the first time it is read, and again whenever the store reports a
# different version of it (a local file rewritten in place); remote stores report no version,
# so bytes that crossed a network are hashed on every read; "always": hash every read (costs
# a core's worth of sha256 per streamed byte); "off": sizes only (local stores only).
VERIFY_MODES = ("once", "always", "off")
READERS = ("auto", "mmap", "read")


@dataclass
class StreamStats:
    """Counters since the engine started; requests report differences of two snapshots."""

    resident_runs: int = 0  # block runs served by a resident (pinned) block
    streamed_runs: int = 0  # block runs that needed a streamed block
    read_aheads: int = 0  # reads handed to an I/O thread (not those found in the page cache)
    bytes_read: int = 0
    chunks_read: int = 0
    read_s: float = 0.0  # time spent in store reads (I/O threads)
    wait_s: float = 0.0  # time the compute thread waited for weights
    chunks_verified: int = 0
    refetches: int = 0  # chunks read again after failing their sha256 check

    def snapshot(self) -> StreamStats:
        return dataclasses.replace(self)

    def since(self, before: StreamStats) -> StreamStats:
        """The counts between ``before`` (an earlier snapshot) and now."""
        return StreamStats(
            *(now - then for now, then in zip(_values(self), _values(before), strict=True))
        )


def _values(stats: StreamStats) -> tuple[float, ...]:
    return dataclasses.astuple(stats)


@dataclass
class Loaded:
    """A streamed block: its verified bytes (a pool buffer or a mapping) and, once the
    compute thread has taken it, its tensors as views of them; ``release`` gives the buffer
    or mapping back once the block has run."""

    index: int
    info: ChunkInfo = field(repr=False)
    data: torch.Tensor | None = field(repr=False)
    version: str | None
    release: Callable[[], None] | None = field(repr=False, default=None)
    tensors: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    # the tensors view a kept mapping: they may stay installed in the module after release
    kept: bool = False


@dataclass
class KeptMapping:
    """A streamed chunk's mapping, kept from its first use until the engine closes.

    Its pages are populated before the block runs and dropped (MADV_DONTNEED) after it, so
    the process's RSS holds only the blocks in flight, as with a mapping per use; but the
    open, mmap, munmap, header parse, tensor views and their installation in the module
    happen once rather than per block per token (together ~0.5 ms a block on 2 vCPUs,
    ~10% of a warm decode step at a 25% budget).
    """

    mapping: FileMapping = field(repr=False)
    data: torch.Tensor = field(repr=False)
    version: str | None
    tensors: dict[str, torch.Tensor] | None = field(repr=False, default=None)


def _view(mapping: mmap.mmap) -> torch.Tensor:
    with warnings.catch_warnings():
        # read-only on purpose: weights are never written
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(mapping, dtype=torch.uint8)


class BlockOrder:
    """Learned successor of each streamed block, defaulting to the next block in its list."""

    def __init__(self, manifest: Manifest):
        lists = [b.prefix.rsplit(".", 1)[0] for b in manifest.blocks]
        self._default: list[int] = []
        for j, name in enumerate(lists):
            first = lists.index(name)
            last = len(lists) - 1 - lists[::-1].index(name)
            self._default.append(j + 1 if j < last else first)
        self._next: dict[int, int] = {}
        self._last: int | None = None

    def observe(self, j: int) -> None:
        if self._last is not None:
            self._next[self._last] = j
        self._last = j

    def upcoming(self, j: int, skip: frozenset[int], count: int) -> list[int]:
        """The next ``count`` blocks after ``j`` that are not in ``skip``."""
        out: list[int] = []
        if count <= 0:
            return out
        k = j
        for _ in range(len(self._default)):
            k = self._next.get(k, self._default[k])
            if k == j:
                break
            if k not in skip and k not in out:
                out.append(k)
                if len(out) == count:
                    break
        return out


def _pick_reader(reader: str, store: ChunkStore, verify_checksums: str) -> str:
    """ "mmap" streams without a copy; "read" copies into the pool. "auto" maps local files,
    except with verify_checksums="always", which must hash the very bytes it then uses."""
    if reader not in READERS:
        raise ValueError(f"reader must be one of {', '.join(READERS)}, not {reader!r}")
    mappable = isinstance(store, MappableStore)
    if reader == "mmap" and not mappable:
        raise ChunkStoreError(f"chunk store {store.uri} cannot be memory-mapped; use reader=read")
    if reader == "auto":
        return "mmap" if mappable and verify_checksums != "always" else "read"
    return reader


class WeightStreamer:
    def __init__(
        self,
        store: ChunkStore,
        manifest: Manifest,
        plan: ResidencyPlan,
        io_threads: int,
        verify_checksums: str,
        reader: str = "auto",
        evict_after_use: bool = False,
        specs: dict[str, ChunkSpec] | None = None,
    ):
        self.store = store
        # what each chunk must hold (names, dtypes, shapes of the model built from the config)
        self.specs = specs or {}
        self.manifest = manifest
        self.plan = plan
        if verify_checksums not in VERIFY_MODES:
            raise ValueError(f"verify_checksums must be one of {', '.join(VERIFY_MODES)}")
        self.verify_checksums = verify_checksums
        self.health = ChunkHealth()
        # chunk name -> (store version, parsed header): a streamed block's header is parsed
        # once, not on every token (less Python on the I/O thread, less GIL for compute)
        self._layouts: dict[str, tuple[str, list[TensorEntry]]] = {}
        self.stats = StreamStats()
        self.order = BlockOrder(manifest)
        self._lock = threading.Lock()
        self._inflight: dict[int, Future[Loaded]] = {}
        self._wanted: frozenset[int] = frozenset()  # the last read-ahead's predictions
        self.reader = _pick_reader(reader, store, verify_checksums)
        local = store if isinstance(store, MappableStore) else None
        self._probe: Callable[[str], bool] | None = (
            local.in_memory if local is not None and self.reader == "mmap" else None
        )
        self._kept: dict[int, KeptMapping] = {}
        self.evict: Callable[[str], None] | None = (
            local.evict if local is not None and evict_after_use else None
        )
        self._pool: BufferPool | None = None
        self._slots: threading.BoundedSemaphore | None = None
        if plan.pool_slots and self.reader == "read":
            self._pool = BufferPool(plan.pool_slots, plan.slot_bytes)
        elif plan.pool_slots:
            self._slots = threading.BoundedSemaphore(plan.pool_slots)
        self._io = (
            ThreadPoolExecutor(max_workers=max(io_threads, 1), thread_name_prefix="layerstream-io")
            if plan.pool_slots
            else None
        )
        self._reaper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layerstream-unmap")

    # -- reading -------------------------------------------------------------------------
    def read_chunk(
        self, info: ChunkInfo, buffer: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, str | None]:
        """Read and verify one chunk into ``buffer`` (or a new exact-size one); return its
        bytes and the store's version of it."""
        if buffer is None:
            buffer = torch.empty(info.bytes, dtype=torch.uint8)
        if buffer.numel() < info.bytes:
            raise ChunkStoreError(f"chunk {info.name} is larger than its streaming buffer")

        def read() -> tuple[torch.Tensor, str | None]:
            start = time.perf_counter()
            got = self.store.read_into(info.file, memoryview(buffer.numpy()), info.bytes)
            self._check(info, buffer[: got.size], got.version, start, got.verified)
            return buffer[: info.bytes], got.version

        return self._refetching(info, read)

    def _refetching(self, info: ChunkInfo, read: Callable[[], T]) -> T:
        """``read()``, once more from the origin if its bytes fail their check; a local
        chunk that still fails is damaged in the store, and the model with it."""

        def counted(exc: ChunkIntegrityError) -> None:
            with self._lock:
                self.stats.refetches += 1

        try:
            return once_more(self.store, info.file, read, counted)
        except ChunkIntegrityError as exc:
            if isinstance(self.store, LocalStore):
                self.health.failed(info.name, exc)
            raise

    def _mappable(self) -> MappableStore:
        assert isinstance(self.store, MappableStore)  # the reader is "mmap" only then
        return self.store

    def _map_once(self, info: ChunkInfo) -> tuple[torch.Tensor, FileMapping, str | None]:
        start = time.perf_counter()
        mapped = self._mappable().map(info.file)
        data: torch.Tensor | None = None
        try:
            data = _view(mapped.data)
            self._check(info, data, mapped.version, start)
        except BaseException:
            data = None  # release the view before unmapping
            mapped.close()
            raise
        return data, mapped, mapped.version

    def _tensors(
        self, info: ChunkInfo, data: torch.Tensor, version: str | None
    ) -> dict[str, torch.Tensor]:
        cached = self._layouts.get(info.name)
        if cached is None or version is None or cached[0] != version:
            layout = parse_layout(info, data)
            spec = self.specs.get(info.name)
            if spec is not None:
                check_layout(info, layout, spec)
            if version is not None:
                self._layouts[info.name] = (version, layout)
        else:
            layout = cached[1]
        return tensors_from_layout(layout, data)

    def _check(
        self,
        info: ChunkInfo,
        data: torch.Tensor,
        version: str | None,
        start: float,
        verified: bool = False,
        always: bool = False,
    ) -> None:
        """Count a read and check its bytes: the size always, the sha256 unless the store
        verified them (``verified``) or this version of the file passed before (``always``
        overrides that: for a copy made after the file was checked)."""
        read_done = time.perf_counter()
        must = always and self.verify_checksums != "off"
        if (
            data.numel() != info.bytes
            or must
            or (not verified and self._must_verify(info, version))
        ):
            verify(info, data, self.store.uri)
            self.health.passed(info.name, version)
            with self._lock:
                self.stats.chunks_verified += 1
        with self._lock:
            self.stats.bytes_read += data.numel()
            self.stats.chunks_read += 1
            self.stats.read_s += read_done - start

    def _must_verify(self, info: ChunkInfo, version: str | None) -> bool:
        if self.verify_checksums == "off":
            return False
        if self.verify_checksums == "always":
            return True
        return not self.health.is_verified(info.name, version)

    def load_resident(self, chunk: str) -> dict[str, torch.Tensor]:
        """A chunk's tensors in memory of their own, for good (the rest, pinned blocks).

        With the mmap reader the bytes are copied out of a mapping rather than read: the
        page cache then holds the file in 2 MiB folios like every streamed chunk (see
        LocalStore.map), instead of the small ones a plain read() leaves behind.
        """
        info = self.manifest.chunks[chunk]
        if self.reader == "mmap":
            copy, version = self._refetching(info, lambda: self._copy_mapped(info))
            if self.evict is not None:
                self.evict(info.file)  # the copy is what stays; its page cache would not
            return self._tensors(info, copy, version)
        buffer, version = self.read_chunk(info)
        return self._tensors(info, buffer, version)

    def _copy_mapped(self, info: ChunkInfo) -> tuple[torch.Tensor, str | None]:
        """A copy of a mapped chunk, hashed after it was made: a file rewritten between a
        check of the mapping and the copy would otherwise stay in memory unverified."""
        start = time.perf_counter()
        mapped = self._mappable().map(info.file)
        try:
            copy = _view(mapped.data).clone()
        finally:
            mapped.close()
        self._check(info, copy, mapped.version, start, always=True)
        return copy, mapped.version

    def _load_streamed(self, j: int) -> Loaded:
        """Read or map block j and verify it (on an I/O thread when read ahead). The tensor
        views are made later, on the compute thread: the I/O thread runs as little Python as
        possible, because every bit of it holds the GIL that compute needs between ops."""
        info = self.manifest.chunks[self.manifest.blocks[j].chunk]
        if self._pool is not None:
            buffer = self._pool.acquire()
            try:
                data, version = self.read_chunk(info, buffer)
            except BaseException:
                self._pool.release(buffer)
                raise
            return Loaded(j, info, data, version, functools.partial(self._pool.release, buffer))
        assert self._slots is not None
        self._slots.acquire()
        try:
            data, version = self._refetching(info, lambda: self._populate_kept(j, info))
        except BaseException:
            self._slots.release()
            raise
        # Page drops (and evictions) go to a thread of their own, off the compute thread:
        # inline they cost it 0.26 ms a block, handed off 0.1 ms.
        drop = functools.partial(self._reaper.submit, self._drop_kept, j, info)
        return Loaded(j, info, data, version, drop, kept=True)

    def _populate_kept(self, j: int, info: ChunkInfo) -> tuple[torch.Tensor, str | None]:
        """Block j's kept mapping with its pages populated and its bytes checked; mapped
        (again) on first use, and when the file's version changed (rewritten in place or
        replaced), so what runs is always the file the store holds now."""
        with self._lock:
            kept = self._kept.get(j)
        if kept is not None:
            start = time.perf_counter()
            version = self._mappable().version(info.file)
            if version == kept.version:
                kept.mapping.populate()
                try:
                    self._check(info, kept.data, version, start)
                except BaseException:
                    self._forget(j)
                    raise
                return kept.data, version
            self._forget(j)
        data, mapping, version = self._map_once(info)
        with self._lock:
            self._kept[j] = KeptMapping(mapping, data, version)
        return data, version

    def _forget(self, j: int) -> None:
        """Stop keeping block j's mapping; it is unmapped once no tensor views it."""
        with self._lock:
            kept = self._kept.pop(j, None)
        if kept is not None:
            kept.tensors = None
            kept.mapping.close()

    def _drop_kept(self, j: int, info: ChunkInfo) -> None:
        with self._lock:
            kept = self._kept.get(j)
        try:
            if kept is not None:
                kept.mapping.drop_pages()
        finally:
            assert self._slots is not None
            self._slots.release()
        if self.evict is not None:
            self.evict(info.file)

    # -- the compute thread's side ---------------------------------------------------------
    def hit(self) -> None:
        self.stats.resident_runs += 1

    def acquire(self, j: int) -> Loaded:
        """Block j's tensors, from its read-ahead if one was started, else read now.

        Buffer accounting: the pool has 1 + read_ahead buffers and the previous block has
        been released, so the block being computed plus the blocks read ahead always fit.
        """
        self.stats.streamed_runs += 1
        self.order.observe(j)
        future = self._inflight.pop(j, None)
        start = time.perf_counter()
        if future is None:
            if j not in self._wanted:
                # Mispredicted: give back the other read-aheads' buffers before reading j,
                # then read ahead from here once j holds its buffer.
                self.drop_read_ahead()
            loaded = self._load_streamed(j)
            self.read_ahead(j)
        else:
            self.read_ahead(j)  # start the next reads before waiting for this one
            loaded = future.result()
        try:
            assert loaded.data is not None
            loaded.tensors = self._views(loaded)
        except BaseException:
            self.release(loaded)
            raise
        self.stats.wait_s += time.perf_counter() - start
        return loaded

    def _views(self, loaded: Loaded) -> dict[str, torch.Tensor]:
        assert loaded.data is not None
        if not loaded.kept:
            return self._tensors(loaded.info, loaded.data, loaded.version)
        with self._lock:
            kept = self._kept.get(loaded.index)
        if kept is None or kept.data is not loaded.data:  # remapped meanwhile (a rare race)
            return self._tensors(loaded.info, loaded.data, loaded.version)
        if kept.tensors is None:
            kept.tensors = self._tensors(loaded.info, loaded.data, loaded.version)
        return kept.tensors

    def read_ahead(self, j: int) -> None:
        """Start reading the blocks predicted to run after ``j``, except, with the mmap
        reader, those already in the page cache: mapping those on the compute thread costs
        ~0.1 ms, while handing them to an I/O thread costs more (measured warm on 2 vCPUs:
        cross-CPU wake-ups and TLB flushes slowed compute by 10-20%)."""
        if self._io is None:
            return
        wanted = self.order.upcoming(j, self.plan.resident, self.plan.read_ahead)
        before, self._wanted = self._wanted, frozenset(wanted)
        for k in list(self._inflight):
            if k not in wanted:
                self._discard(self._inflight.pop(k))
        for k in wanted:
            # a block predicted last time and not read then was in memory: not probed again
            if k not in self._inflight and k not in before and not self._in_memory(k):
                self._inflight[k] = self._io.submit(self._load_streamed, k)
                self.stats.read_aheads += 1

    def _in_memory(self, k: int) -> bool:
        if self._probe is None:
            return False
        return self._probe(self.manifest.chunks[self.manifest.blocks[k].chunk].file)

    def check_unchanged(self, loaded: Loaded) -> None:
        """After block ``loaded`` has run: a kept mapping's file must still have the version
        checked before the block ran. A file rewritten in place shows through a shared
        mapping at once, so a change means the block may have run on bytes nobody verified:
        the request fails (its next use maps and verifies the file again)."""
        if not loaded.kept:
            return
        info = loaded.info
        now = self._mappable().version(info.file)
        if now != loaded.version:
            raise ChunkIntegrityError(
                f"chunk {info.name} ({info.file} in {self.store.uri}) was modified while its "
                "block ran, so this request's output cannot be trusted; retry it. Replace "
                "chunk files by rename (as the chunker does), never rewrite them in place"
            )

    def release(self, loaded: Loaded) -> None:
        if loaded.release is not None:
            # drop the views first: the buffer or mapping is reused or unmapped next (not
            # clear(): a kept mapping's dict is shared and stays valid)
            loaded.tensors = {}
            loaded.data = None
            release, loaded.release = loaded.release, None
            release()

    def drop_read_ahead(self) -> None:
        """Give back every read-ahead buffer (after a request ends or fails)."""
        self._wanted = frozenset()
        for k in list(self._inflight):
            self._discard(self._inflight.pop(k))

    def _discard(self, future: Future[Loaded]) -> None:
        if future.cancel():
            return

        def give_back(done: Future[Loaded]) -> None:
            if done.exception() is None:
                self.release(done.result())

        future.add_done_callback(give_back)

    def close(self) -> None:
        self.drop_read_ahead()
        if self._io is not None:
            # in-flight reads finish and hand their mappings to the reaper, which goes last
            self._io.shutdown(wait=True, cancel_futures=True)
        self._reaper.shutdown(wait=True)
        for j in list(self._kept):
            self._forget(j)
