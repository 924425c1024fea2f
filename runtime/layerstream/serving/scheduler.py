"""One queue and one engine thread per model.

The model's hooks swap weights in and out of shared modules, so exactly one request runs
on a model at a time; the others wait in a bounded queue (concurrent requests are served in
turn, never interleaved). Engine work runs on this thread, never on the asyncio loop, and
its events are handed to the loop with ``call_soon_threadsafe``.

A request stops early, at the next block boundary (the engine asks before every block and
after every generated token), when its consumer has gone (client disconnect: the flag is
set when the stream is closed or cancelled) or when its deadline has passed (counted from
arrival, queue wait included: a request that expires while queued never runs, and its
client hears so at the deadline, not when the requests ahead of it finish).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ..errors import RequestCancelled, RequestTimeout, ServerBusy

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
    cancel: threading.Event = field(default_factory=threading.Event)
    emitted: int = 0  # events the job has emitted, for the log line when it stops early

    def post(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancel.set()

    def emit(self, event: object) -> None:
        self.emitted += 1
        self.post(event)

    def expired(self) -> bool:
        return self.deadline is not None and self.deadline.remaining() <= 0

    def stop_requested(self) -> bool:
        """The engine's check before every block: raises RequestTimeout past the deadline
        (checked first, so a consumer that gave up at the deadline reads as a timeout);
        True once the consumer has gone."""
        if self.expired():
            raise self.deadline.error(f"and was stopped after {self.emitted} events")
        return self.cancel.is_set()


class _Waiting:
    """The bounded queue of tickets waiting for the engine thread. Unlike queue.Queue, a
    ticket whose consumer has gone (client left, deadline passed) is taken out at once:
    abandoned requests must not hold the places of live ones until the engine gets to them."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._items: collections.deque[_Ticket | None] = collections.deque()
        self._cond = threading.Condition()

    def put_nowait(self, ticket: _Ticket) -> int:
        """Queue ``ticket``; the number now waiting. Raises queue.Full."""
        with self._cond:
            if len(self._items) >= self.maxsize:
                raise queue.Full
            self._items.append(ticket)
            self._cond.notify()
            return len(self._items)

    def put_stop(self) -> None:
        with self._cond:
            self._items.append(None)  # past the bound: closing must not fail
            self._cond.notify()

    def get(self) -> tuple[_Ticket | None, int]:
        """The next ticket (None: stop) and the number still waiting."""
        with self._cond:
            self._cond.wait_for(lambda: self._items)
            return self._items.popleft(), len(self._items)

    def discard(self, ticket: _Ticket) -> int | None:
        """Take ``ticket`` out if it is still waiting; the number then waiting, or None."""
        with self._cond:
            try:
                self._items.remove(ticket)
            except ValueError:
                return None
            return len(self._items)


class Scheduler:
    def __init__(
        self,
        name: str,
        max_queued: int,
        on_queue_change: Callable[[int], None] = lambda waiting: None,
    ):
        self.name = name
        self._queue = _Waiting(max_queued)
        self._on_queue_change = on_queue_change  # e.g. a gauge of the requests waiting
        self._thread = threading.Thread(target=self._run, name=f"layerstream-{name}", daemon=True)
        self._thread.start()

    async def stream(
        self, job: Job, deadline: Deadline | None = None, label: str = ""
    ) -> AsyncIterator[object]:
        """Run ``job`` on the engine thread; yield what it emits, then what it returns.

        An exception raised by the job is re-raised here, after the events before it; past
        ``deadline`` this raises RequestTimeout and the job stops at its next check.
        """
        ticket = _Ticket(
            job=job,
            loop=asyncio.get_running_loop(),
            events=asyncio.Queue(),
            label=label,
            deadline=deadline,
        )
        try:
            waiting = self._queue.put_nowait(ticket)
        except queue.Full:
            raise ServerBusy(
                f"model {self.name} has {self._queue.maxsize} requests waiting; retry later"
            ) from None
        self._on_queue_change(waiting)
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
            # (client disconnect): the engine thread stops at the next block boundary, and a
            # ticket still waiting gives its place up.
            ticket.cancel.set()
            waiting = self._queue.discard(ticket)
            if waiting is not None:
                self._on_queue_change(waiting)

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

    def _run(self) -> None:
        while True:
            ticket, waiting = self._queue.get()
            if ticket is None:
                return
            self._on_queue_change(waiting)
            if ticket.cancel.is_set():
                continue  # the client left (or gave up at its deadline) while queued
            if ticket.expired():
                ticket.post(ticket.deadline.error("while queued"))
                ticket.post(_DONE)
                continue
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
            ticket.post(_DONE)

    def close(self) -> None:
        self._queue.put_stop()
        self._thread.join(timeout=30)
