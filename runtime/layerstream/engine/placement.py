"""Where a streamed mixture-of-experts block computes (``expert_cache_in_place``): in its
home, where the experts the cache keeps lie (expert_cache.py), or in a streaming buffer the
kept ones it routes to are copied into.

In place, a hit costs nothing; but an expert read and not kept lands on pages of the home
that were given back, and the system supplies such a page at a fault (a zeroed page mapped)
that can cost several times a copy of its bytes. Copying into a buffer, each hit costs a
copy and each miss lands on the buffer's own pages, there already. So in place pays where
hits x the cost of a copied byte exceed misses x the cost of a byte's page taken and given
back: that depends on the machine (a VM's faults are dear: docs/benchmarks.md) and on the
routing. Under ``auto`` both costs are measured as the
engine runs (each copy of a hit or into the cache; each page a home takes from the system
and gives back), and so is the hit rate of recent reads; blocks compute in place while that
is cheaper by MARGIN, else in a buffer (how a block computes never changes its output).
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from ..errors import SettingsError

log = logging.getLogger(__name__)

AUTO = "auto"
MARGIN = 1.25  # the other way must be this much cheaper before blocks switch to it
# the weight the hit rate keeps of the past per read of experts (the last ~20 count: about
# a token's blocks, so a cold start's misses are forgotten in a few tokens), and the costs
# per measurement of them
KEEP = 0.95
SWITCHES = 64  # switches remembered for the stats


class _Rate:
    """Seconds per byte, decayed like the hit counts."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.nbytes = 0.0

    def add(self, nbytes: int, seconds: float) -> None:
        self.seconds = self.seconds * KEEP + seconds
        self.nbytes = self.nbytes * KEEP + nbytes

    def per_byte(self) -> float | None:
        return self.seconds / self.nbytes if self.nbytes > 0 else None


class Placement:
    """In place or copying: fixed (``expert_cache_in_place`` true or false), or chosen from
    the costs measured (``auto``, which starts copying: that way measures both)."""

    def __init__(self, mode: bool | str = AUTO):
        if mode != AUTO and not isinstance(mode, bool):
            kind = type(mode).__name__
            raise SettingsError(
                f"expert_cache_in_place must be True, False or 'auto', not {mode!r} ({kind})"
            )
        self.fixed: bool | None = None if mode == AUTO else mode
        self.in_place = bool(self.fixed)
        self._lock = threading.Lock()
        self._hit_rate: float | None = None  # of recent reads, each read weighing alike
        self._copy = _Rate()  # a byte copied between a home and a buffer
        self._take = _Rate()  # a byte's page taken from the system by a home
        self._give = _Rate()  # a byte's page given back
        self.reads = 0  # reads of experts seen
        # under auto: the read after which each switch came (the last SWITCHES of a long run)
        self.switched_at: deque[int] = deque(maxlen=SWITCHES)

    def copied(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self._copy.add(nbytes, seconds)

    def taken(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self._take.add(nbytes, seconds)

    def given_back(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self._give.add(nbytes, seconds)

    def costs(self) -> tuple[float, float] | None:
        """Per expert byte routed, what copying and what computing in place cost of late
        (seconds); None until both were measured."""
        copy, take, rate = self._copy.per_byte(), self._take.per_byte(), self._hit_rate
        if copy is None or take is None or rate is None:
            return None
        fault = take + (self._give.per_byte() or 0.0)
        return rate * copy, (1 - rate) * fault

    def read(self, hits: int, misses: int) -> None:
        """A read of experts found ``hits`` in the cache and read ``misses``: under
        ``auto``, the way that is cheaper by MARGIN is taken from the next lease on."""
        if not hits + misses:
            return
        rate = hits / (hits + misses)
        with self._lock:
            self.reads += 1
            last = self._hit_rate
            self._hit_rate = rate if last is None else last * KEEP + rate * (1 - KEEP)
            if self.fixed is not None:
                return
            costs = self.costs()
            if costs is None:
                return
            copying, in_place = costs
            switch = (
                copying > MARGIN * in_place if not self.in_place else in_place > MARGIN * copying
            )
            if switch:
                self.in_place = not self.in_place
                self.switched_at.append(self.reads)
                log.info(
                    "experts computed %s: a routed byte costs %.2f ns copied, %.2f ns in "
                    "place (hit rate %.2f)",
                    "in place" if self.in_place else "in buffers",
                    copying * 1e9,
                    in_place * 1e9,
                    self._hit_rate,
                )
