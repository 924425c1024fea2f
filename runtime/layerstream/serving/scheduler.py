"""Admission and worker threads per model.

Up to ``max_active_sequences`` requests run at once, each on a worker thread of its own;
the engine makes them share every pass over the streamed blocks (engine/sweeps.py). The
others wait in a bounded queue and are admitted in arrival order. Engine work runs on the
worker threads, never on the asyncio loop, and its events are handed to the loop with
``call_soon_threadsafe``.

A request stops early, at the next block boundary (the engine asks before every block and
after every generated token), when its consumer has gone (client disconnect: the flag is
set when the stream is closed or cancelled) or when its deadline has passed (counted from
arrival, queue wait included: a request that expires while queued never runs, and its
client hears so at the deadline, not when the requests ahead of it finish), or when the
server's shutdown drain is over (shutdown.py).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import RequestCancelled, RequestTimeout, ServerBusy, ShuttingDown
from .shutdown import DRAIN, Drain

log = logging.getLogger(__name__)

Emit = Callable[[object], None]
Job = Callable[[Emit, Callable[[], bool]], object]
_DONE = object()


@dataclass(frozen=True)
class Deadline:
    """When a request must be done (``time.monotonic()``), and what set it, for the error."""

    at: float
    seconds: float
    source: str  # e.g. "the request's timeout parameter"

    @classmethod
    def after(cls, seconds: float, source: str, start: float | None = None) -> Deadline:
        start = time.monotonic() if start is None else start
        return cls(at=start + seconds, seconds=seconds, source=source)

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def error(self, where: str) -> RequestTimeout:
        return RequestTimeout(
            f"the request ran past its deadline of {self.seconds:g}s from arrival (set by "
            f"{self.source}) {where}; allow more time or ask for less work"
        )


@dataclass(eq=False)  # identity: a ticket is taken out of the queue by identity
class _Ticket:
    job: Job
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    label: str
    deadline: Deadline | None = None
    drain_due: Callable[[], bool] = lambda: False  # the server's drain is over
    kv_bytes: int = 0  # held from admission until the consumer is done (or the deadline)
    cancel: threading.Event = field(default_factory=threading.Event)
    emitted: int = 0  # events the job has emitted, for the log line when it stops early
    admitted: bool = False
    released: bool = False  # its kv_bytes given back (under the scheduler's condition)
    dropped: bool = False  # past its deadline undelivered: later events are dropped

    def post(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self._put, item)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancel.set()

    def _put(self, item: object) -> None:
        if not self.dropped:
            self.events.put_nowait(item)

    def drop_undelivered(self, error: BaseException) -> None:
        """On the loop, at the deadline: what the consumer has not read goes (a client that
        stopped reading holds no memory past it), and it reads ``error`` next."""
        self.cancel.set()
        self.dropped = True
        while not self.events.empty():
            self.events.get_nowait()
        self.events.put_nowait(error)
        self.events.put_nowait(_DONE)

    def emit(self, event: object) -> None:
        self.emitted += 1
        self.post(event)

    def expired(self) -> bool:
        return self.deadline is not None and self.deadline.remaining() <= 0

    def stop_requested(self) -> bool:
        """The engine's check before every block: raises RequestTimeout past the deadline
        (checked first, so a consumer that gave up at the deadline reads as a timeout),
        ShuttingDown once the server's drain is over; True once the consumer has gone."""
        if self.expired():
            raise self.deadline.error(f"and was stopped after {self.emitted} events")
        if self.drain_due() and not self.cancel.is_set():
            raise ShuttingDown(
                f"the server is shutting down; the request was stopped after {self.emitted} "
                "events: retry on another replica"
            )
        return self.cancel.is_set()


class Scheduler:
    """Admits a model's requests in arrival order, as many at a time as ``max_active`` and
    the KV cache budget allow; the others wait in a bounded queue (``max_queued``).

    Admission is strictly first in, first out: a request that does not fit yet holds the
    ones behind it back (none can starve), and it is admitted as soon as enough requests in
    flight have ended. A request whose consumer has gone (client left, deadline passed) is
    taken out of the queue at once: abandoned requests must not hold the places of live
    ones."""

    def __init__(
        self,
        name: str,
        max_queued: int,
        max_active: int = 1,
        kv_budget: int | None = None,
        on_queue_change: Callable[[int], None] = lambda waiting: None,
        on_active_change: Callable[[int], None] = lambda active: None,
        drain: Drain = DRAIN,
    ):
        self.name = name
        self.max_queued = max_queued
        self.max_active = max_active
        self.kv_budget = kv_budget  # bytes; None: only max_active limits admission
        self._on_queue_change = on_queue_change  # e.g. a gauge of the requests waiting
        self._on_active_change = on_active_change
        self._cond = threading.Condition()
        self._queue: collections.deque[_Ticket] = collections.deque()
        self._active = 0
        self._kv_in_use = 0
        self._closed = False
        self._drain = drain
        self._draining = False  # the server is shutting down: new requests are refused
        self._workers = ThreadPoolExecutor(max_active, thread_name_prefix=f"layerstream-{name}")
        self._thread = threading.Thread(
            target=self._admit_in_order, name=f"layerstream-{name}-admission", daemon=True
        )
        self._thread.start()
        drain.subscribe(self)

    def drain_begins(self) -> None:
        """The server is shutting down (shutdown.py): refuse what waits and what comes; the
        requests in flight go on until the drain is over."""
        with self._cond:
            self._draining = True
            for ticket in self._queue:
                ticket.post(ShuttingDown("the server is shutting down: retry on another replica"))
                ticket.post(_DONE)
            self._queue.clear()
            self._on_queue_change(0)
            self._cond.notify_all()

    async def stream(
        self, job: Job, deadline: Deadline | None = None, label: str = "", kv_bytes: int = 0
    ) -> AsyncIterator[object]:
        """Run ``job`` on a worker thread once admitted; yield what it emits, then what it
        returns. ``kv_bytes``: what its KV cache may grow to (counted against the budget).

        An exception raised by the job is re-raised here, after the events before it; past
        ``deadline`` this raises RequestTimeout and the job stops at its next check.
        """
        ticket = _Ticket(
            job=job,
            loop=asyncio.get_running_loop(),
            events=asyncio.Queue(),
            label=label,
            deadline=deadline,
            drain_due=self._drain.due,
            kv_bytes=kv_bytes,
        )
        with self._cond:
            if self._draining:
                raise ShuttingDown("the server is shutting down: retry on another replica")
            if self._closed:
                raise ServerBusy(f"model {self.name} is being unloaded; retry later")
            if len(self._queue) >= self.max_queued:
                raise ServerBusy(
                    f"model {self.name} has {self.max_queued} requests waiting; retry later"
                )
            self._queue.append(ticket)
            self._on_queue_change(len(self._queue))
            self._cond.notify_all()
        # The deadline bounds delivery too: a consumer that stopped reading (its client
        # paused) would otherwise keep the events of a finished job for as long as it liked.
        timer = None
        if deadline is not None:
            timer = ticket.loop.call_later(max(deadline.remaining(), 0), self._expire, ticket)
        try:
            while True:
                item = await self._next(ticket)
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # Reached on normal end, on error, and when the consumer is cancelled or closed
            # (client disconnect): the job stops at its next block boundary, and a ticket
            # still waiting gives its place up.
            if timer is not None:
                timer.cancel()
            ticket.cancel.set()
            self._discard(ticket)
            self._release(ticket)

    def _expire(self, ticket: _Ticket) -> None:
        assert ticket.deadline is not None
        if ticket.released or ticket.events.empty():
            return  # read up to date: a consumer waiting hears of the deadline in _next
        log.info(
            "%s: request %s passed its deadline with %d events undelivered; dropped",
            self.name,
            ticket.label,
            ticket.events.qsize(),
        )
        ticket.drop_undelivered(ticket.deadline.error("before its client read its answer"))
        self._release(ticket)

    def _release(self, ticket: _Ticket) -> None:
        """Give back what ``ticket`` held (once): its events are read or dropped."""
        with self._cond:
            if ticket.released or not ticket.admitted:
                return
            ticket.released = True
            self._kv_in_use -= ticket.kv_bytes
            self._cond.notify_all()

    def _discard(self, ticket: _Ticket) -> None:
        with self._cond:
            try:
                self._queue.remove(ticket)
            except ValueError:
                return
            self._on_queue_change(len(self._queue))
            self._cond.notify_all()

    @staticmethod
    async def _next(ticket: _Ticket) -> object:
        if ticket.deadline is None:
            return await ticket.events.get()
        if not ticket.events.empty():  # wait_for would not look at it once time is up
            return ticket.events.get_nowait()
        try:
            return await asyncio.wait_for(ticket.events.get(), max(ticket.deadline.remaining(), 0))
        except asyncio.TimeoutError:
            # Nothing arrived before the deadline: queued behind other requests, or between
            # two blocks. The finally above flags the ticket, so it never runs or stops next.
            raise ticket.deadline.error("while waiting for its next event") from None

    def _fits(self, ticket: _Ticket) -> bool:
        if self._active >= self.max_active:
            return False
        return self.kv_budget is None or self._kv_in_use + ticket.kv_bytes <= self.kv_budget

    def _admit_in_order(self) -> None:
        while True:
            with self._cond:
                ticket = self._next_admissible()
                if ticket is None:
                    return
                self._queue.popleft()
                self._on_queue_change(len(self._queue))
                admitted = not (ticket.cancel.is_set() or ticket.expired())
                if admitted:
                    ticket.admitted = True
                    self._active += 1
                    self._kv_in_use += ticket.kv_bytes
                    self._on_active_change(self._active)
            if not admitted:
                if not ticket.cancel.is_set():  # expired while queued; the client still waits
                    ticket.post(ticket.deadline.error("while queued"))
                    ticket.post(_DONE)
                continue
            self._workers.submit(self._run, ticket)

    def _next_admissible(self) -> _Ticket | None:
        """Wait (the condition held) until the queue's head can go: it fits, or its consumer
        has gone. None once the scheduler is closing; what is still queued then is told so."""
        while True:
            if self._closed:
                for ticket in self._queue:
                    ticket.post(ServerBusy(f"model {self.name} was unloaded; retry elsewhere"))
                    ticket.post(_DONE)
                self._queue.clear()
                self._on_queue_change(0)
                return None
            if self._queue:
                ticket = self._queue[0]
                if ticket.cancel.is_set() or ticket.expired() or self._fits(ticket):
                    return ticket
            self._cond.wait()

    def _run(self, ticket: _Ticket) -> None:
        try:
            result = ticket.job(ticket.emit, ticket.stop_requested)
            ticket.post(result)
        except RequestCancelled:
            log.info(
                "%s: request %s cancelled by the client; stopped after %d events",
                self.name,
                ticket.label,
                ticket.emitted,
            )
        except ShuttingDown as exc:
            log.info(
                "%s: request %s stopped by the shutdown after %d events",
                self.name,
                ticket.label,
                ticket.emitted,
            )
            ticket.post(exc)
        except RequestTimeout as exc:
            log.info(
                "%s: request %s stopped at its deadline after %d events",
                self.name,
                ticket.label,
                ticket.emitted,
            )
            ticket.post(exc)
        except BaseException as exc:  # handed to the request's coroutine, never lost
            ticket.post(exc)
        finally:
            with self._cond:
                # its kv_bytes stay held until its events are read (stream's finally), which
                # may happen as soon as _DONE is posted: the job counts as ended first
                self._active -= 1
                self._on_active_change(self._active)
                self._cond.notify_all()
            ticket.post(_DONE)

    def close(self) -> None:
        """Refuse new requests and tell the queued ones the model is gone; the requests in
        flight finish (each within its deadline)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        self._workers.shutdown(wait=True)
