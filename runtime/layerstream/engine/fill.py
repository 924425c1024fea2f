"""The plan's pinned blocks, read after the model is ready.

A model is ready once its non-block weights are installed: a token needs one pass over the
blocks, which the sweeps can run without waiting for the whole budget. The blocks the plan
pins are read here in the background, in block order, a few at a time, each into memory of
its own and checked as a pinned block is at load (the copy hashed, docs/integrity.md): no
byte is used before its check. A request that reaches such a block before it has arrived
waits for it in the sweeps, as for a streamed block's read (hooks.PendingBlockHook); the
block is installed from its pinned copy at a block boundary, where nobody computes, and runs
as a pinned block from then on. Every read goes into the block's own room in the budget, so
weights in memory stay within the plan's bound at every moment of the fill.

With expert streaming the plan also pins the bases (every byte outside the experts) of
streamed blocks: the fill reads those too, after or between the whole blocks in block
order; until a block's base is in, its streamed reads read the base with the experts, as a
plan that cannot pin it does (expert_reader.py).

A block whose read failed is read again when a request needs it, on that request's time: a
request gets the error only if that read fails too (as for a streamed block). A damaged
chunk of a local store takes the model out of readiness (checks.py), as at load it failed
the load.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor

import torch

from ..format.manifest import ChunkInfo, Manifest
from ..units import format_size
from .readers import Lease

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 5.0  # the fill logs its progress at most this often
# a base whose background read failed is read again no sooner than this after the failure,
# doubling with each failure up to a minute: a store back after an outage is used again, a
# damaged chunk is not read on every block boundary
RETRY_AFTER_S = 1.0


class PinnedLease(Lease):
    """A pinned block's tensors, lent to the sweeps for its first install: they stay bound
    (kept) and belong to the fill, so giving the lease back frees nothing."""

    kept = True

    def __init__(self, index: int, info: ChunkInfo, tensors: dict[str, torch.Tensor]):
        super().__init__(index, info, None)
        self._pinned = tensors
        self.tensors = tensors

    def _views(self) -> dict[str, torch.Tensor]:
        return self._pinned

    def _give_back(self) -> None:
        return None


class PinFill:
    """Reads ``blocks`` (block index -> the bytes it holds pinned: those the plan pins) with
    ``read`` (a chunk, by name, into memory of its own, checked) and pins ``bases`` (block
    index -> bytes) with ``pin_base``, on ``threads`` threads, in block order."""

    def __init__(
        self,
        manifest: Manifest,
        blocks: dict[int, int],
        read: Callable[[str], dict[str, torch.Tensor]],
        threads: int,
        bases: dict[int, int] | None = None,
        pin_base: Callable[[int], object] | None = None,
    ):
        self.manifest = manifest
        self._read = read
        self._pin_base = pin_base
        self._sizes = dict(blocks) | dict(bases or {})
        self.target_bytes = sum(self._sizes.values())
        self._counted: set[int] = set()
        self.closed = False
        self._base_failures: dict[int, tuple[int, float]] = {}  # by block: count, last at
        self.pinned_bytes = 0
        self.done_s: float | None = None  # how long the fill took, once complete
        self._lock = threading.Lock()
        self._started = time.perf_counter()
        self._logged = self._started
        self._tensors: dict[int, dict[str, torch.Tensor]] = {}
        # called after each block arrives (the engine installs it then if nobody computes)
        self.on_arrival: Callable[[], None] | None = None
        self._pool = ThreadPoolExecutor(max(threads, 1), thread_name_prefix="layerstream-fill")
        self._futures: dict[int, Future[dict[str, torch.Tensor]]] = {}
        self._base_futures: dict[int, Future[None]] = {}
        for j in sorted(self._sizes):
            if j in (bases or {}):
                self._base_futures[j] = self._pool.submit(self._background_base, j)
            else:
                self._futures[j] = self._pool.submit(self._background, j)
        log.info(
            "%s: ready before its %d pinned blocks and %d pinned bases (%s) are read; they "
            "are read in the background, and streamed until then",
            manifest.name,
            len(self._futures),
            len(self._base_futures),
            format_size(self.target_bytes),
        )

    def _info(self, j: int) -> ChunkInfo:
        return self.manifest.chunks[self.manifest.blocks[j].chunk]

    @property
    def complete(self) -> bool:
        return self.pinned_bytes == self.target_bytes

    def _background(self, j: int) -> dict[str, torch.Tensor]:
        try:
            return self._arrived(j, self._read(self._info(j).name))
        except Exception as exc:
            log.warning(
                "reading pinned block %d in the background failed (%s); it is read again "
                "when a request needs it",
                j,
                exc,
            )
            raise

    def _background_base(self, j: int) -> None:
        try:
            self._base(j)
        except Exception as exc:
            with self._lock:
                count, _ = self._base_failures.get(j, (0, 0.0))
                self._base_failures[j] = (count + 1, time.monotonic())
            log.warning(
                "reading block %d's base in the background failed (%s); its streamed reads "
                "read it until a later try succeeds",
                j,
                exc,
            )
            raise

    def retry_bases(self) -> None:
        """Read again, in the background, each base whose read failed, once its wait since
        the failure is over (``RETRY_AFTER_S``; a block boundary calls it); until then its
        block's streamed reads read it with the experts."""
        now = time.monotonic()
        for j, future in list(self._base_futures.items()):
            if self.closed or not future.done() or future.cancelled():
                continue
            if future.exception() is None:
                continue
            with self._lock:
                count, at = self._base_failures.get(j, (1, 0.0))
            if now < at + min(RETRY_AFTER_S * 2 ** (count - 1), 60.0):
                continue
            self._base_futures[j] = self._pool.submit(self._background_base, j)

    def forget(self, j: int) -> None:
        """Drop block j's copy (it could not be installed): the next lease reads it again."""
        with self._lock:
            self._tensors.pop(j, None)
            if j in self._counted:
                self._counted.discard(j)
                self.pinned_bytes -= self._sizes[j]

    def _base(self, j: int) -> None:
        assert self._pin_base is not None
        self._pin_base(j)
        self._count(j)

    def _arrived(self, j: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self._lock:
            if j in self._tensors:  # read twice (after a failure): the first copy stays
                return self._tensors[j]
            if self.closed:  # a read that ends after close: nothing keeps it
                return tensors
            self._tensors[j] = tensors
        self._count(j)
        return tensors

    def _count(self, j: int) -> None:
        """Block j (or its base) is in: count it, log the progress, tell ``on_arrival``."""
        with self._lock:
            if j in self._counted or self.closed:
                return
            self._counted.add(j)
            self.pinned_bytes += self._sizes[j]
            done, now = self.pinned_bytes, time.perf_counter()
            if done == self.target_bytes:
                self.done_s = now - self._started
            report = done == self.target_bytes or now - self._logged >= PROGRESS_EVERY_S
            if report:
                self._logged = now
        if report:
            self._log_progress(done, now - self._started)
        if self.on_arrival is not None:
            self.on_arrival()

    def _log_progress(self, done: int, elapsed: float) -> None:
        rate = done / max(elapsed, 1e-9)
        if done == self.target_bytes:
            log.info(
                "%s: every pinned block is in memory (%s in %.1fs, %.0f MB/s)",
                self.manifest.name,
                format_size(done),
                elapsed,
                rate / 1e6,
            )
            return
        log.info(
            "%s: pinned %s of %s (%.0f%%) in %.1fs, %.0f MB/s, about %.0fs left",
            self.manifest.name,
            format_size(done),
            format_size(self.target_bytes),
            100 * done / self.target_bytes,
            elapsed,
            rate / 1e6,
            (self.target_bytes - done) / max(rate, 1.0),
        )

    def arrived(self, j: int) -> PinnedLease | None:
        """Block j's lease if its pinned copy is in memory, else None (never waits)."""
        with self._lock:
            tensors = self._tensors.get(j)
        return None if tensors is None else PinnedLease(j, self._info(j), tensors)

    def wait(self) -> None:
        """Return once every block is read (each that failed read again here: its error
        is raised if that fails too)."""
        for j in self._futures:
            self.lease(j)
        for j, future in self._base_futures.items():
            try:
                future.result()
            except (Exception, CancelledError):
                self._base(j)

    def lease(self, j: int) -> PinnedLease:
        """Block j's pinned tensors, once read (waits for the background read; reads again,
        on the calling thread, if that failed)."""
        with self._lock:
            tensors = self._tensors.get(j)
        if tensors is None:
            try:
                tensors = self._futures[j].result()
            except (Exception, CancelledError):
                tensors = self._arrived(j, self._read(self._info(j).name))
        return PinnedLease(j, self._info(j), tensors)

    def close(self) -> None:
        """Stop reading (reads under way finish) and drop the fill's hold on the tensors."""
        self.closed = True
        for future in [*self._futures.values(), *self._base_futures.values()]:
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._tensors.clear()
