"""Memory mappings of local chunk files whose pages are faulted in, and dropped, on purpose.

A chunk is mapped with its pages populated by the I/O thread that maps it, so compute never
page-faults on weights; after a block has run its pages are dropped from the process (the
page cache may keep them) and populated again before the next use. Every madvise goes
through libc with the GIL released (``_advise``): why, and what the huge pages buy, is in
docs/design-notes-storage.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import logging
import mmap
import os
from collections.abc import Callable

import numpy as np

from ..errors import ChunkStoreError

log = logging.getLogger(__name__)

MADV_POPULATE_READ = 22  # Linux 5.14+; not exported by Python 3.11's mmap module
MADV_DONTNEED = mmap.MADV_DONTNEED
_populate_read = True  # cleared once the kernel has refused it


@dataclasses.dataclass(eq=False)
class LocalMapping:
    """A chunk file mapped read-only (``FileMapping``)."""

    data: mmap.mmap = dataclasses.field(repr=False)
    size: int
    version: str | None
    store: str  # for messages

    def populate(self) -> None:
        """Fault the pages in again after :meth:`drop_pages` (GIL released)."""
        try:
            if _populate_read:
                _advise(self.data, MADV_POPULATE_READ)
            else:
                _touch(self.data)
        except OSError as exc:
            raise ChunkStoreError(f"cannot read mapped chunk pages of {self.store}: {exc}") from exc

    def drop_pages(self) -> None:
        """Unmap the pages but keep the mapping (MADV_DONTNEED): the process's RSS no longer
        holds them, the page cache still may, and the next touch or populate maps them
        again. It takes the mmap lock for reading only, unlike munmap, so it does not queue
        behind the I/O threads' cold populates."""
        _advise(self.data, MADV_DONTNEED)

    def close(self) -> None:
        try:
            self.data.close()
        except BufferError:
            # A tensor still views it; the mapping goes when the last view does.
            log.debug("chunk mapping still referenced; left to the garbage collector")


def map_populated(fd: int, size: int) -> mmap.mmap:
    """Map ``size`` bytes of ``fd`` and fault every page in, in 2 MiB pages where possible.

    MADV_HUGEPAGE before MADV_POPULATE_READ makes a cold read fill the page cache with
    2 MiB folios (large sequential reads) and maps warm ones with one page-table entry per
    2 MiB, which makes mapping and unmapping a chunk far cheaper than per-page updates
    (docs/design-notes-storage.md). Kernels without MADV_POPULATE_READ get MAP_POPULATE
    (same pages, 4 KiB entries).
    """
    global _populate_read
    if _populate_read:
        data = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        try:
            with contextlib.suppress(OSError):  # THP disabled: 4 KiB pages, still correct
                data.madvise(mmap.MADV_HUGEPAGE)
            _advise(data, MADV_POPULATE_READ)
            return data
        except OSError as exc:
            data.close()
            if exc.errno != errno.EINVAL:
                raise
            _populate_read = False
            log.info("no MADV_POPULATE_READ in this kernel: chunks are mapped with 4 KiB pages")
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _libc_madvise()


def _advise(data: mmap.mmap, advice: int) -> None:
    """madvise a whole mapping without holding the GIL.

    ``mmap.madvise`` keeps the GIL for the whole call, and a cold populate waits on the
    disk: the compute thread, which needs the GIL between torch ops, would stand still
    meanwhile (docs/design-notes-storage.md). libc's madvise through ctypes runs with the
    GIL released.
    """
    size = len(data)
    if not size:
        return
    if _madvise is None:
        data.madvise(advice)
        return
    view = np.frombuffer(data, dtype=np.uint8)  # read-only view, only for the address
    address = view.ctypes.data
    del view  # no export may outlive this call, or the mapping could not be closed
    if _madvise(address, size, advice) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _touch(data: mmap.mmap) -> None:
    """Fault every page in by reading a byte of each (kernels without MADV_POPULATE_READ)."""
    if len(data):
        int(np.frombuffer(data, dtype=np.uint8)[:: mmap.PAGESIZE].sum())
