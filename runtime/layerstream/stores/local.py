"""Chunk store on a local (or mounted) file system."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from ..errors import ChunkIntegrityError, ChunkStoreError
from ..format.manifest import check_relative_name
from .base import ReadResult
from .fileio import read_fully
from .mapping import LocalMapping, map_populated

log = logging.getLogger(__name__)

# O_DIRECT transfers start and end on this boundary, in the file and in memory (the largest
# logical block size of common devices)
DIRECT_ALIGN = 4096


class _NoDirectIO(Exception):
    """This file system or buffer does not allow O_DIRECT reads."""


def _stat_of_size(path: str, fd: int, size: int) -> os.stat_result:
    """``fd``'s stat, which must show the manifest's ``size``."""
    st = os.fstat(fd)
    if st.st_size != size:
        raise ChunkIntegrityError(
            f"chunk file {path} has {st.st_size} bytes, the manifest says {size}; the store "
            "was modified: re-run the chunker"
        )
    return st


def _check_range(path: str, end: int, size: int, buffer: memoryview) -> None:
    if end > min(size, len(buffer)):
        raise ChunkStoreError(f"{path}: a range ends past the chunk's {size} bytes")


def _read_span_direct(
    path: str, direct: int, fd: int, buffer: memoryview, offset: int, end: int, size: int
) -> None:
    """``[offset, end)`` of the file into ``buffer`` as the DIRECT_ALIGN-aligned span around
    it, through ``direct`` (an O_DIRECT descriptor); a tail past the buffer's last whole
    unit goes through ``fd`` and the page cache."""
    start = offset - offset % DIRECT_ALIGN
    stop = min(-(-end // DIRECT_ALIGN) * DIRECT_ALIGN, len(buffer))
    stop -= (stop - start) % DIRECT_ALIGN
    if stop > start:
        try:
            n = _pread_direct(direct, buffer[start:stop], start, size)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            raise _NoDirectIO(f"O_DIRECT read: {exc.strerror}") from exc
        if n < min(stop, size) - start:
            raise ChunkStoreError(f"chunk file {path} ended before byte {stop}")
    if stop < end:
        tail = max(stop, offset)
        if read_fully(fd, buffer[tail:end], tail) < end - tail:
            raise ChunkStoreError(f"chunk file {path} ended before byte {end}")


def _pread_direct(fd: int, view: memoryview, offset: int, size: int) -> int:
    """``read_fully`` for an O_DIRECT descriptor: stops at the file's end (``size``) rather
    than asking again there, at an offset O_DIRECT would refuse as unaligned."""
    got = 0
    while got < len(view) and offset + got < size:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


PROBE_STRIDE = 4 << 20  # bytes between the page-cache probes of ``in_memory``


class LocalStore:
    """Files under one directory; reads go straight into the caller's buffer.

    A chunk file must stay inside the store: a symbolic link that resolves outside it is
    refused (it would serve, or leak the size of, any file the server can read), and files
    are opened with O_NOFOLLOW, so a chunk replaced by a link after it was checked is refused
    too.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self._direct_ok = hasattr(os, "O_DIRECT")  # until the file system refuses it
        self.root = Path(root).expanduser().resolve()
        self._paths: dict[str, str] = {}  # name -> checked path: looked up per block per token
        self.uri = str(self.root)
        if not self.root.is_dir():
            raise ChunkStoreError(
                f"chunk store {self.root} does not exist or is not a directory; "
                "run `layerstream chunk` to create it or fix `chunk_store` in model-settings.json"
            )

    def _path(self, name: str) -> str:
        path = self._paths.get(name)
        if path is None:
            check_relative_name(name, f"chunk store {self.root}")
            path = os.path.realpath(self.root / name)
            if os.path.commonpath([path, self.root]) != str(self.root):
                raise ChunkIntegrityError(
                    f"{self.root / name} is a symbolic link that resolves outside the chunk "
                    f"store {self.root}; refusing to read it: keep the chunk files inside the "
                    "store (copy them, or re-run the chunker)"
                )
            self._paths[name] = path
        return path

    def _open(self, name: str, action: str = "open") -> int:
        """A read-only descriptor of a regular file. O_NONBLOCK: a named pipe put in a
        chunk's place would otherwise block the open (and the engine) forever."""
        path = self._path(name)
        with _chunk_file_errors(path, action):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            os.close(fd)
            raise
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise ChunkIntegrityError(
                f"{path} is not a regular file; refusing to read it: re-run the chunker"
            )
        return fd

    def read(self, name: str) -> bytes:
        fd = self._open(name)
        try:
            with _chunk_file_errors(self._path(name), "read"):
                return self._read_whole(fd, os.fstat(fd).st_size, name)
        finally:
            os.close(fd)

    def read_head(self, name: str, length: int) -> tuple[bytes, int]:
        """The first ``length`` bytes of ``name`` (all of it if shorter) and its size."""
        fd = self._open(name)
        try:
            with _chunk_file_errors(self._path(name), "read"):
                size = os.fstat(fd).st_size
                return self._read_whole(fd, min(length, size), name), size
        finally:
            os.close(fd)

    def sha256(self, name: str, step: int = 8 << 20) -> tuple[str, int, str | None]:
        """sha256 and size of ``name``, read ``step`` bytes at a time (a bounded buffer,
        whatever the file's size), and its version, or None when the file changed meanwhile."""
        fd = self._open(name)
        digest = hashlib.sha256()
        buffer = memoryview(bytearray(step))
        try:
            with _chunk_file_errors(self._path(name), "read"):
                before = os.fstat(fd)
                offset = 0
                while n := read_fully(fd, buffer, offset):
                    digest.update(buffer[:n])
                    offset += n
                after = os.fstat(fd)
        finally:
            os.close(fd)
        return digest.hexdigest(), offset, _version(before) if _same(before, after) else None

    def read_into(self, name: str, buffer: memoryview, size: int | None = None) -> ReadResult:
        del size  # the file's own size is read from its inode
        path = self._path(name)
        fd = self._open(name)
        try:
            with _chunk_file_errors(path, "read"):
                before = os.fstat(fd)
                size = before.st_size
                if size > len(buffer):
                    raise ChunkIntegrityError(
                        f"chunk file {path} has more than {len(buffer)} bytes, more than the "
                        "manifest allows; the store was modified: re-run the chunker"
                    )
                got = read_fully(fd, buffer[:size])
                if got < size:
                    raise ChunkStoreError(f"chunk file {path} ended after {got} of {size} bytes")
                after = os.fstat(fd)
                return ReadResult(size, _version(before) if _same(before, after) else None)
        finally:
            os.close(fd)

    def read_ranges(
        self,
        name: str,
        buffer: memoryview,
        ranges: list[tuple[int, int]],
        size: int,
        direct: bool = False,
    ) -> ReadResult:
        """``ranges`` of ``name`` into ``buffer`` at their offsets. ``direct``: past the page
        cache (O_DIRECT: no copy, no page cache to fill and reclaim), where the file system
        allows; each range is then read as the DIRECT_ALIGN-aligned span around it, so the
        file's own bytes beside it land in ``buffer`` too (up to DIRECT_ALIGN - 1 each side),
        and ``buffer`` must start DIRECT_ALIGN-aligned."""
        if direct and self._direct_ok and ranges:
            try:
                return self._read_ranges_direct(name, buffer, ranges, size)
            except _NoDirectIO as exc:
                self._direct_ok = False
                log.info("%s: reads go through the page cache (%s)", self.root, exc)
        path = self._path(name)
        fd = self._open(name)
        try:
            with _chunk_file_errors(path, "read"):
                # no read-ahead past a range: the bytes beside it (other experts) are not wanted,
                # and reading them would cost disk time and page cache
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                before = _stat_of_size(path, fd, size)
                got = 0
                for offset, length in ranges:
                    _check_range(path, offset + length, size, buffer)
                    n = read_fully(fd, buffer[offset : offset + length], offset)
                    if n < length:
                        end = offset + length
                        raise ChunkStoreError(f"chunk file {path} ended before byte {end}")
                    got += n
                after = os.fstat(fd)
                return ReadResult(got, _version(before) if _same(before, after) else None)
        finally:
            os.close(fd)

    def _read_ranges_direct(
        self, name: str, buffer: memoryview, ranges: list[tuple[int, int]], size: int
    ) -> ReadResult:
        path = self._path(name)
        address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
        if address % DIRECT_ALIGN:
            raise _NoDirectIO(f"a buffer at {address:#x} is not {DIRECT_ALIGN}-aligned")
        fd = self._open(name)
        try:
            with _chunk_file_errors(path, "read"):
                try:
                    direct = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECT)
                except OSError as exc:
                    raise _NoDirectIO(f"O_DIRECT: {exc.strerror or exc}") from exc
                try:
                    before = _stat_of_size(path, fd, size)
                    if os.fstat(direct).st_ino != before.st_ino:
                        raise ChunkIntegrityError(
                            f"chunk file {path} was replaced while it was opened; retry"
                        )
                    got = 0
                    for offset, length in ranges:
                        _check_range(path, offset + length, size, buffer)
                        _read_span_direct(path, direct, fd, buffer, offset, offset + length, size)
                        got += length
                    after = os.fstat(fd)
                    return ReadResult(got, _version(before) if _same(before, after) else None)
                finally:
                    os.close(direct)
        finally:
            os.close(fd)

    def map(self, name: str) -> LocalMapping:
        """Map ``name`` read-only with its pages populated now (by the calling I/O thread), so
        compute never page-faults on it. Chunk files are immutable while served (the chunker
        replaces files by rename, which leaves a live mapping intact); a file rewritten in
        place gets a new version and is verified again on its next mapping."""
        path = self._path(name)
        fd = self._open(name)
        try:
            st = os.fstat(fd)
            if not st.st_size:  # mmap refuses empty files: say what it means
                raise ChunkIntegrityError(
                    f"chunk file {path} is empty; the store was truncated: re-run the chunker"
                )
            data = map_populated(fd, st.st_size)
        except (OSError, ValueError) as exc:
            raise ChunkStoreError(f"cannot map chunk file {path}: {exc}") from exc
        finally:
            os.close(fd)
        return LocalMapping(data, st.st_size, _version(st), self.uri)

    def version(self, name: str) -> str:
        """What :meth:`map` would report as ``name``'s version now (one stat): a kept
        mapping whose file has another version since was rewritten and is mapped again."""
        path = self._path(name)
        with _chunk_file_errors(path, "stat"):
            # lstat: a chunk replaced by a symbolic link gets a new version, and is then
            # refused when it is opened (O_NOFOLLOW)
            return _version(os.stat(path, follow_symlinks=False))

    def in_memory(self, name: str) -> bool:
        """Whether ``name`` is in the page cache (mapping it is then cheap enough for the
        compute thread): one non-blocking 1-byte read (RWF_NOWAIT) per PROBE_STRIDE bytes,
        which fails rather than wait for the disk. False when unsure (no RWF_NOWAIT, an
        error)."""
        nowait = getattr(os, "RWF_NOWAIT", None)
        if nowait is None:
            return False
        try:
            fd = self._open(name)
        except ChunkStoreError:
            return False
        probe = bytearray(1)
        try:
            size = os.fstat(fd).st_size
            return all(
                os.preadv(fd, [probe], offset, nowait) == 1
                for offset in range(0, size, PROBE_STRIDE)
            )
        except OSError:  # BlockingIOError: not cached; others: let the real read report
            return False
        finally:
            os.close(fd)

    def evict(self, name: str) -> None:
        """Drop ``name``'s pages from the page cache (advisory): when the page cache cannot
        hold the streamed chunks until their next use, freeing them right away spares the
        reads of the next blocks from reclaiming memory first."""
        try:
            fd = self._open(name)
        except ChunkStoreError:
            return
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def exists(self, name: str) -> bool:
        try:
            return stat.S_ISREG(os.stat(self._path(name), follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False

    def list(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())

    def close(self) -> None:
        pass  # nothing held between reads

    def _read_whole(self, fd: int, size: int, name: str) -> bytes:
        out = bytearray(size)
        got = read_fully(fd, memoryview(out))
        if got < size:
            raise ChunkStoreError(f"{self._path(name)} ended after {got} of {size} bytes")
        return bytes(out)


def _version(st: os.stat_result) -> str:
    """What identifies one content of a file. ctime is in it because userland can set mtime
    back (``touch -d``) after rewriting a file in place, but not ctime, which any write or
    metadata change moves forward."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _same(before: os.stat_result, after: os.stat_result) -> bool:
    return _version(before) == _version(after)


@contextlib.contextmanager
def _chunk_file_errors(path: str | Path, action: str) -> Iterator[None]:
    """OSErrors on a chunk file as ChunkStoreErrors that say which file and what to do."""
    try:
        yield
    except FileNotFoundError as exc:
        # a local store that lost a file no longer matches its manifest: damaged, not away
        raise ChunkIntegrityError(
            f"chunk file {path} is missing; re-run the chunker or check the store"
        ) from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ChunkIntegrityError(
                f"chunk file {path} is a symbolic link; refusing to follow it: keep the chunk "
                "files inside the store (copy them, or re-run the chunker)"
            ) from exc
        raise ChunkStoreError(f"cannot {action} chunk file {path}: {exc.strerror or exc}") from exc
