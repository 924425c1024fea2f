"""Shared sweeps: every request in flight runs through a streamed block while it is installed.

Each request runs transformers' own forward or generate on a thread of its own (its own KV
cache, sampler, stop strings), so its arithmetic is exactly its arithmetic alone; what the
requests share is the I/O. A streamed block's pre-forward hook is a rendezvous:

- a request's thread that reaches streamed block j waits until j is installed;
- when no request in flight is computing (each waits at a block, or has left), the thread
  that made it so installs the next block, in index order after the last one installed,
  that someone waits for, wrapping around. One pass in index order is a sweep: every
  waiting request's block comes up within one sweep, so none starves, and a request that
  arrives mid-sweep starts with the next one;
- a block stays installed until the next one is, so everyone who reaches it meanwhile
  runs through it; its lease is given back just before the next block's is taken.

Compute is shared too: ``ComputeSlots`` lets as many threads compute at once as the CPUs
allow beside torch's intra-op threads (one, when torch has every CPU), handed over in
arrival order at block boundaries, so requests never oversubscribe the cores and each op
runs with the threads it has alone.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import RequestCancelled
from .expert_reader import ExpertLease
from .readers import Lease
from .stats import StreamStats
from .streamer import WeightStreamer

log = logging.getLogger(__name__)


class ComputeSlots:
    """A counting semaphore handed over in arrival order (``threading.Semaphore`` is not
    fair: a thread that releases and re-acquires at once would keep its slot)."""

    def __init__(self, count: int):
        if count < 1:
            raise ValueError(f"compute slots must be at least 1, not {count}")
        self.count = count
        self._free = count
        self._queue: deque[threading.Lock] = deque()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            if self._free and not self._queue:
                self._free -= 1
                return
            handover = threading.Lock()
            handover.acquire()
            self._queue.append(handover)
        handover.acquire()  # released by the thread that hands its slot over

    def release(self) -> None:
        with self._lock:
            if self._queue:
                self._queue.popleft().release()
            else:
                self._free += 1

    def pass_on(self) -> None:
        """Let the threads waiting for a slot go first (a block boundary)."""
        if self._queue:  # read without the lock: a stale answer only delays a turn
            self.release()
            self.acquire()


@dataclass(eq=False)
class Sweep:
    started: float
    before: StreamStats  # the streamer's counters when it began
    sequences: int = 0  # the riders that ran a block of it
    tokens: int = 0


@dataclass(frozen=True)
class SweepRecord:
    """A finished sweep, for the operator's metrics."""

    sequences: int
    tokens: int
    bytes_streamed: int  # read from the store while it ran (read-ahead for the next included)
    seconds: float
    experts_read: int = 0  # routed experts read alone (expert streaming)
    expert_bytes: int = 0  # their bytes, a part of bytes_streamed
    experts_predicted: int = 0  # experts read ahead on a guess (a part of experts_read)
    experts_predicted_used: int = 0  # those the router then chose
    expert_cache_hits: int = 0  # experts found kept in memory instead of read


@dataclass(eq=False)
class _Install:
    index: int
    lease: Lease | None
    sweep: Sweep
    error: Exception | None = None  # the read failed: the riders waiting for it get this


class _Waiter:
    install: _Install | None = None  # set by the install that admits it


def _own_copy(error: Exception) -> Exception:
    """A copy of ``error`` for one of the requests it fails: one exception object raised on
    several threads would grow one traceback. An error that cannot be copied goes as is."""
    try:
        return copy.copy(error)
    except Exception:
        return error


class Installable(Protocol):
    """A streamed block's hook: leases its tensors, binds them into its module, and unbinds
    them."""

    def acquire(self) -> Lease: ...

    def install(self, lease: Lease) -> None: ...

    def uninstall(self, lease: Lease) -> None: ...


class Rider:
    """One request's thread in the sweeps, and what it cost."""

    def __init__(self, cancelled: Callable[[], bool], implicit: bool = False):
        self.cancelled = cancelled
        self.implicit = implicit  # a model call outside engine.request(): one block long
        self.resident_runs = 0
        self.streamed_runs = 0
        self.wait_s = 0.0  # waiting for its blocks to be installed
        self.experts_routed = 0  # experts its streamed blocks' routers chose, summed
        self.install: _Install | None = None  # the block it is running
        self.ridden: list[Sweep] = []

    def check_cancel(self) -> None:
        if self.cancelled():
            raise RequestCancelled()

    @property
    def sweeps(self) -> int:
        return len(self.ridden)

    @property
    def sweep_sequences(self) -> int:
        """The sequences (this one included) of the sweeps it rode, summed: divided by
        ``sweeps``, how many sequences shared each of its sweeps on average."""
        return sum(sweep.sequences for sweep in self.ridden)


class SweepGroup:
    """The rendezvous of one engine's streamed blocks (module docstring)."""

    def __init__(
        self,
        streamer: WeightStreamer,
        slots: ComputeSlots,
        on_sweep: Callable[[SweepRecord], None] | None = None,
    ):
        self.streamer = streamer
        self.slots = slots
        self.on_sweep = on_sweep
        self.hooks: Sequence[Installable | None] = ()  # by block index; set once built
        # run at every block boundary where nobody computes, before the next install (the
        # engine installs the pinned blocks the background fill has read since)
        self.at_boundary: Callable[[], None] | None = None
        self._cond = threading.Condition()
        self._members = 0
        self._running = 0  # members computing: not waiting for a block
        self._waiting: dict[int, list[_Waiter]] = {}  # block -> members waiting for it
        self._installed: _Install | None = None
        self._busy = False  # a member is changing what is installed (cond not held)
        self._sweep: Sweep | None = None
        self._last_index: int | None = None  # the block installed last, in this busy spell
        self._local = threading.local()

    @property
    def members(self) -> int:
        return self._members

    def current(self) -> Rider | None:
        return getattr(self._local, "rider", None)

    # -- membership --------------------------------------------------------------------------
    def join(self, cancelled: Callable[[], bool], implicit: bool = False) -> Rider:
        """The calling thread starts a request: it computes (holds a slot) until it waits."""
        if self.current() is not None:
            raise RuntimeError("this thread is already running a request on this engine")
        rider = Rider(cancelled, implicit)
        with self._cond:
            self._members += 1
            self._running += 1
        self._local.rider = rider
        self.slots.acquire()
        return rider

    def leave(self, rider: Rider, failed: bool = False) -> None:
        """The calling thread's request is done. The last one out gives the installed block
        back; after a failure also the read-aheads, which may be for blocks nobody needs."""
        self._local.rider = None
        self.slots.release()
        with self._cond:
            self._members -= 1
            self._running -= 1
            idle = self._members == 0 and not self._busy
            if idle:
                self._busy = True
                old, self._installed = self._installed, None
                closed, self._sweep = self._close_sweep(), None
                self._last_index = None
            self._cond.notify_all()
        if not idle:
            return
        try:
            self._retire(old)
            if failed:
                self.streamer.drop_read_ahead()
            else:  # kept for the next request, which gets a fresh read if one fails
                self.streamer.orphan_read_ahead()
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
            self._report(closed)

    # -- the hooks' side -----------------------------------------------------------------------
    def resident_run(self) -> None:
        """A pinned block is about to run: it never waits for weights."""
        rider = self.current()
        if rider is not None:
            rider.check_cancel()
            rider.resident_runs += 1
            self.slots.pass_on()

    def enter(self, j: int) -> None:
        """Return once block j is installed for the calling thread (its pre-forward hook)."""
        rider = self.current()
        if rider is None:
            rider = self.join(lambda: False, implicit=True)
        rider.check_cancel()
        started = time.perf_counter()
        self.slots.release()
        try:
            install = self._admit(j, rider)
        finally:
            self.slots.acquire()
        rider.wait_s += time.perf_counter() - started
        if install.error is not None:
            raise _own_copy(install.error) from install.error
        rider.streamed_runs += 1
        rider.install = install

    def exit(self, ran: bool) -> None:
        """The calling thread is done with its block (post-forward hook, also on failure)."""
        rider = self.current()
        if rider is None:
            return
        install, rider.install = rider.install, None
        try:
            if ran and install is not None and install.lease is not None:
                install.lease.confirm()
        finally:
            if rider.implicit:
                self.leave(rider, failed=not ran)

    def fetch_experts(self, lease: ExpertLease, group: int, experts: list[int]) -> None:
        """The calling thread's block routes to ``experts`` of its experts module ``group``:
        read those the installed lease lacks, with the compute slot handed to another
        request meanwhile (the block stays installed: this thread still counts as running)."""
        rider = self.current()
        if rider is not None:
            rider.experts_routed += len(experts)
        if not lease.missing(group, experts):
            return
        started = time.perf_counter()
        self.slots.release()
        try:
            lease.ensure(group, experts)
        finally:
            self.slots.acquire()
            if rider is not None:  # waiting for experts is waiting for weights
                rider.wait_s += time.perf_counter() - started

    def note_token(self, rider: Rider) -> None:
        """``rider`` generated a token (counted in the sweep it last rode)."""
        if rider.ridden:
            with self._cond:
                rider.ridden[-1].tokens += 1

    # -- the rendezvous --------------------------------------------------------------------------
    def _admit(self, j: int, rider: Rider) -> _Install:
        with self._cond:
            install = self._installed
            if install is None or install.index != j or install.error is not None:
                install = self._wait_for(j)
            if install.error is None:
                sweep = install.sweep
                if not rider.ridden or rider.ridden[-1] is not sweep:
                    rider.ridden.append(sweep)
                    sweep.sequences += 1
            return install

    def _wait_for(self, j: int) -> _Install:
        """Wait (the condition held) until an install of block j admits the caller. The
        installer admits every waiter of its block at once: a waiter that has not woken yet
        still counts as computing, so nobody moves on past a block before it has run it."""
        waiter = _Waiter()
        self._running -= 1
        self._waiting.setdefault(j, []).append(waiter)
        try:
            while waiter.install is None:
                if not self._busy and self._running == 0:
                    self._install_next()
                else:
                    self._cond.wait()
        except BaseException:
            if waiter.install is None:
                self._waiting[j].remove(waiter)
                if not self._waiting[j]:
                    del self._waiting[j]
                self._running += 1
            raise
        return waiter.install

    def _next_block(self) -> int:
        """The first block after the last one installed that someone waits for, wrapping."""
        waited = sorted(self._waiting)
        last = self._last_index
        if last is not None:
            for k in waited:
                if k > last:
                    return k
        return waited[0]

    def _install_next(self) -> None:
        """Called with the condition held, nobody computing: retire the installed block and
        install the next. The condition is let go during the I/O; whatever happens, the
        waiters of the block are answered (its lease, or the error that stopped it)."""
        j = self._next_block()
        old, self._installed = self._installed, None
        closed = None
        last = self._last_index
        if self._sweep is None or last is None or j <= last:  # wrapped around: a new sweep
            closed = self._close_sweep()
            self._sweep = Sweep(time.perf_counter(), self.streamer.stats.snapshot())
        sweep = self._sweep
        self._last_index = j
        self._busy = True
        self._cond.release()
        error: Exception | None = None
        lease: Lease | None = None
        try:
            self._retire(old)
            self._report(closed)
            if self.at_boundary is not None:
                self.at_boundary()
            hook = self.hooks[j]
            if hook is None:
                raise RuntimeError(f"block {j} is pinned, not streamed: it cannot be installed")
            lease = hook.acquire()
            try:
                hook.install(lease)
            except BaseException:
                lease.release()
                raise
        except Exception as exc:  # given to every rider waiting for block j
            error, lease = exc, None
        finally:
            self._cond.acquire()
            self._busy = False
            if lease is None and error is None:  # interrupted (not an Exception): say so
                error = RuntimeError(f"installing block {j} was interrupted")
            install = self._installed = _Install(j, lease, sweep, error)
            waiters = self._waiting.pop(j, [])
            for waiter in waiters:
                waiter.install = install
            self._running += len(waiters)
            self._cond.notify_all()

    def _close_sweep(self) -> SweepRecord | None:
        """The current sweep's record (the condition held): its bytes end where the next
        sweep's begin, so no read is counted twice."""
        sweep = self._sweep
        if sweep is None:
            return None
        read = self.streamer.stats.since(sweep.before)
        return SweepRecord(
            sequences=sweep.sequences,
            tokens=sweep.tokens,
            bytes_streamed=read.bytes_read,
            seconds=time.perf_counter() - sweep.started,
            experts_read=read.experts_read,
            expert_bytes=read.expert_bytes,
            experts_predicted=read.experts_predicted,
            experts_predicted_used=read.experts_predicted_used,
            expert_cache_hits=read.expert_cache_hits,
        )

    def _retire(self, install: _Install | None) -> None:
        if install is None or install.lease is None:
            return
        hook = self.hooks[install.index]
        try:
            if hook is not None:
                hook.uninstall(install.lease)
        finally:
            install.lease.release()

    def _report(self, record: SweepRecord | None) -> None:
        """Hand a finished sweep to ``on_sweep``; a failing callback is logged, never
        allowed to break the sweeps of the requests in flight."""
        if record is None or self.on_sweep is None:
            return
        try:
            self.on_sweep(record)
        except Exception:
            log.exception("reporting a sweep failed")

    def if_quiet(self, work: Callable[[], None]) -> bool:
        """Run ``work`` now if no request is in flight (nobody is inside a block), else
        not: the block boundaries of the requests in flight run ``at_boundary``."""
        with self._cond:
            if self._members or self._busy:
                return False
            work()
            return True

    def when_quiet(self, done: Callable[[], bool], work: Callable[[], None]) -> None:
        """Wait until ``done()``; while it is not, run ``work`` whenever no request is in
        flight (the block boundaries of requests in flight run ``at_boundary``)."""
        with self._cond:
            while not done():
                if self._members == 0 and not self._busy:
                    work()
                    if done():
                        return
                # until the next install or request end; bounded, so a ``done`` that turns
                # true without a notification (an engine closing) is seen
                self._cond.wait(timeout=1.0)

    def close(self) -> None:
        """Give back what is installed (the engine is closing; no request is in flight)."""
        with self._cond:
            old, self._installed = self._installed, None
        self._retire(old)
