"""The zero-copy reader of local stores: each streamed chunk file stays mapped.

A streamed chunk's mapping is kept from its first use until the engine closes. Its pages are
populated before the block runs and dropped (MADV_DONTNEED) after it, so the process's RSS
holds only the blocks in flight, as with a mapping per use; but the open, mmap, munmap,
header parse, tensor views and their installation in the module happen once rather than per
block per token (docs/design-notes-engine.md, "Kept mappings").
"""

from __future__ import annotations

import mmap
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..errors import ChunkIntegrityError
from ..format.manifest import ChunkInfo
from ..stores import FileMapping, MappableStore
from .checks import ChunkChecks
from .readers import BlockReader, Lease, ReaderKind


@dataclass
class KeptMapping:
    """A streamed chunk's mapping, its checked bytes and (once made) its tensor views."""

    mapping: FileMapping = field(repr=False)
    data: torch.Tensor = field(repr=False)
    version: str | None
    tensors: dict[str, torch.Tensor] | None = field(repr=False, default=None)


def _view(mapping: mmap.mmap) -> torch.Tensor:
    with warnings.catch_warnings():
        # read-only on purpose: weights are never written
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(mapping, dtype=torch.uint8)


class MappedLease(Lease):
    def __init__(
        self,
        index: int,
        info: ChunkInfo,
        data: torch.Tensor,
        version: str | None,
        reader: MappedReader,
    ):
        super().__init__(index, info, version)
        self._data: torch.Tensor | None = data
        self._reader = reader
        # views of the kept mapping stay valid between uses; dequantized tensors are made
        # per use, and go with it
        self.dequantization = reader.checks.dequantization(info, data, version)
        self.kept = self.dequantization is None

    def _views(self) -> dict[str, torch.Tensor]:
        assert self._data is not None
        if self.dequantization is not None:
            return self._reader.checks.tensors(
                self.info, self._data, self.version, self._dequantized()
            )
        return self._reader.views(self.index, self.info, self._data, self.version)

    def confirm(self) -> None:
        self._reader.confirm_unchanged(self.info, self.version)

    def _give_back(self) -> None:
        self._data = None
        self._reader.after_use(self.index, self.info)


class MappedReader(BlockReader):
    """Maps streamed chunks once and keeps them; ``buffers`` bounds the blocks in flight."""

    kind = ReaderKind.MMAP

    def __init__(
        self,
        store: MappableStore,
        checks: ChunkChecks,
        buffers: int,
        evict: Callable[[str], None] | None = None,
    ):
        super().__init__(checks)
        self.store = store
        self._evict = evict  # drop streamed chunks from the page cache after use
        self._in_flight = threading.BoundedSemaphore(buffers)
        self._lock = threading.Lock()
        self._kept: dict[int, KeptMapping] = {}
        # Page drops (and evictions) go to a thread of their own, off the compute thread
        # (docs/design-notes-engine.md, "The reaper").
        self._reaper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layerstream-unmap")

    def lease(self, j: int, info: ChunkInfo) -> Lease:
        self._in_flight.acquire()
        try:
            data, version = self.checks.refetching(info, lambda: self._populate(j, info))
        except BaseException:
            self._in_flight.release()
            raise
        return MappedLease(j, info, data, version, self)

    def _populate(self, j: int, info: ChunkInfo) -> tuple[torch.Tensor, str | None]:
        """Block j's kept mapping with its pages populated and its bytes checked; mapped
        (again) on first use, and when the file's version changed (rewritten in place or
        replaced), so what runs is always the file the store holds now."""
        with self._lock:
            kept = self._kept.get(j)
        if kept is not None:
            start = time.perf_counter()
            version = self.store.version(info.file)
            if version == kept.version:
                kept.mapping.populate()
                try:
                    self.checks.check(info, kept.data, version, start)
                except BaseException:
                    self._forget(j)
                    raise
                return kept.data, version
            self._forget(j)
        start = time.perf_counter()
        mapped = self.store.map(info.file)
        data: torch.Tensor | None = None
        try:
            data = _view(mapped.data)
            self.checks.check(info, data, mapped.version, start)
        except BaseException:
            data = None  # release the view before unmapping
            mapped.close()
            raise
        with self._lock:
            self._kept[j] = KeptMapping(mapped, data, mapped.version)
        return data, mapped.version

    def views(
        self, j: int, info: ChunkInfo, data: torch.Tensor, version: str | None
    ) -> dict[str, torch.Tensor]:
        """The kept mapping's tensors, made on its first use."""
        with self._lock:
            kept = self._kept.get(j)
        if kept is None or kept.data is not data:  # remapped meanwhile (a rare race)
            return self.checks.tensors(info, data, version)
        if kept.tensors is None:
            kept.tensors = self.checks.tensors(info, data, version)
        return kept.tensors

    def confirm_unchanged(self, info: ChunkInfo, version: str | None) -> None:
        """After the block has run, its file must still have the version checked before. A
        file rewritten in place shows through a shared mapping at once, so a change means
        the block may have run on bytes nobody verified: the request fails (its next use
        maps and verifies the file again)."""
        if self.store.version(info.file) != version:
            raise ChunkIntegrityError(
                f"chunk {info.name} ({info.file} in {self.store.uri}) was modified while its "
                "block ran, so this request's output cannot be trusted; retry it. Replace "
                "chunk files by rename (as the chunker does), never rewrite them in place"
            )

    def after_use(self, j: int, info: ChunkInfo) -> None:
        self._reaper.submit(self._drop_pages, j, info)

    def _drop_pages(self, j: int, info: ChunkInfo) -> None:
        with self._lock:
            kept = self._kept.get(j)
        try:
            if kept is not None:
                kept.mapping.drop_pages()
        finally:
            self._in_flight.release()
        if self._evict is not None:
            self._evict(info.file)

    def _forget(self, j: int) -> None:
        """Stop keeping block j's mapping; it is unmapped once no tensor views it."""
        with self._lock:
            kept = self._kept.pop(j, None)
        if kept is not None:
            kept.tensors = None
            kept.mapping.close()

    def load_resident(self, info: ChunkInfo) -> dict[str, torch.Tensor]:
        """The bytes are copied out of a mapping rather than read: the page cache then holds
        the file in 2 MiB folios like every streamed chunk (see LocalStore.map), instead of
        the small ones a plain read() leaves behind. A quantized chunk is dequantized
        straight from its mapping (checks.held): only what it holds is ever in memory."""
        if self.checks.quantization(info) is not None:
            tensors = self.checks.refetching(info, lambda: self._held(info))
        else:
            copy, version = self.checks.refetching(info, lambda: self._copy(info))
            tensors = self.checks.tensors(info, copy, version)
        if self._evict is not None:
            self._evict(info.file)  # the copy is what stays; its page cache would not
        return tensors

    def _held(self, info: ChunkInfo) -> dict[str, torch.Tensor]:
        """A quantized chunk's tensors held from its mapping, checked before they are made
        and its file's version after: a file rewritten meanwhile shows through the mapping,
        and fails the load (once more from the file, then for good)."""
        start = time.perf_counter()
        mapped = self.store.map(info.file)
        data: torch.Tensor | None = None
        try:
            data = _view(mapped.data)
            self.checks.check(info, data, mapped.version, start, always=True)
            tensors = self.checks.held(info, data, mapped.version)
        finally:
            data = None  # release the view before unmapping
            mapped.close()
        if self.store.version(info.file) != mapped.version:
            raise ChunkIntegrityError(
                f"chunk {info.name} ({info.file} in {self.store.uri}) was modified while it "
                "was being pinned. Replace chunk files by rename (as the chunker does), never "
                "rewrite them in place"
            )
        return tensors

    def _copy(self, info: ChunkInfo) -> tuple[torch.Tensor, str | None]:
        """A copy of a mapped chunk, hashed after it was made: a file rewritten between a
        check of the mapping and the copy would otherwise stay in memory unverified."""
        start = time.perf_counter()
        mapped = self.store.map(info.file)
        try:
            copy = _view(mapped.data).clone()
        finally:
            mapped.close()
        self.checks.check(info, copy, mapped.version, start, always=True)
        return copy, mapped.version

    def in_memory(self, info: ChunkInfo) -> bool:
        return self.store.in_memory(info.file)

    def settle(self) -> None:
        self._reaper.submit(lambda: None).result()

    def close(self) -> None:
        self._reaper.shutdown(wait=True)
        for j in list(self._kept):
            self._forget(j)
