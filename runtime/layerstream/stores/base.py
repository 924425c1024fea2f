"""The one small contract every chunk store implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


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

    def read_into(self, name: str, buffer: memoryview) -> int:
        """Fill ``buffer`` from the start of ``name``; return the file's size.

        Raises when the file is larger than the buffer or cannot be read completely.
        """
        ...

    def exists(self, name: str) -> bool: ...

    def list(self) -> list[str]: ...
