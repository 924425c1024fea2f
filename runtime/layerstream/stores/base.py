"""The one small contract every chunk store implements."""

from __future__ import annotations

import mmap
from typing import NamedTuple, Protocol, runtime_checkable


class ReadResult(NamedTuple):
    size: int
    # Identifies this content of the file (local: inode, size, mtime; remote: ETag), or None
    # when unknown or the file changed during the read. Equal versions mean equal bytes, so
    # a chunk verified once need not be hashed again until its version changes.
    version: str | None
    # True when the store itself checked these bytes against the manifest's sha256 (the
    # disk cache does): the streamer then does not hash them a second time.
    verified: bool = False


class Mapped(NamedTuple):
    """A read-only memory mapping of a whole file (stores on a local file system only)."""

    data: mmap.mmap
    size: int
    version: str | None


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
