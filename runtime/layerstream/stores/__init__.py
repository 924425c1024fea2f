"""Chunk stores: where the manifest and the per-block safetensors files live."""

from __future__ import annotations

from pathlib import Path

from ..errors import ChunkStoreError
from .base import ChunkStore, Mapped, ReadResult
from .local import LocalStore

__all__ = ["ChunkStore", "LocalStore", "Mapped", "ReadResult", "open_store"]


def open_store(uri: str, base_dir: str | Path | None = None) -> ChunkStore:
    """Open a chunk store from a URI: a directory path (relative paths resolve against
    ``base_dir``, the model folder) or ``file://`` URL."""
    if "://" in uri and not uri.startswith("file://"):
        scheme = uri.split("://", 1)[0]
        raise ChunkStoreError(
            f"chunk store {uri!r}: the {scheme}:// scheme is not supported by this version; "
            "use a local directory"
        )
    path = Path(uri.removeprefix("file://")).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return LocalStore(path)
