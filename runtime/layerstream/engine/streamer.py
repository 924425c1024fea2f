"""Hands the compute thread each streamed block, reading the next ones ahead.

The compute thread asks for block j; the streamer hands it the read-ahead it already
started, or has the reader read it synchronously on a miss. Read-ahead follows the learned
block order (what ran after j last time), so encoder-decoder models and decode loops that
wrap from the last block to the first are predicted correctly. How bytes are read and
checked is the reader's business (readers.py, mapped.py, checks.py).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..format.manifest import ChunkInfo, Manifest
from .checks import ChunkHealth
from .expert_reader import ExpertLease, ExpertReader
from .guessing import GuessChoice
from .plan import ResidencyPlan
from .prediction import ExpertPredictor
from .readers import BlockReader, Lease, ReaderKind
from .stats import StreamStats


class BlockOrder:
    """Learned successor of each streamed block, defaulting to the next block in its list."""

    def __init__(self, manifest: Manifest):
        lists = [b.prefix.rsplit(".", 1)[0] for b in manifest.blocks]
        self._default: list[int] = []
        for j, name in enumerate(lists):
            first = lists.index(name)
            last = len(lists) - 1 - lists[::-1].index(name)
            self._default.append(j + 1 if j < last else first)
        self._next: dict[int, int] = {}
        self._last: int | None = None

    def observe(self, j: int) -> None:
        if self._last is not None:
            self._next[self._last] = j
        self._last = j

    def upcoming(self, j: int, skip: frozenset[int], count: int) -> list[int]:
        """The next ``count`` blocks after ``j`` that are not in ``skip``."""
        out: list[int] = []
        if count <= 0:
            return out
        k = j
        for _ in range(len(self._default)):
            k = self._next.get(k, self._default[k])
            if k == j:
                break
            if k not in skip and k not in out:
                out.append(k)
                if len(out) == count:
                    break
        return out


# how many streamed blocks ahead expert guesses go: two gave each guess the time of a whole
# block, but at 0.61 precision against 0.74 the extra bytes made it slower (docs/benchmarks.md)
GUESS_AHEAD = 1


def _prefetch(done: Future[Lease], group: int, experts: list[int]) -> None:
    """A guess for a block read ahead, handed to its lease once the read is done."""
    if done.cancelled() or done.exception() is not None:
        return
    lease = done.result()
    if isinstance(lease, ExpertLease):
        lease.prefetch(group, experts)


class WeightStreamer:
    def __init__(
        self, reader: BlockReader, manifest: Manifest, plan: ResidencyPlan, io_threads: int
    ):
        self._reader = reader
        # plain attributes: read per block per token, so no property chain on the hot path
        self.stats: StreamStats = reader.checks.stats
        self.health: ChunkHealth = reader.checks.health
        self.manifest = manifest
        self.plan = plan
        self.order = BlockOrder(manifest)
        self._inflight: dict[int, Future[Lease]] = {}
        # read-aheads started for requests that have all left since: a failure of one is
        # nobody's (the block is read afresh for the next request that needs it)
        self._orphans: set[Future[Lease]] = set()
        # guesses of a block's routed experts made before its read began (prediction.py)
        self._hints: dict[int, list[tuple[int, list[int]]]] = {}
        self._hint_lock = threading.Lock()
        self.predictor: ExpertPredictor | None = None
        self.guessing = GuessChoice(True)  # whether the predictor's guesses are read ahead
        self._wanted: frozenset[int] = frozenset()  # the last read-ahead's predictions
        self._io = (
            ThreadPoolExecutor(max_workers=max(io_threads, 1), thread_name_prefix="layerstream-io")
            if plan.pool_buffers
            else None
        )

    @property
    def reader(self) -> ReaderKind:
        return self._reader.kind

    def _info(self, j: int) -> ChunkInfo:
        return self.manifest.chunks[self.manifest.blocks[j].chunk]

    def load_resident(self, chunk: str) -> dict[str, torch.Tensor]:
        """A chunk's tensors in memory of their own, for good (the rest, pinned blocks)."""
        return self._reader.load_resident(self.manifest.chunks[chunk])

    def counted_apart(self) -> contextlib.AbstractContextManager[None]:
        """The reads this thread makes meanwhile count as ``pinned_bytes_read``."""
        return self._reader.checks.counted_apart()

    def pin_base(self, j: int) -> None:
        """Hold block j's non-expert part in memory for good (its routers teach the
        predictor at once)."""
        reader = self._reader
        if not isinstance(reader, ExpertReader):
            raise RuntimeError(f"block {j}'s base can be pinned only with expert streaming")
        pinned = reader.pin_base(self._info(j))
        if self.predictor is not None:
            self.predictor.learn(j, pinned.tensors)

    # -- the compute thread's side ---------------------------------------------------------
    def acquire(self, j: int) -> Lease:
        """Block j's lease, with its tensors, from its read-ahead if one was started, else
        read now.

        Buffer accounting: the pool has 1 + read_ahead buffers and the previous block has
        been released, so the block being computed plus the blocks read ahead always fit.
        """
        self.stats.streamed_runs += 1
        self.order.observe(j)
        future = self._inflight.pop(j, None)
        start = time.perf_counter()
        if future is None:
            if j not in self._wanted:
                # Mispredicted: give back the other read-aheads' buffers before reading j,
                # then read ahead from here once j holds its buffer.
                self.drop_read_ahead()
            lease = self._reader.lease(j, self._info(j))
            self.read_ahead(j)
        else:
            self.read_ahead(j)  # start the next reads before waiting for this one
            lease = self._delivered(j, future)
        with self._hint_lock:
            hints = self._hints.pop(j, [])
        if isinstance(lease, ExpertLease):
            for group, experts in hints:
                lease.prefetch(group, experts)
        try:
            lease.make_views()
        except BaseException:
            lease.release()
            raise
        self.stats.wait_s += time.perf_counter() - start
        return lease

    def _delivered(self, j: int, future: Future[Lease]) -> Lease:
        """Block j's read-ahead lease. A read-ahead that failed after every request it was
        read for had left is read again: its error would be a stale one for this request."""
        orphaned = future in self._orphans
        self._orphans.discard(future)
        try:
            return future.result()
        except Exception:
            if not orphaned:
                raise
        return self._reader.lease(j, self._info(j))

    def guess_next(self, j: int, group: int, hidden: torch.Tensor) -> None:
        """Block j's experts module ``group`` runs on ``hidden``: guess what the routers of
        the next GUESS_AHEAD streamed blocks with experts will choose (past the blocks
        without: Jamba alternates them) and have those experts read ahead. Not past the end
        of the block order (the block after the last one runs on the next token)."""
        predictor = self.predictor
        if predictor is None:
            return
        self.guessing.observe(j, hidden.numel() // hidden.shape[-1], time.perf_counter())
        if not self.guessing.on:
            return
        guessed = 0
        for k in self.order.upcoming(j, self.plan.resident, self.plan.n_blocks):
            if k <= j or guessed == GUESS_AHEAD:
                return
            if not predictor.predicts(k):
                continue
            guessed += 1
            guess = predictor.predict(j, group, k, hidden)
            if guess is not None:
                self._hint(k, *guess)

    def _hint(self, k: int, group: int, experts: list[int]) -> None:
        future = self._inflight.get(k)
        if future is None:  # not being read yet: its read starts with these
            with self._hint_lock:
                self._hints.setdefault(k, []).append((group, experts))
            return
        future.add_done_callback(functools.partial(_prefetch, group=group, experts=experts))

    def _hinted(self, k: int, done: Future[Lease]) -> None:
        """A read-ahead lease is ready: start the guesses made before it existed."""
        with self._hint_lock:
            hints = self._hints.pop(k, [])
        for group, experts in hints:
            _prefetch(done, group, experts)

    def read_ahead(self, j: int) -> None:
        """Start reading the blocks predicted to run after ``j``, except those already in
        memory: the mapped reader maps those on the compute thread, cheaper than a hand-off
        to an I/O thread (docs/design-notes-engine.md, "Read-ahead skips blocks")."""
        if self._io is None:
            return
        wanted = self.order.upcoming(j, self.plan.resident, self.plan.read_ahead)
        before, self._wanted = self._wanted, frozenset(wanted)
        for k in list(self._inflight):
            if k not in wanted:
                self._discard(self._inflight.pop(k))
        for k in wanted:
            # a block predicted last time and not read then was in memory: not probed again
            if k in self._inflight or k in before:
                continue
            info = self._info(k)
            if self._reader.in_memory(info):
                continue
            future: Future[Lease] = Future()
            self._inflight[k] = future
            self._io.submit(self._lease_ahead, future, k, info)
            future.add_done_callback(functools.partial(self._hinted, k))
            self.stats.read_aheads += 1

    def _lease_ahead(self, future: Future[Lease], k: int, info: ChunkInfo) -> None:
        """On an I/O thread: block k's lease, handed over as soon as it is read; then the
        thread dequantizes a quantized block's tensors, which the compute thread shares
        once it needs them (dequantization.py)."""
        if not future.set_running_or_notify_cancel():
            return  # dropped before it started
        try:
            lease = self._reader.lease(k, info)
        except BaseException as exc:
            future.set_exception(exc)
            return
        future.set_result(lease)
        lease.work_ahead()

    def orphan_read_ahead(self) -> None:
        """Every request has left: the read-aheads in flight were for them. They are kept
        (the next request's first blocks are likely the same), but one that fails is read
        again when needed, not failed with the stale error."""
        self._orphans = set(self._inflight.values())

    def drop_read_ahead(self) -> None:
        """Give back every read-ahead buffer (after a request ends or fails)."""
        self._wanted = frozenset()
        self._orphans.clear()
        with self._hint_lock:
            self._hints.clear()
        for k in list(self._inflight):
            self._discard(self._inflight.pop(k))

    def _discard(self, future: Future[Lease]) -> None:
        self._orphans.discard(future)
        if future.cancel():
            return

        def give_back(done: Future[Lease]) -> None:
            if done.exception() is None:
                done.result().release()

        future.add_done_callback(give_back)

    def settle(self) -> None:
        """Wait for the work the reader handed off after blocks ran (tests, benchmarks)."""
        self._reader.settle()

    def close(self) -> None:
        self.drop_read_ahead()
        if self._io is not None:
            # in-flight reads finish and hand their mappings to the reaper, which goes last
            self._io.shutdown(wait=True, cancel_futures=True)
        self._reader.close()
