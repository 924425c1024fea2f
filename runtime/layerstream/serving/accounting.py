"""Every request is accounted for once, however it ends: in the metrics and in one log line.

The runtime's ``predict`` and ``predict_stream`` share this path (runtime.py): a request
that finishes is recorded when its final event passes, one that fails when its error is
known; the operator reads wait-vs-compute per request from the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..errors import LayerStreamError
from ..inference.request import Request
from ..inference.types import FinalEvent
from .metrics import ModelMetrics

log = logging.getLogger(__name__)

UNPARSED = "unparsed"  # the mode label of a request refused before it had a mode


@dataclass
class RequestRecord:
    """One request as the server saw it: which model, when it arrived, what it asked (once
    parsed) and how many events it had produced."""

    model: str
    metrics: ModelMetrics
    request_id: str | None
    arrived: float = field(default_factory=time.monotonic)
    request: Request | None = None
    outputs: tuple[str, ...] | None = None  # the outputs it asked for (None: the defaults)
    events: int = 0
    counted: bool = False  # in the metrics already (finished or failed)

    def finished(self, final: FinalEvent) -> None:
        """The request ended with ``final``: count it, log what it cost."""
        assert self.request is not None
        self.counted = True
        self.metrics.record(self.request.mode, final.finish_reason, final.stats)
        _log_finished(self.model, self.request_id, self.request, final)

    def failed(self, exc: Exception) -> LayerStreamError:
        """The error the client gets for ``exc``; recorded in the metrics and the log."""
        if isinstance(exc, LayerStreamError):
            error = exc
        else:
            log.error(
                "%s: request %r failed unexpectedly", self.model, self.request_id, exc_info=exc
            )
            error = LayerStreamError(
                f"{type(exc).__name__}: {exc} (a bug or a broken model store; the server log "
                "has the traceback)"
            )
        if not self.counted:  # a failure after the final event (encoding the answer)
            self.counted = True
            self.metrics.record_error(self._mode(), error.kind)
        log.warning(
            # %r: an id refused for its characters (a newline, NUL) must not forge log lines
            "%s %s: request %r failed (%s) after %d events in %.3fs: %s",
            self.model,
            self._mode(),
            self.request_id or "(no id)",  # gRPC requests carry none unless the client sets one
            error.kind,
            self.events,
            time.monotonic() - self.arrived,
            error.message,
        )
        return error

    def left(self) -> None:
        """The client went away before the request ended: counted with finish_reason
        ``cancelled`` (the runtime logs it; the engine stops at its next block)."""
        if not self.counted:
            self.counted = True
            self.metrics.record_cancelled(self._mode())

    def _mode(self) -> str:
        return self.request.mode.value if self.request is not None else UNPARSED

    @contextmanager
    def failures(self) -> Iterator[RequestRecord]:
        """Whatever fails inside is recorded and re-raised as the LayerStreamError the
        client gets (an unexpected exception as kind ``internal``, its traceback logged);
        a request its client left is recorded as cancelled."""
        try:
            yield self
        except (asyncio.CancelledError, GeneratorExit):
            self.left()
            raise
        except Exception as exc:
            error = self.failed(exc)
            if error is exc:
                raise
            raise error from exc


def _log_finished(model: str, request_id: str | None, request: Request, final: FinalEvent) -> None:
    s = final.stats
    log.info(
        "%s %s: %s, %d prompt + %d tokens in %.3fs (ttft %.3fs): compute %.3fs, weights "
        "waited %.3fs (%s); streamed %.1f MiB; block runs %d pinned / %d streamed (request %s)",
        model,
        request.mode.value,
        final.finish_reason.value,
        s.prompt_tokens,
        s.tokens,
        s.total_us / 1e6,
        s.ttft_us / 1e6,
        s.compute_us / 1e6,
        s.weight_wait_us / 1e6,
        bound(s.weight_wait_us, s.total_us),
        s.bytes_streamed / 2**20,
        s.resident_runs,
        s.streamed_runs,
        request_id or "(no id)",  # gRPC requests carry none unless the client sets one
    )


def bound(wait_us: int, total_us: int) -> str:
    """A word for the operator: waiting on weights for over half the time means the store
    (or the budget) sets the pace, not the CPU."""
    share = wait_us / total_us if total_us else 0.0
    return f"{share:.0%} waiting: " + ("I/O bound" if share > 0.5 else "compute bound")
