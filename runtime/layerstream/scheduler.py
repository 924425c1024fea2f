"""One queue and one engine thread per model.

The model's hooks swap weights in and out of shared modules, so exactly one request runs
on a model at a time; the others wait in a bounded queue (concurrent requests are served in
turn, never interleaved). Engine work runs on this thread, never on the asyncio loop, and
its events are handed to the loop with ``call_soon_threadsafe``. A request whose consumer
has gone (client disconnect) is flagged; the engine checks the flag between blocks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from .errors import RequestCancelled, ServerBusy

log = logging.getLogger(__name__)

Emit = Callable[[object], None]
Job = Callable[[Emit, Callable[[], bool]], object]
_DONE = object()


@dataclass
class _Ticket:
    job: Job
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancel: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)

    def post(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancel.set()


class Scheduler:
    def __init__(self, name: str, max_queued: int):
        self.name = name
        self._queue: queue.Queue[_Ticket | None] = queue.Queue(maxsize=max_queued)
        self._thread = threading.Thread(target=self._run, name=f"layerstream-{name}", daemon=True)
        self._thread.start()

    async def stream(self, job: Job) -> AsyncIterator[object]:
        """Run ``job`` on the engine thread; yield what it emits, then what it returns.

        An exception raised by the job is re-raised here, after the events before it.
        """
        ticket = _Ticket(job=job, loop=asyncio.get_running_loop(), events=asyncio.Queue())
        try:
            self._queue.put_nowait(ticket)
        except queue.Full:
            raise ServerBusy(
                f"model {self.name} has {self._queue.maxsize} requests waiting; retry later"
            ) from None
        try:
            while True:
                item = await ticket.events.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # Reached on normal end, on error, and when the consumer is cancelled or closed
            # (client disconnect): the engine thread stops at the next block boundary.
            ticket.cancel.set()

    def _run(self) -> None:
        while True:
            ticket = self._queue.get()
            if ticket is None:
                return
            if ticket.cancel.is_set():
                continue  # the client left while the request was queued
            try:
                result = ticket.job(ticket.post, ticket.cancel.is_set)
                ticket.post(result)
            except RequestCancelled:
                log.info("request cancelled by the client")
            except BaseException as exc:  # handed to the request's coroutine, never lost
                ticket.post(exc)
            ticket.post(_DONE)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
