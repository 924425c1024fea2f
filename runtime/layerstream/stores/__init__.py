"""Chunk stores: where the manifest and the per-block safetensors files live.

``open_store`` picks one from the URI: a directory (or ``file://``), ``s3://bucket/prefix``
or ``http(s)://host/path``; remote stores get the disk cache in front when one is configured.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ChunkStoreError
from .base import (
    CachingStore,
    ChunkStore,
    ConditionalStore,
    FileMapping,
    MappableStore,
    ReadResult,
)
from .cache import CachedStore, DiskCache
from .local import LocalStore
from .ranged import StoreOptions

__all__ = [
    "CachedStore",
    "CachingStore",
    "ChunkStore",
    "ConditionalStore",
    "DiskCache",
    "FileMapping",
    "LocalStore",
    "MappableStore",
    "ReadResult",
    "StoreOptions",
    "is_remote",
    "open_store",
]

REMOTE_SCHEMES = ("s3", "http", "https")


def is_remote(uri: str) -> bool:
    return uri.split("://", 1)[0] in REMOTE_SCHEMES if "://" in uri else False


def open_store(
    uri: str, base_dir: str | Path | None = None, options: StoreOptions | None = None
) -> ChunkStore:
    """Open a chunk store from a URI: a directory path (relative paths resolve against
    ``base_dir``, the model folder), ``file://`` URL, ``s3://bucket/prefix`` or
    ``http(s)://host/path``."""
    options = options or StoreOptions()
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    store: ChunkStore
    if scheme == "s3":
        from .s3 import S3Store  # boto3 is imported only when an S3 store is used

        store = S3Store(uri, options)
    elif scheme in ("http", "https"):
        from .http import HTTPStore

        store = HTTPStore(uri, options)
    elif scheme == "file":
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        return LocalStore(path)
    else:
        raise ChunkStoreError(
            f"chunk store {uri!r}: unknown scheme {scheme}://; use a directory, file://, "
            "s3:// or http(s)://"
        )
    if options.cache_dir:
        try:
            cache = DiskCache(options.cache_dir, options.cache_bytes)
        except ChunkStoreError:
            store.close()  # remote stores own a thread pool and connections
            raise
        store = CachedStore(store, cache)
    return store
