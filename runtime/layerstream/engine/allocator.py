"""The C allocator's share of the memory promise (glibc; elsewhere nothing is changed).

Every request computes on its own thread, and glibc gives each thread an arena of its own.
Two of its defaults then keep freed activations as RSS, once per arena:

- the mmap threshold rises to the size of the largest block freed (up to 32 MiB), after
  which activation-sized blocks come from the arenas and stay there when freed;
  ``fix_mmap_threshold`` pins it, so they are mapped and go back to the system when freed;
- an arena gives back only what lies free at its top; ``release_free_memory_soon``
  (``malloc_trim``, on a thread of its own: it takes tens of milliseconds on a fragmented
  heap) returns every free page once the engine goes idle, so the memory of a burst of
  requests does not stay with the process after it.

A value the user set through glibc's environment (``MALLOC_MMAP_THRESHOLD_``) is kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, kept from rising

_lock = threading.Lock()
_libc: ctypes.CDLL | None = None
_fixed = False
_trimming = False


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name)
            libc.gnu_get_libc_version  # noqa: B018 (musl and others have no such symbol)
            libc.mallopt, libc.malloc_trim  # noqa: B018
        except (OSError, AttributeError, TypeError):
            return None
        _libc = libc
    return _libc


def fix_mmap_threshold() -> bool:
    """Keep glibc's mmap threshold at its initial 128 KiB (once per process); False where
    the allocator is not glibc or the user chose a threshold."""
    global _fixed
    with _lock:
        if _fixed:
            return True
        libc = _glibc()
        if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
            return False
        if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
            log.warning("glibc refused mallopt(M_MMAP_THRESHOLD); freed memory may stay in RSS")
            return False
        _fixed = True
        return True


def release_free_memory() -> None:
    """Give the free pages of every arena back to the system (glibc's ``malloc_trim``)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def release_free_memory_soon() -> None:
    """``release_free_memory`` on a thread of its own, unless one is already running."""
    global _trimming
    with _lock:
        if _trimming or _glibc() is None:
            return
        _trimming = True

    def trim() -> None:
        global _trimming
        try:
            release_free_memory()
        finally:
            with _lock:
                _trimming = False

    threading.Thread(target=trim, name="layerstream-trim", daemon=True).start()
