"""A bounded shutdown that ends every request in flight with a final event.

On SIGTERM, MLServer stops its gRPC server with a 5 s grace (fixed in MLServer), then its
REST server. Two things went wrong there:

- uvicorn waits for every open connection to finish its response, and MLServer sets no
  limit to that wait (uvicorn's ``timeout_graceful_shutdown``, None by default): one SSE
  client that stopped reading kept the server from ever exiting. Once a layerstream model
  is loaded, that wait is bounded by ``GRACE_S``; then uvicorn cancels what still runs. A
  limit set in uvicorn's config is kept.
- gRPC streams still running after the grace were cut with no final event: the client could
  not tell a server going away from a broken network. Now the server *drains*: when
  ``MLServer.stop`` begins, requests still waiting are refused (ShuttingDown: retry on
  another replica), and those in flight have ``DRAIN_S`` to finish; after that a generation
  ends at its next block with a final event whose ``finish_reason`` is ``shutdown`` (the
  tokens sent so far stand), and a hidden-states or embedding request with a ShuttingDown
  error. Either way within the gRPC grace, and before the REST server stops.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable

log = logging.getLogger(__name__)

GRACE_S = 10  # seconds; Kubernetes sends SIGKILL 30 s after SIGTERM by default
# seconds in-flight requests have to finish once shutdown begins: MLServer's gRPC grace is
# 5 s, and what is ended then still needs its final event delivered
DRAIN_S = 3.0


class Drain:
    """When the process began to shut down, and what to tell when it does (schedulers
    subscribe: each refuses its queue then)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._due: float | None = None  # time.monotonic() after which requests are ended
        self._subscribers: weakref.WeakSet = weakref.WeakSet()

    def subscribe(self, subscriber: object) -> None:
        """``subscriber.drain_begins()`` is called once, when shutdown begins (at once if it
        has); held weakly, so an unloaded model's scheduler goes."""
        with self._lock:
            self._subscribers.add(subscriber)
            begun = self._due is not None
        if begun:
            subscriber.drain_begins()

    def begin(self, seconds: float) -> None:
        with self._lock:
            if self._due is not None:
                return
            self._due = self._clock() + seconds
            subscribers = list(self._subscribers)
        log.info(
            "shutting down: requests in flight have %g s to finish, then end with "
            "finish_reason shutdown",
            seconds,
        )
        for subscriber in subscribers:
            subscriber.drain_begins()

    def due(self) -> bool:
        """Whether requests in flight must end now."""
        due = self._due
        return due is not None and self._clock() >= due


DRAIN = Drain()  # the process's: one server, one shutdown


def bound_shutdown() -> None:
    """Bound uvicorn's graceful shutdown, and drain the requests in flight when MLServer
    begins to stop (once per process)."""
    _bound_rest_shutdown()
    _drain_on_stop()


def _once(owner: type, name: str, wrap: Callable) -> None:
    current = getattr(owner, name)
    if getattr(current, "_layerstream", False):
        return
    wrapped = functools.wraps(current)(wrap(current))
    wrapped._layerstream = True
    setattr(owner, name, wrapped)


def _bound_rest_shutdown() -> None:
    import uvicorn

    def wrap(shutdown):
        async def bounded(self: uvicorn.Server, *args, **kwargs) -> None:
            if self.config.timeout_graceful_shutdown is None:
                log.info("open HTTP responses have %d s to finish before they are cut", GRACE_S)
                self.config.timeout_graceful_shutdown = GRACE_S
            await shutdown(self, *args, **kwargs)

        return bounded

    _once(uvicorn.Server, "shutdown", wrap)


def _drain_on_stop() -> None:
    from mlserver.server import MLServer

    def wrap(stop):
        async def draining(self, *args, **kwargs) -> None:
            # read here, not bound at import: a test's server sets it at startup
            DRAIN.begin(DRAIN_S)
            await stop(self, *args, **kwargs)

        return draining

    _once(MLServer, "stop", wrap)
