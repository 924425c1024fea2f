"""The experts routed to most, kept where they were read between installs of their block.

Once a streamed mixture-of-experts block's base is pinned, its leases read its routed experts
into the block's home (``Home``): memory laid out like a streaming buffer (the chunk's bytes
at their file offsets, then a quantized chunk's tensors dequantized), mapped for the block
alone and backed only where written. Its experts module computes on views of the home, so
an expert the home still holds is used where it lies: a hit costs nothing, where a copy
into a shared buffer costs the memory bandwidth of the expert's bytes.

Routers favour some experts over others (per model, per layer, and drifting with the text),
so the budget left once the non-expert parts are pinned keeps the most used experts: each
routing adds one to its expert's score, and every score decays by half every HALF_LIFE
installs, so the cache follows what the requests in flight route to. An expert read from
the store is kept when a slot is free or its score beats the lowest kept one by ADMIT
(which it then replaces). One that is not kept leaves its home once no install uses it,
and its pages go back to the system (but one a neighbour held still lies on). A kept expert
in use is never replaced. A slot is the pages an expert may lie on (``span_bytes``).

Without the margin, an expert routed once just now beats one routed once a pass ago (by
the decay of a pass), and every read replaces the stalest entry: least recently used, which
never hits on a pass over the blocks in order once the cache is smaller than what a pass
reads (measured: 983 admissions, 0 hits in 6 tokens). With it, only routing more often
displaces an entry.

Scores are kept normalised to install 0 (``score / DECAY**tick``): a decay applies to every
score alike, so it never reorders them, and an update touches one entry. The normalised
values grow as ``DECAY**-tick``; they are brought back to the current tick before they
could overflow.

While blocks compute in place, the streaming buffers are tickets that hold nothing (a
lease's experts lie in its home), so the memory of those whose pages are given back is lent
to the cache (``lend``, told by the buffer pool each time a buffer is taken): the kept
experts may take it, less what the installs in flight hold in their homes, which
``reserve`` makes room for (the lowest-scored kept experts leave). A buffer taken whole (a
block computing in it) takes its share of the loan back before anything is written there.

An expert is held for the version of the chunk it was read and checked from; an install of
another version misses it. A quantized store's experts are held dequantized (their stored
values and scales leave the home once dequantized): a hit is not a dequantization either.
"""

from __future__ import annotations

import errno
import mmap
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from .placement import Placement

HALF_LIFE = 1024  # installs: with 16 streamed blocks, about 64 tokens
DECAY = 0.5 ** (1 / HALF_LIFE)
_RESCALE = 1e150  # normalised scores are brought back to the current tick past this
ADMIT = 1.5  # a read expert replaces the lowest kept one when it scores this much higher
POISON = 0xFF  # NaN in float32, float16 and bfloat16 alike
PAGE = mmap.PAGESIZE
# madvise(MADV_POPULATE_WRITE): pages supplied as if written, without the value changed
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform == "linux" else None)

Key = tuple[str, int, int]  # (chunk name, expert group, expert)


class Home:
    """A streamed block's memory of its own, ``size`` bytes, backed only where written.

    Each page counts the views held on it (``hold``: before anything is written there); a
    page whose count falls to zero goes back to the system (``release``), so the home holds
    the pages of what it holds and nothing more, whether or not views share pages.
    ``poison``: such pages are filled with NaN instead (tests: an expert used after it left
    would show)."""

    def __init__(self, chunk: str, size: int, poison: bool = False, costs: Placement | None = None):
        self.chunk = chunk
        # private: pages given back (MADV_DONTNEED) read as zeros and cost nothing
        self._map = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE)
        # 4 KiB pages: a huge page would hold (and be held by) 2 MiB where a view takes a page
        self._map.madvise(mmap.MADV_NOHUGEPAGE)
        # made during a request, maybe in inference mode: normal tensors, written in any mode
        with torch.inference_mode(False):
            self.buffer = torch.frombuffer(self._map, dtype=torch.uint8)[:size]
        # numpy: counted a few views at a time, where each torch call costs several times more
        self._held = np.zeros(-(-max(size, 1) // PAGE), dtype=np.int32)
        self._address = self.buffer.data_ptr()
        self._lock = threading.Lock()
        self._poison = poison
        self._blank = POISON if poison else 0  # what a page nothing holds reads as
        self._costs = costs  # told what taking and giving back pages cost
        self.busy = False  # a lease writes into it (under its reader's lock)
        # the block's tensors as its leases computing in place bind them (made by the first)
        self.tensors: dict[str, torch.Tensor] | None = None
        if poison:
            self.buffer.fill_(POISON)

    def pages(self, view: torch.Tensor) -> tuple[int, int]:
        """The pages ``view`` (a view of ``buffer``) lies on: [first, last)."""
        start = view.data_ptr() - self._address
        end = start + view.numel() * view.element_size()
        return start // PAGE, -(-end // PAGE)

    def hold(self, views: Iterable[torch.Tensor]) -> None:
        """Views about to be written: their pages are held, and those nothing held before
        are taken from the system now (their values unchanged), so that what that costs
        is measured apart from the read."""
        with self._lock:
            fresh = self._count(views, 1)
            self._timed(fresh, self._take, self._costs.taken if self._costs else None)

    def release(self, views: Iterable[torch.Tensor]) -> None:
        """Views held before are no longer: the pages nothing else holds go back."""
        with self._lock:
            free = self._count(views, -1)
            self._timed(free, self._give_back, self._costs.given_back if self._costs else None)

    def _count(self, views: Iterable[torch.Tensor], by: int) -> list[tuple[int, int]]:
        """(Under the lock) each page ``views`` lie on counts ``by`` (1 or -1) more views:
        the runs of pages that no view held before (1), or that none holds now (-1)."""
        runs = []
        for view in views:
            first, last = self.pages(view)
            counts = self._held[first:last]
            if by > 0:
                runs.extend(_runs(first, counts == 0))
            counts += by
            if by < 0:
                runs.extend(_runs(first, counts == 0))
        return runs

    def _timed(
        self,
        runs: list[tuple[int, int]],
        act: Callable[[int, int], None],
        report: Callable[[int, float], None] | None,
    ) -> None:
        if not runs:
            return
        start = time.perf_counter()
        for first, last in runs:
            act(first, last)
        if report is not None:
            report(sum(b - a for a, b in runs) * PAGE, time.perf_counter() - start)

    def _take(self, first: int, last: int) -> None:
        global _POPULATE_WRITE
        start, end = first * PAGE, min(last * PAGE, len(self._map))
        if _POPULATE_WRITE is not None:
            try:  # the pages supplied in one call, not a fault each (Linux 5.14)
                self._map.madvise(_POPULATE_WRITE, start, end - start)
                return
            except OSError as exc:  # these pages are faulted in one by one, as below
                if exc.errno == errno.EINVAL:  # an older kernel: all pages from now on
                    _POPULATE_WRITE = None
        # one byte a page: the fault supplies the page, the value is what it held
        self.buffer[start:end:PAGE].fill_(self._blank)

    def _give_back(self, first: int, last: int) -> None:
        start, end = first * PAGE, min(last * PAGE, len(self._map))
        if self._poison:
            self.buffer[start:end].fill_(POISON)
        else:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)


def _runs(first: int, flags: np.ndarray) -> list[tuple[int, int]]:
    """The runs of true ``flags`` (bool) as page ranges [a, b), ``flags[0]`` being page
    ``first``."""
    if not flags.any():
        return []
    if flags.all():  # the common case: a view's pages all taken, or all given back
        return [(first, first + len(flags))]
    changes = (np.flatnonzero(flags[1:] != flags[:-1]) + 1).tolist()
    bounds = [first + at for at in ([0] if flags[0] else []) + changes]
    if flags[-1]:
        bounds.append(first + len(flags))
    return list(zip(bounds[::2], bounds[1::2], strict=True))


def span_bytes(nbytes: int) -> int:
    """The most memory a view of ``nbytes`` in a home takes: the pages it may lie on."""
    return (-(-nbytes // PAGE) + 1) * PAGE


@dataclass
class CacheStats:
    hits: int = 0  # experts used where their home held them instead of read
    admitted: int = 0
    evicted: int = 0


@dataclass
class _Held:
    version: str | None
    home: Home
    views: list[torch.Tensor]  # where it lies in its home
    users: int = 0  # installs computing with it
    stale: bool = False  # forgotten while in use: found by nobody, leaves once done


class ExpertCache:
    """``capacity`` bytes of slots of ``slot_bytes`` (the largest expert's size): which
    experts stay in their homes."""

    def __init__(self, capacity: int, slot_bytes: int):
        self.slot_bytes = slot_bytes
        self.slots = capacity // slot_bytes if slot_bytes > 0 else 0
        self._lock = threading.Lock()
        self._held: dict[Key, _Held] = {}  # in their homes: kept, or in use
        self._kept: set[Key] = set()
        self._score: dict[Key, float] = {}  # normalised to ``_epoch`` (module docstring)
        self._tick = 0
        self._unit = 1.0  # DECAY ** -(tick - epoch): what one routing adds, normalised
        self._lowest: Key | None = None  # the kept key with the lowest score, when known
        # whether the streaming buffers' memory is lent (``lend``: their tickets' room then
        # counts here, and what installs hold in flight in homes takes from it; else the
        # tickets bound that apart), the slots lent now, and slots reserved for reads
        self.lending = False
        self.spare = 0
        self._reserved = 0
        self.stats = CacheStats()

    @property
    def nbytes(self) -> int:
        return self.slots * self.slot_bytes

    def _capacity(self, admitting: Key) -> int:
        """(Under the lock) the slots kept experts may take now: the cache's own and those
        lent, less what installs hold in flight in their homes (read, in use, not kept;
        reserved for reads), but for ``admitting`` (in flight until kept)."""
        if not self.lending:
            return self.slots
        flight = len(self._held) - len(self._kept) - (admitting in self._held)
        return self.slots + self.spare - flight - self._reserved

    def lend(self, slots: int) -> None:
        """The streaming buffers' memory not in use lends ``slots`` from now on; where the
        homes hold more than the cache's own slots and these, the lowest-scored kept
        experts no install uses leave now."""
        with self._lock:
            self.lending = True
            self.spare = max(slots, 0)
            self._fit()

    def reserve(self, count: int) -> None:
        """An install computing in place is about to hold ``count`` experts it reads (each
        ``add``-ed once read, or ``unreserve``-d): kept experts leave until they fit beside
        them."""
        with self._lock:
            self._reserved += count
            self._fit()

    def _fit(self) -> None:
        """(Under the lock) what the homes hold and will hold within the slots and the loan."""
        if self.lending:
            self._evict(len(self._held) + self._reserved - self.slots - self.spare)

    def unreserve(self, count: int) -> None:
        """Reserved reads that failed: nothing will be held for them."""
        with self._lock:
            self._reserved = max(self._reserved - count, 0)

    def _evict(self, count: int) -> None:
        """(Under the lock) ``count`` kept experts that no install uses leave, lowest scores
        first."""
        if count <= 0:
            return
        idle = [k for k in self._kept if not self._held[k].users]
        for key in sorted(idle, key=lambda k: self._score.get(k, 0.0))[:count]:
            self._kept.remove(key)
            self._leave(key)
            self.stats.evicted += 1
        self._lowest = None

    def routed(self, chunk: str, group: int, experts: list[int]) -> None:
        """An install of ``chunk`` routes to ``experts`` of ``group``: their scores grow."""
        if not self.slots:
            return
        with self._lock:
            for e in experts:
                key = (chunk, group, e)
                self._score[key] = self._score.get(key, 0.0) + self._unit
                if key == self._lowest:
                    self._lowest = None  # it may not be the lowest any more

    def tick(self) -> None:
        """One install happened: every score decays."""
        if not self.slots:
            return
        with self._lock:
            self._tick += 1
            self._unit /= DECAY
            if self._unit > _RESCALE:
                for key in self._score:
                    self._score[key] /= self._unit
                self._unit = 1.0

    def holds(self, key: Key, version: str | None) -> bool:
        """Whether ``use`` would find ``key`` for ``version`` now."""
        with self._lock:
            held = self._held.get(key)
            return held is not None and not held.stale and held.version == version

    def use(self, key: Key, version: str | None) -> list[torch.Tensor] | None:
        """Where ``key``'s home holds it for ``version`` (None if it does not); if it does,
        it stays there until ``done``."""
        with self._lock:
            held = self._held.get(key)
            if held is None or held.stale or held.version != version:
                return None
            held.users += 1
            self.stats.hits += 1
            return held.views

    def add(self, key: Key, version: str | None, home: Home, views: list[torch.Tensor]) -> None:
        """An install read ``key`` into ``home`` at ``views`` (held there before the read,
        checked, for ``version``) and uses it until ``done``: kept after that if a slot is
        free or its score beats the lowest kept one's. It takes the place of one read
        ``reserve``-d, if any (so the room is counted once, as held)."""
        with self._lock:
            self._reserved = max(self._reserved - 1, 0)
            old = self._held.get(key)
            users = 0
            # another version, or forgotten: use missed it, and who still copies it out
            # (forgotten) fails at confirm
            if old is not None:
                users = old.users
                old.home.release(old.views)
            self._held[key] = _Held(version, home, views, users + 1)
            if key not in self._kept and self._admit(key):
                self._kept.add(key)
                self.stats.admitted += 1

    def offer(
        self,
        key: Key,
        version: str | None,
        home: Home,
        views: list[torch.Tensor],
        write: Callable[[], None],
    ) -> bool:
        """An install read ``key`` (checked, for ``version``) into a buffer: if a slot is
        free or its score beats the lowest kept one's, ``write`` copies it to ``views`` of
        ``home`` (held first), where it is kept. Whether it was."""
        with self._lock:
            old = self._held.get(key)
            if old is not None:
                if old.users or old.version == version:
                    return False  # in use, or kept meanwhile by another install
                self._kept.discard(key)  # another version, which nobody can use
                self._leave(key)
                self._lowest = None
            if not self._admit(key):
                return False
            home.hold(views)
            write()
            self._held[key] = _Held(version, home, views)
            self._kept.add(key)
            self.stats.admitted += 1
            return True

    def done(self, keys: Iterable[Key]) -> None:
        """An install that used ``keys`` (``use`` or ``add``) has run: those not kept leave
        their homes once nobody uses them."""
        with self._lock:
            for key in keys:
                held = self._held[key]
                held.users -= 1
                if not held.users and key not in self._kept:
                    self._leave(key)

    def forget(self, chunk: str) -> None:
        """No expert of ``chunk`` is found any more (a read into its home failed: bytes
        beside the failed part may not be its): those no install uses leave their home
        now, the others once done."""
        with self._lock:
            for key in [k for k in self._held if k[0] == chunk]:
                self._kept.discard(key)
                if self._held[key].users:
                    self._held[key].stale = True
                else:
                    self._leave(key)
            self._lowest = None

    def _admit(self, key: Key) -> bool:
        """(Under the lock) whether ``key`` takes a slot: a free one, or the lowest-scored
        kept key's, when ``key`` scores higher and the other is not in use."""
        if not self.slots:
            return False
        if len(self._kept) < self._capacity(key):
            return True
        if not self._kept:  # installs in flight hold the whole room meanwhile
            return False
        lowest = self._lowest
        if lowest is None:
            lowest = self._lowest = min(self._kept, key=lambda k: self._score.get(k, 0.0))
        if self._score.get(key, 0.0) <= ADMIT * self._score.get(lowest, 0.0):
            return False
        if self._held[lowest].users:
            return False  # an install computes with it: it stays this time
        self._kept.remove(lowest)
        self._leave(lowest)
        self._lowest = None
        self.stats.evicted += 1
        return True

    def _leave(self, key: Key) -> None:
        """(Under the lock, so that no install reads it back in meanwhile) ``key`` leaves
        its home."""
        held = self._held.pop(key)
        held.home.release(held.views)

    def kept(self) -> list[Key]:
        with self._lock:
            return sorted(self._kept)
