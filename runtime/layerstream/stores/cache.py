"""A local disk cache in front of a remote store, addressed by the manifest's sha256.

Files are named by their content's sha256 (``<dir>/sha256/ab/abcdef…``), so a cache entry can
never be stale (a re-chunked model has new digests), can be shared by several models and
several server processes, and is checked by hashing it on every read. Entries are written
to a unique temporary name and renamed into place: a reader sees a whole file or none, and
a crash mid-write leaves only a temporary file, removed by the next eviction. Over the byte
budget, the least recently used entries (by mtime, bumped on every hit) are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import ChunkIntegrityError, ChunkStoreError
from ..format.manifest import Manifest
from .base import ChunkStore, ConditionalStore, ReadResult
from .fileio import read_fully

log = logging.getLogger(__name__)
STALE_TEMP_S = 3600  # temporary files older than this were left by a crashed writer


SCAN_SHARE = 64  # the eviction scan runs once per this share of the budget written


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    discarded: int = 0  # entries that failed their sha256 check and were removed
    bytes_from_origin: int = 0


class DiskCache:
    """Verified, content-addressed files under ``directory``, at most ``budget`` bytes."""

    def __init__(self, directory: str | os.PathLike[str], budget: int):
        self.root = Path(directory).expanduser().resolve() / "sha256"
        self.budget = budget
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ChunkStoreError(f"cannot create the disk cache at {self.root}: {exc}") from exc
        if not os.access(self.root, os.W_OK):
            raise ChunkStoreError(f"the disk cache {self.root} is not writable by this process")
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._unscanned = 0  # bytes put since the last eviction scan

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def read_into(self, digest: str, size: int, buffer: memoryview) -> bool:
        """Fill ``buffer[:size]`` from the entry and check its sha256. False on a miss; a
        corrupt or truncated entry is removed (and counted) and also gives False."""
        path = self.path(digest)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self.count(misses=1)
            return False
        try:
            got = read_fully(fd, buffer[:size]) if os.fstat(fd).st_size == size else 0
        finally:
            os.close(fd)
        if got == size and hashlib.sha256(buffer[:size]).hexdigest() == digest:
            _touch(path)
            self.count(hits=1)
            return True
        log.warning("disk cache entry %s is corrupt or truncated: removed, fetching again", path)
        _unlink(path)
        self.count(misses=1, discarded=1)
        return False

    def put(self, digest: str, data: memoryview) -> None:
        """Store verified bytes (a failure to cache is logged: the bytes are still good)."""
        if len(data) > self.budget:
            return
        path = self.path(digest)
        temp = path.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex}"
        try:
            path.parent.mkdir(exist_ok=True)
            with open(temp, "wb") as f:
                f.write(data)
            os.replace(temp, path)  # atomic: other processes see all of it or nothing
        except OSError as exc:
            _unlink(temp)
            log.warning("could not write disk cache entry %s: %s", path, exc)
            return
        # The directory is scanned once per 1/SCAN_SHARE of the budget written, not after
        # every entry: an expert-streamed model writes an entry per expert, thousands, and a
        # scan stats them all. The cache may pass its budget by that share meanwhile.
        with self._lock:
            self._unscanned += len(data)
            due = self._unscanned >= self.budget // SCAN_SHARE
            if due:
                self._unscanned = 0
        if due:
            self.evict_to_budget()

    def evict_to_budget(self) -> None:
        entries = []
        now = time.time()
        for path in self.root.glob("*/*"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # another process removed it
            if path.name.startswith(".tmp-"):
                if now - st.st_mtime > STALE_TEMP_S:
                    _unlink(path)
                continue
            entries.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.budget:
                break
            _unlink(path)
            total -= size

    # -- files revalidated with the origin (the manifest) ---------------------------------
    def revalidated_path(self, key: str) -> Path:
        return self.root.parent / "revalidated" / hashlib.sha256(key.encode()).hexdigest()

    @staticmethod
    def load_revalidated(path: Path) -> tuple[str | None, bytes | None]:
        """(version, bytes) of a stored copy, or (None, None) if absent or damaged. One file
        holds the version, the bytes' sha256 and the bytes, so they always go together."""
        try:
            raw = path.read_bytes()
            version, digest, data = raw.split(b"\n", 2)
        except (OSError, ValueError):
            return None, None
        if hashlib.sha256(data).hexdigest().encode() != digest:
            return None, None
        return version.decode(), data

    def store_revalidated(self, path: Path, version: str, data: bytes) -> None:
        if "\n" in version:
            return
        digest = hashlib.sha256(data).hexdigest()
        temp = path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex}")
        try:
            path.parent.mkdir(exist_ok=True)
            temp.write_bytes(f"{version}\n{digest}\n".encode() + data)
            os.replace(temp, path)
        except OSError as exc:
            _unlink(temp)
            log.warning("could not keep %s in the disk cache: %s", path, exc)

    def count(
        self, hits: int = 0, misses: int = 0, discarded: int = 0, bytes_from_origin: int = 0
    ) -> None:
        with self._lock:  # reader threads count at once
            self.stats.hits += hits
            self.stats.misses += misses
            self.stats.discarded += discarded
            self.stats.bytes_from_origin += bytes_from_origin


class CachedStore:
    """A remote store with a DiskCache in front: files the manifest gives a sha256 for are
    served from the cache when it holds them, else fetched, verified and cached."""

    def __init__(self, origin: ChunkStore, cache: DiskCache):
        self.origin = origin
        self.cache = cache
        self.uri = origin.uri
        self._digests: dict[str, tuple[int | None, str]] = {}

    def expect(self, manifest: Manifest) -> None:
        """Learn each file's size and sha256 (called once the manifest has been read)."""
        digests: dict[str, tuple[int | None, str]] = {
            info.file: (info.bytes, info.sha256) for info in manifest.chunks.values()
        }
        digests.update({name: (None, sha) for name, sha in manifest.file_sha256.items()})
        self._digests = digests

    def read(self, name: str) -> bytes:
        if name not in self._digests:
            return self._revalidated(name)
        _, digest = self._digests[name]
        path = self.cache.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = None
        if data is not None and hashlib.sha256(data).hexdigest() == digest:
            _touch(path)
            self.cache.count(hits=1)
            return data
        if data is not None:
            _unlink(path)
            self.cache.count(discarded=1)
        self.cache.count(misses=1)
        data = self.origin.read(name)
        self._check(name, memoryview(data), digest)
        self.cache.put(digest, memoryview(data))
        return data

    def _revalidated(self, name: str) -> bytes:
        """A file the manifest gives no digest for (the manifest itself): always asked of the
        origin, which tells whether the cached copy is still current (HTTP 304, no body), so
        a warm restart transfers no bytes of it. Without conditional reads: read whole."""
        if not isinstance(self.origin, ConditionalStore):
            return self.origin.read(name)
        conditional = self.origin.read_if_changed
        path = self.cache.revalidated_path(f"{self.uri}/{name}")
        version, cached = self.cache.load_revalidated(path)
        data, new_version = conditional(name, version if cached is not None else None)
        if data is None and cached is not None:
            self.cache.count(hits=1)
            return cached
        if data is None:  # 304 for a copy we no longer have: fetch it whole
            data, new_version = conditional(name, None)
            assert data is not None
        self.cache.count(misses=1, bytes_from_origin=len(data))
        if new_version:
            self.cache.store_revalidated(path, new_version, data)
        return data

    def read_into(self, name: str, buffer: memoryview, size: int | None = None) -> ReadResult:
        if name not in self._digests:
            return self.origin.read_into(name, buffer, size)
        size, digest = self._digests[name]
        if size is not None and size <= len(buffer) and self.cache.read_into(digest, size, buffer):
            return ReadResult(size, f"sha256:{digest}", verified=True)
        got = self.origin.read_into(name, buffer, size)
        self._check(name, buffer[: got.size], digest)
        self.cache.put(digest, buffer[: got.size])
        return ReadResult(got.size, f"sha256:{digest}", verified=True)

    def read_ranges(
        self, name: str, buffer: memoryview, ranges: list[tuple[int, int]], size: int
    ) -> ReadResult:
        """From the cached copy of the whole chunk when there is one, else from the origin
        (not cached: ``read_part`` caches a part it knows the digest of)."""
        got = self._from_whole_copy(name, buffer, ranges, size)
        if got is None:
            got = self.origin.read_ranges(name, buffer, ranges, size)
            self.cache.count(misses=1, bytes_from_origin=got.size)
        return got

    def read_part(
        self,
        name: str,
        buffer: memoryview,
        ranges: list[tuple[int, int]],
        size: int,
        digest: str,
    ) -> ReadResult:
        """``read_ranges`` of one part of a chunk whose bytes at ``ranges``, concatenated,
        have sha256 ``digest`` (an expert, a block's base): from the cache's entry for the
        part or its copy of the whole chunk, else from the origin, then kept as an entry of
        its own. Bytes that fail the digest are an error and are not cached; bytes that
        passed it are returned ``verified`` (the reader need not hash them again)."""
        part = bytearray(sum(n for _, n in ranges))
        view = memoryview(part)
        if self.cache.read_into(digest, len(part), view):
            _scatter(view, buffer, ranges)
            return ReadResult(len(part), None, verified=True)
        got = self._from_whole_copy(name, buffer, ranges, size)
        if got is None:
            got = self.origin.read_ranges(name, buffer, ranges, size)
            _gather(buffer, ranges, view)
            self._check(name, view, digest)  # counts the bytes from the origin
        else:
            _gather(buffer, ranges, view)
            if hashlib.sha256(view).hexdigest() != digest:
                return got  # the reader's own check names the damage
        self.cache.put(digest, view)
        return ReadResult(got.size, None, verified=True)

    def _from_whole_copy(
        self, name: str, buffer: memoryview, ranges: list[tuple[int, int]], size: int
    ) -> ReadResult | None:
        if name not in self._digests:
            return None
        path = self.cache.path(self._digests[name][1])
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            if os.fstat(fd).st_size == size:
                got = sum(read_fully(fd, buffer[o : o + n], o) for o, n in ranges)
                if got == sum(n for _, n in ranges):
                    self.cache.count(hits=1)
                    return ReadResult(got, None)
        finally:
            os.close(fd)
        return None

    def _check(self, name: str, data: memoryview, digest: str) -> None:
        self.cache.count(bytes_from_origin=len(data))
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise ChunkIntegrityError(
                f"{self.uri}/{name} failed its sha256 check: expected {digest[:12]}…, got "
                f"{actual[:12]}…; not cached. Re-run the chunker or check the store"
            )

    def read_head(self, name: str, length: int) -> tuple[bytes, int | None]:
        """From the cached copy when there is one (a warm restart asks nothing of the origin;
        the copy is hashed whole when it is read), else from the origin."""
        if name in self._digests:
            path = self.cache.path(self._digests[name][1])
            try:
                with open(path, "rb") as f:
                    return f.read(length), os.fstat(f.fileno()).st_size
            except FileNotFoundError:
                pass
        return self.origin.read_head(name, length)

    def invalidate(self, name: str) -> None:
        """Drop the cached copy of ``name`` (its bytes failed a check): the next read fetches
        it from the origin."""
        if name in self._digests and _unlink(self.cache.path(self._digests[name][1])):
            self.cache.count(discarded=1)

    def exists(self, name: str) -> bool:
        return self.origin.exists(name)

    def list(self) -> list[str]:
        return self.origin.list()

    def close(self) -> None:
        self.origin.close()


def _scatter(part: memoryview, buffer: memoryview, ranges: list[tuple[int, int]]) -> None:
    """A part's concatenated bytes into ``buffer`` at its ranges."""
    position = 0
    for offset, length in ranges:
        buffer[offset : offset + length] = part[position : position + length]
        position += length


def _gather(buffer: memoryview, ranges: list[tuple[int, int]], part: memoryview) -> None:
    """``buffer``'s bytes at ``ranges``, concatenated into ``part``."""
    position = 0
    for offset, length in ranges:
        part[position : position + length] = buffer[offset : offset + length]
        position += length


def _touch(path: Path) -> None:
    # Removed meanwhile by another process's eviction: fine, the bytes read were verified.
    with contextlib.suppress(OSError):
        os.utime(path)  # most recently used: evicted last


def _unlink(path: Path) -> bool:
    """Remove ``path``; whether it was there."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
