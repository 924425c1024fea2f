"""What the S3 and HTTP stores share: their options, the retry policy, ranged parallel reads.

A remote read either returns every byte it was asked for or raises ChunkStoreError: a
truncated body, a reset connection, a 5xx or a throttle is retried (exponential backoff with
full jitter) until the read's deadline, then reported with the last cause.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TypeVar

from ..errors import ChunkStoreError

log = logging.getLogger(__name__)
T = TypeVar("T")

MiB = 1 << 20
MIN_PART = 1 * MiB  # below this, per-request overhead outweighs the parallelism
# Byte ranges (routed experts) are split finer: a read of a few experts waits for its
# slowest part, and a store that limits each connection's rate delivers each part at that
# rate (docs/benchmarks.md, "Over a rate-limited HTTP store")
MIN_RANGE_PART = MiB // 4


@dataclass(frozen=True)
class StoreOptions:
    """Connection settings for remote chunk stores (see settings.py for each one's meaning)."""

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    deadline_s: float = 120.0  # one whole read, retries included
    max_concurrency: int = 8  # ranged GETs in flight per store
    part_bytes: int = 8 * MiB
    # S3
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    addressing_style: str = "auto"  # "auto", "path" or "virtual"
    # HTTP(S)
    headers: dict[str, str] = field(default_factory=dict)
    bearer_token: str | None = field(default=None, repr=False)  # never logged
    verify_tls: bool = True
    ca_bundle: str | None = None
    # local disk cache in front of a remote store
    cache_dir: str | None = None
    cache_bytes: int = 0


class Transient(Exception):
    """A failure worth retrying: the same request may well succeed in a moment."""


class Permanent(ChunkStoreError):
    """A failure retrying cannot fix (missing object, bad credentials): raised at once."""


@dataclass
class RetryPolicy:
    deadline_s: float
    base_delay_s: float = 0.1
    max_delay_s: float = 5.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    def run(self, op: Callable[[], T], what: str, *, until: float | None = None) -> T:
        """``op()`` until it succeeds, raises a non-Transient error, or ``until`` (a clock
        time; default now + deadline) would pass before the next attempt."""
        start = self.clock()
        until = start + self.deadline_s if until is None else until
        attempt = 0
        while True:
            attempt += 1
            try:
                return op()
            except Transient as exc:
                delay = random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2**attempt))
                now = self.clock()
                if now + delay >= until:
                    raise ChunkStoreError(
                        f"{what}: gave up after {attempt} attempt(s) in {now - start:.1f}s "
                        f"(deadline_s={self.deadline_s:g}): {exc}"
                    ) from exc
                log.warning("%s: %s; retry %d in %.2fs", what, exc, attempt, delay)
                self.sleep(delay)


def parse_content_range(value: str | None, what: str) -> tuple[int, int, int]:
    """``bytes START-END/TOTAL`` -> (start, end inclusive, total)."""
    try:
        unit, rest = (value or "").split(" ", 1)
        span, total = rest.split("/", 1)
        start, end = span.split("-", 1)
        if unit != "bytes":
            raise ValueError(unit)
        return int(start), int(end), int(total)
    except ValueError as exc:
        raise Transient(f"unusable Content-Range {value!r}") from exc


Fetch = Callable[[int, memoryview], None]


class RangedReader:
    """Reads a file as parts fetched in parallel into one preallocated buffer.

    The first part also tells the file's size and version; the remaining parts are then
    fetched concurrently (``max_concurrency`` in flight across all reads of this store),
    each retried on its own, all under the deadline of the whole read.
    """

    def __init__(self, options: StoreOptions):
        self.options = options
        self.policy = RetryPolicy(options.deadline_s)
        self._pool = ThreadPoolExecutor(
            max_workers=options.max_concurrency, thread_name_prefix="layerstream-fetch"
        )

    def read(
        self,
        what: str,
        buffer: memoryview,
        first: Callable[[memoryview, int], tuple[int, int, str | None]],
        part: Callable[[int, memoryview, str | None], int],
        expected: int | None = None,
    ) -> tuple[int, str | None]:
        """``first(buffer, length)`` asks for the first ``length`` bytes (a server without
        range support may send the whole file: ``buffer`` has room for it) and returns
        (bytes filled, file size, version); ``part(offset, view, version)`` fills one later
        part exactly and returns the file size the server reported.

        With ``expected`` (the size the manifest gives), every part is fetched at once, the
        first one included, in parts small enough to keep ``max_concurrency`` connections
        busy on one chunk: a store that limits each connection's rate is then read at
        that many times the rate.
        """
        until = time.monotonic() + self.options.deadline_s
        if expected is not None:
            if expected > len(buffer):
                raise ChunkStoreError(f"{what}: a {expected}-byte chunk does not fit its buffer")
            step = min(
                self.options.part_bytes,
                max(MIN_PART, -(-expected // self.options.max_concurrency)),
            )
            pieces = split([(0, expected)], step)
            _check_totals(what, self._parts(what, buffer, part, pieces, None, until), expected)
            return expected, None
        length = min(len(buffer), self.options.part_bytes)
        filled, size, version = self.policy.run(lambda: first(buffer, length), what, until=until)
        if size > len(buffer):
            raise ChunkStoreError(
                f"{what} has {size} bytes, more than the manifest allows ({len(buffer)}); "
                "the store was modified after chunking: re-run the chunker"
            )
        step = self.options.part_bytes
        pieces = split([(filled, size - filled)], step)
        self._parts(what, buffer, part, pieces, version, until)
        return size, version

    def _parts(
        self,
        what: str,
        buffer: memoryview,
        part: Callable[[int, memoryview, str | None], int],
        pieces: list[tuple[int, int]],
        version: str | None,
        until: float,
    ) -> list[int]:
        """Fetch every (offset, length) piece into ``buffer`` at its offset, in parallel."""
        futures = [
            self._pool.submit(
                self.policy.run,
                lambda o=o, n=n: part(o, buffer[o : o + n], version),
                f"{what} [bytes {o}-{o + n - 1}]",
                until=until,
            )
            for o, n in pieces
        ]
        try:
            return [future.result() for future in futures]
        except BaseException:
            # Parts still running write into the buffer, which the caller reuses for another
            # chunk once this read has failed: they must be finished before we return.
            for future in futures:
                future.cancel()
            wait(futures)
            raise

    def read_ranges(
        self,
        what: str,
        buffer: memoryview,
        part: Callable[[int, memoryview, str | None], int],
        ranges: list[tuple[int, int]],
        size: int,
    ) -> int:
        """Fetch ``ranges`` (file offsets, coalesced by the caller) of a file the manifest
        says has ``size`` bytes into ``buffer`` at their offsets, in parts of the total /
        ``max_concurrency`` (at least MIN_RANGE_PART, at most ``part_bytes``), all at once;
        returns the bytes fetched."""
        until = time.monotonic() + self.options.deadline_s
        total = sum(n for _, n in ranges)
        step = min(
            self.options.part_bytes,
            max(MIN_RANGE_PART, -(-total // self.options.max_concurrency)),
        )
        pieces = split(ranges, step)
        if pieces and max(o + n for o, n in pieces) > min(size, len(buffer)):
            raise ChunkStoreError(f"{what}: a range ends past the chunk's {size} bytes")
        _check_totals(what, self._parts(what, buffer, part, pieces, None, until), size)
        return sum(n for _, n in pieces)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def split(ranges: list[tuple[int, int]], step: int) -> list[tuple[int, int]]:
    """Each (offset, length) range as pieces of at most ``step`` bytes."""
    return [
        (o, min(step, offset + length - o))
        for offset, length in ranges
        for o in range(offset, offset + length, step)
    ]


def _check_totals(what: str, totals: list[int], size: int) -> None:
    """Every part's server must report the size the manifest gives the file."""
    wrong = {t for t in totals if t != size}
    if wrong:
        raise ChunkStoreError(
            f"{what} has {wrong.pop()} bytes, the manifest says {size}; the store was "
            "modified after chunking: re-run the chunker"
        )
