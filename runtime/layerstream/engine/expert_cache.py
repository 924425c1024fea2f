"""The experts routed to most, kept in memory between installs of their block.

A streamed mixture-of-experts block reads its routed experts into a pool buffer on every
install. Routers favour some experts over others (per model, per layer, and drifting with
the text), so the budget left once the non-expert parts are pinned holds the most used
experts: each routing adds one to its expert's score, and every score decays by half every
HALF_LIFE installs, so the cache follows what the requests in flight route to. An expert
read from the store is kept when a slot is free or its score beats the lowest kept one by
ADMIT (which it then replaces); an install that routes to a kept expert copies it into its
buffer instead of reading it.

Without the margin, an expert routed once just now beats one routed once a pass ago (by
the decay of a pass), and every read replaces the stalest entry: least recently used, which
never hits on a pass over the blocks in order once the cache is smaller than what a pass
reads (measured: 983 admissions, 0 hits in 6 tokens). With it, only routing more often
displaces an entry.

Scores are kept normalised to install 0 (``score / DECAY**tick``): a decay applies to every
score alike, so it never reorders them, and an update touches one entry. The normalised
values grow as ``DECAY**-tick``; they are brought back to the current tick before they
could overflow.

Kept bytes are the bytes read and checked for a version of the chunk; an install of
another version misses them (and replaces them as it reads). A quantized store keeps its
experts dequantized (expert_reader.py): a hit then costs a copy, not a dequantization.
"""

from __future__ import annotations

import mmap
import threading
from dataclasses import dataclass

import torch

HALF_LIFE = 1024  # installs: with 16 streamed blocks, about 64 tokens
DECAY = 0.5 ** (1 / HALF_LIFE)
_RESCALE = 1e150  # normalised scores are brought back to the current tick past this
ADMIT = 1.5  # a read expert replaces the lowest kept one when it scores this much higher

Key = tuple[str, int, int]  # (chunk name, expert group, expert)


@dataclass
class CacheStats:
    hits: int = 0  # experts copied from the cache instead of read
    admitted: int = 0
    evicted: int = 0


class ExpertCache:
    """``capacity`` bytes of slots of ``slot_bytes`` (the largest expert's size)."""

    def __init__(self, capacity: int, slot_bytes: int):
        self.slot_bytes = slot_bytes
        self.slots = capacity // slot_bytes if slot_bytes > 0 else 0
        # one mapping for every slot: pages are taken as slots fill, never given back to a
        # fragmenting heap (RSS stays at what the cache holds)
        size = max(self.slots * slot_bytes, 1)
        self._memory = torch.frombuffer(mmap.mmap(-1, size), dtype=torch.uint8)
        self._lock = threading.Lock()
        self._free = list(range(self.slots - 1, -1, -1))
        self._slot: dict[Key, int] = {}
        self._version: dict[Key, str | None] = {}
        self._score: dict[Key, float] = {}  # normalised to ``_epoch`` (module docstring)
        self._tick = 0
        self._unit = 1.0  # DECAY ** -(tick - epoch): what one routing adds, normalised
        self._lowest: Key | None = None  # the kept key with the lowest score, when known
        self.stats = CacheStats()

    @property
    def nbytes(self) -> int:
        return self.slots * self.slot_bytes

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

    def copy_into(self, key: Key, version: str | None, views: list[torch.Tensor]) -> bool:
        """Copy ``key``'s kept bytes into ``views`` (flat bytes, in the order they were
        offered); False when not kept (for this version)."""
        if not self.slots:
            return False
        with self._lock:  # a slot is not reused while it is copied out
            slot = self._slot.get(key)
            if slot is None or self._version[key] != version:
                return False
            at = slot * self.slot_bytes
            for view in views:
                view.copy_(self._memory[at : at + view.numel()])
                at += view.numel()
            self.stats.hits += 1
            return True

    def offer(self, key: Key, version: str | None, views: list[torch.Tensor]) -> None:
        """``key``'s bytes, checked, are ``views`` (flat bytes): keep them if a slot is free
        or its score beats the lowest kept one."""
        if not self.slots or sum(v.numel() for v in views) > self.slot_bytes:
            return
        with self._lock:
            slot = self._slot.get(key)
            if slot is None:
                slot = self._take_slot(key)
                if slot is None:
                    return
            self._version[key] = version
            at = slot * self.slot_bytes
            for view in views:
                self._memory[at : at + view.numel()] = view
                at += view.numel()

    def _take_slot(self, key: Key) -> int | None:
        """(Under the lock) a slot for ``key``: a free one, or the lowest-scored kept key's
        when ``key`` scores higher."""
        if self._free:
            slot = self._free.pop()
        else:
            lowest = self._lowest
            if lowest is None:
                lowest = self._lowest = min(self._slot, key=lambda k: self._score.get(k, 0.0))
            if self._score.get(key, 0.0) <= ADMIT * self._score.get(lowest, 0.0):
                return None
            slot = self._slot.pop(lowest)
            del self._version[lowest]
            self._lowest = None
            self.stats.evicted += 1
        self._slot[key] = slot
        self.stats.admitted += 1
        return slot

    def kept(self) -> list[Key]:
        with self._lock:
            return sorted(self._slot)
