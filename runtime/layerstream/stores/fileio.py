"""Reading files completely: the one loop every local read goes through."""

from __future__ import annotations

import os


def read_fully(fd: int, view: memoryview, offset: int = 0) -> int:
    """Fill ``view`` from ``fd`` starting at file offset ``offset``; return the bytes read,
    fewer than ``len(view)`` only when the file ends first. preadv may return short counts
    (a signal, a network file system), so one call is never assumed to fill the view."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got
