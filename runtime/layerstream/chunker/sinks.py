"""Where the chunker's files go: a local directory, or S3 through a local staging folder.

Either way the manifest is written last, and only once every chunk is durable (fsynced
locally, acknowledged by S3): a store without a manifest is incomplete, so an interrupted
chunker never leaves something that looks servable. A store being replaced stays whole and
servable until the new one is complete.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from ..errors import ChunkStoreError
from ..format.manifest import MANIFEST_NAME
from ..format.writer import sync_files, write_durably
from ..stores.ranged import StoreOptions

log = logging.getLogger(__name__)
T = TypeVar("T")


class ChunkerError(Exception):
    """The checkpoint or the destination cannot be chunked as asked (bad input, not a bug)."""


class Sink(Protocol):
    uri: str
    staging: Path  # the chunker writes each file here first

    def stored_name(self, name: str) -> str:
        """Where the file staged as ``name`` is in the store: the manifest's name for it."""
        ...

    def file_done(self, name: str) -> None:
        """``staging/name`` is complete (called from the chunker's writer threads)."""
        ...

    def commit(self, names: list[str], manifest: bytes) -> None:
        """Every file is done: make them durable, then write the manifest."""
        ...

    def close(self) -> None: ...


class LocalSink:
    """Writes into ``dest``; with ``force`` over a store already there, into a folder beside
    it, swapped in for it once complete, so that the store in place stays whole (and served)
    until the new one is, and an interrupted chunker leaves it as it was."""

    def __init__(self, dest: Path, force: bool):
        self.dest = dest
        self._replacing = dest.exists() and any(dest.iterdir())
        if self._replacing:
            if not force:
                raise ChunkerError(f"{dest} is not empty; pass --force to overwrite it")
            self.staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.new-", dir=dest.parent))
        else:
            self._created = not dest.exists()
            dest.mkdir(parents=True, exist_ok=True)
            self.staging = dest
        self.uri = str(dest)
        self._committed = False

    def stored_name(self, name: str) -> str:
        return name  # the whole folder is swapped in

    def file_done(self, name: str) -> None:
        pass  # written in place; made durable all at once in commit

    def commit(self, names: list[str], manifest: bytes) -> None:
        sync_files([self.staging / n for n in names])
        write_durably(self.staging / MANIFEST_NAME, manifest)
        if self._replacing:
            old = swap_directories(self.staging, self.dest)
            shutil.rmtree(old)
        self._committed = True

    def close(self) -> None:
        """After a failure, what was written goes: a store in place stays as it was."""
        if self._committed:
            return
        if self._replacing or self._created:
            shutil.rmtree(self.staging, ignore_errors=True)
        else:  # an empty folder given: emptied again
            for path in self.staging.iterdir():
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def swap_directories(new: Path, dest: Path) -> Path:
    """Put ``new`` in place of ``dest`` and return where the old one is now: in one atomic
    step where Linux can (renameat2 RENAME_EXCHANGE: a reader of ``dest`` sees the old
    store or the new one, never neither), else by two renames."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        at_cwd, exchange = -100, 2
        if renameat2(at_cwd, bytes(new), at_cwd, bytes(dest), exchange) == 0:
            return new  # now holds the old store
        log.debug("renameat2 failed (errno %d); renaming twice", ctypes.get_errno())
    aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    os.replace(dest, aside / dest.name)
    os.replace(new, dest)
    return aside


class S3Sink:
    """Uploads each finished file (multipart above 64 MiB) and removes its staged copy, so
    the local disk holds only the chunks in flight; the manifest goes up last.

    S3 renames nothing, so a store that replaces another is written beside it, in a folder
    of its own under the prefix (``r-<id>/``, which the new manifest names), and the
    manifest is replaced in one PUT at the end: until then the old store stays whole and
    served, and a chunker that dies leaves it as it was. The old store's objects are deleted
    after the new manifest is up."""

    MULTIPART_BYTES = 64 << 20

    def __init__(self, uri: str, force: bool, options: StoreOptions | None = None):
        from boto3.s3.transfer import TransferConfig

        from ..stores.s3 import BOTO_ERRORS, S3Location, describe_error, make_client

        self._errors, self._describe = BOTO_ERRORS, describe_error
        self.options = options or StoreOptions()
        self.location = S3Location.parse(uri)
        self.bucket = self.location.bucket
        self.uri = self.location.uri
        self._client = make_client(self.options)
        self._transfer = TransferConfig(
            multipart_threshold=self.MULTIPART_BYTES,
            multipart_chunksize=self.MULTIPART_BYTES // 4,
            max_concurrency=self.options.max_concurrency,
        )
        existing = self._keys()
        if existing and not force:
            raise ChunkerError(f"{self.uri} already holds {len(existing)} objects; pass --force")
        self.folder = f"r-{uuid.uuid4().hex[:12]}/" if existing else ""
        self._stale = existing - {self._key(MANIFEST_NAME)}
        self._tmp = tempfile.TemporaryDirectory(prefix="layerstream-staging-")
        self.staging = Path(self._tmp.name)

    def _key(self, name: str) -> str:
        return self.location.key(name)

    def stored_name(self, name: str) -> str:
        return self.folder + name

    def _call(self, op: Callable[[], T]) -> T:
        """``op()`` with botocore's errors worded like the S3 store's (no retries: a failed
        upload fails the chunker, which can be run again)."""
        try:
            return op()
        except self._errors as exc:
            raise self._describe(exc, self.uri) from exc

    def _keys(self) -> set[str]:
        return set(self._call(lambda: self.location.list_keys(self._client)))

    def file_done(self, name: str) -> None:
        path = self.staging / name
        self._call(
            lambda: self._client.upload_file(
                str(path), self.bucket, self._key(self.stored_name(name)), Config=self._transfer
            )
        )
        path.unlink()
        log.debug("uploaded %s to %s", name, self.uri)

    def commit(self, names: list[str], manifest: bytes) -> None:
        for name in names:
            if (self.staging / name).exists():  # side files are staged, not yet uploaded
                self.file_done(name)
        self._call(
            lambda: self._client.put_object(
                Bucket=self.bucket, Key=self._key(MANIFEST_NAME), Body=manifest
            )
        )
        # the new store is whole and named: the old one's objects go (a server still
        # serving it hears so at its next read, and is told to reload)
        for key in sorted(self._stale - {self._key(self.stored_name(n)) for n in names}):
            self._call(lambda key=key: self._client.delete_object(Bucket=self.bucket, Key=key))

    def close(self) -> None:
        self._tmp.cleanup()


def open_sink(dest: str | Path, force: bool, options: StoreOptions | None = None) -> Sink:
    text = str(dest)
    if text.startswith("s3://"):
        try:
            return S3Sink(text, force, options)
        except ChunkStoreError as exc:
            raise ChunkerError(str(exc)) from exc
    if "://" in text and not text.startswith("file://"):
        raise ChunkerError(f"{text}: the chunker writes to a directory or s3://bucket/prefix")
    return LocalSink(Path(text.removeprefix("file://")), force)
