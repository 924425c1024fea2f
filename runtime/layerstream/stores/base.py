"""What chunk stores are: the contract every store implements, and the capabilities that
only some have, declared as protocols so callers test for them by type.

- ``ChunkStore``: every store (a directory, S3, HTTP(S), the disk cache in front of those).
- ``MappableStore``: files on a local file system, which can be memory-mapped and whose
  page cache can be probed and dropped (``LocalStore``).
- ``ConditionalStore``: a remote origin that answers "unchanged since version V" without
  sending the body (S3, HTTP); the disk cache revalidates the manifest with it.
- ``CachingStore``: a store that keeps copies addressed by the manifest's digests (the disk
  cache): it must learn the manifest, and drop a copy whose bytes failed a check.
"""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..format.manifest import Manifest


class ReadResult(NamedTuple):
    size: int
    # Identifies this content of the file (local: inode, size, mtime; remote: ETag), or None
    # when unknown or the file changed during the read. Equal versions mean equal bytes, so
    # a chunk verified once need not be hashed again until its version changes.
    version: str | None
    # True when the store itself checked these bytes against the manifest's sha256 (the
    # disk cache does): the streamer then does not hash them a second time.
    verified: bool = False


class FileMapping(Protocol):
    """A read-only memory mapping of a whole chunk file (``MappableStore.map``)."""

    data: mmap.mmap
    size: int
    version: str | None  # the file's version when it was mapped

    def populate(self) -> None:
        """Fault the pages in (again, after ``drop_pages``) without holding the GIL."""
        ...

    def drop_pages(self) -> None:
        """Take the pages out of this process's memory but keep the mapping: the page
        cache may still hold them, and the next ``populate`` maps them again."""
        ...

    def close(self) -> None:
        """Unmap (later, when a tensor still views it)."""
        ...


@runtime_checkable
class ChunkStore(Protocol):
    """A flat namespace of files (``manifest.json``, ``block_0003.safetensors``, ...).

    Implementations raise :class:`layerstream.errors.ChunkStoreError` with the location and
    the likely fix; they never return partial data.
    """

    uri: str

    def read(self, name: str) -> bytes:
        """Return a whole (small) file: manifest, config, tokenizer files."""
        ...

    def read_into(self, name: str, buffer: memoryview, size: int | None = None) -> ReadResult:
        """Fill ``buffer`` from the start of ``name``; return its size and version.

        ``size`` is what the manifest says the file holds, when known (a remote store then
        fetches all of its parts at once). Raises when the file is larger than the buffer or
        cannot be read completely.
        """
        ...

    def read_ranges(
        self, name: str, buffer: memoryview, ranges: list[tuple[int, int]], size: int
    ) -> ReadResult:
        """Fill ``buffer[offset : offset + length]`` with those bytes of ``name`` for each
        (offset, length) of ``ranges`` (sorted, not touching); ``buffer`` is laid out like
        the file, whose size the manifest gives as ``size``. Returns the bytes read and the
        version; remote stores fetch the ranges in parallel. A file whose size is not
        ``size`` is an error."""
        ...

    def read_head(self, name: str, length: int) -> tuple[bytes, int | None]:
        """The first ``length`` bytes of ``name`` (all of it when shorter) and its size in
        bytes, or None when the store cannot tell it without sending the whole file (an
        HTTP server that ignores ranges and sends no Content-Length)."""
        ...

    def exists(self, name: str) -> bool: ...

    def list(self) -> list[str]: ...

    def close(self) -> None:
        """Release connections and threads (idempotent)."""
        ...


@runtime_checkable
class MappableStore(ChunkStore, Protocol):
    """A store of files on a local file system."""

    def map(self, name: str) -> FileMapping:
        """``name`` mapped read-only with its pages populated."""
        ...

    def version(self, name: str) -> str:
        """``name``'s version now (one stat): equal versions mean equal bytes."""
        ...

    def in_memory(self, name: str) -> bool:
        """Whether all of ``name`` is in the page cache (False when unsure)."""
        ...

    def evict(self, name: str) -> None:
        """Drop ``name`` from the page cache (advisory)."""
        ...

    def read_ranges(
        self,
        name: str,
        buffer: memoryview,
        ranges: list[tuple[int, int]],
        size: int,
        direct: bool = False,
    ) -> ReadResult:
        """``ChunkStore.read_ranges``; ``direct``: past the page cache where the file system
        allows (stores/local.py says what lands beside each range)."""
        ...

    def sha256(self, name: str) -> tuple[str, int, str | None]:
        """``name``'s sha256, size and version (None when it changed while hashed)."""
        ...


@runtime_checkable
class ConditionalStore(ChunkStore, Protocol):
    """An origin that can answer a read with "unchanged" (HTTP 304) and no body."""

    def read_if_changed(self, name: str, version: str | None) -> tuple[bytes | None, str | None]:
        """``(None, version)`` when ``name`` still has ``version``, else its bytes and new
        version (``version=None`` always reads)."""
        ...


@runtime_checkable
class CachingStore(ChunkStore, Protocol):
    """A store holding copies addressed by the manifest's digests."""

    def expect(self, manifest: Manifest) -> None:
        """Learn every file's size and sha256 (once the manifest has been read)."""
        ...

    def invalidate(self, name: str) -> None:
        """Drop the copy of ``name`` (its bytes failed a check)."""
        ...

    def read_part(
        self,
        name: str,
        buffer: memoryview,
        ranges: list[tuple[int, int]],
        size: int,
        digest: str,
    ) -> ReadResult:
        """``read_ranges`` of one part of a chunk (an expert) whose bytes at ``ranges``,
        concatenated, have sha256 ``digest``: kept as a copy of its own."""
        ...
