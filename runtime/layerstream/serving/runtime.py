"""The MLServer runtime: translates between V2 requests/responses and the engine.

Configure it in model-settings.json (``implementation: layerstream.LayerStreamRuntime``,
settings in ``parameters.extra``, see settings.py). Serve with ``mlserver start`` and a
settings.json that has ``parallel_workers: 0`` and ``gzip_enabled: false``.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from mlserver import MLModel
from mlserver.types import InferenceRequest, InferenceResponse

from ..engine import tuning
from ..engine.engine import Engine, EngineOptions
from ..errors import ChunkIntegrityError, InvalidRequest, LayerStreamError
from ..inference.capabilities import capabilities
from ..inference.generation import run_generation
from ..inference.hidden import run_hidden_states
from ..inference.prompts import prompt_byte_limit, tokenize
from ..inference.types import FinalEvent, HiddenStateEvent
from ..stores import open_store
from . import grpc_status, metrics
from .encoding import encode_event, encode_unary, error_response
from .protocol import Request, check_context, parse_request
from .scheduler import Deadline, Scheduler
from .settings import LayerStreamSettings
from .transport import Transport, asked_before_a_request, transport_of

log = logging.getLogger(__name__)


class LayerStreamRuntime(MLModel):
    """Streams a chunked Hugging Face model's weights while it answers."""

    @property
    def ready(self) -> bool:
        """MLServer's readiness (set from load()), withdrawn once the engine has found a
        damaged chunk: an orchestrator then reschedules the model instead of sending it
        requests that would fail.

        Withdrawn from the probes only: MLServer asks the same property before each request
        and would refuse it with "not ready yet", which cuts an SSE stream (its 200 is sent)
        and names no chunk. Requests go on to ``_parse``, which answers them with the
        integrity error that names the chunk and the fix."""
        engine = getattr(self, "_engine", None)
        if engine is None or engine.damage is None:
            return self._ready
        return self._ready and asked_before_a_request()

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = value

    async def load(self) -> bool:
        _route_logs_to_mlserver()
        if not faulthandler.is_enabled():
            # A chunk file truncated under a live mapping kills the process with SIGBUS
            # (docs/integrity.md): the log then shows where, not just an exit status.
            faulthandler.enable()
        grpc_status.install()
        settings = LayerStreamSettings.from_extra(
            self.settings.parameters.extra if self.settings.parameters else None
        )
        folder = self._model_folder()
        # Building the engine reads chunks and builds the model: off the event loop, which
        # serves every other model and the health probes meanwhile.
        self._engine = await asyncio.to_thread(_build_engine, settings, folder)
        self._settings_ls = settings
        # capabilities run the model once on the meta device, the limit scans the vocabulary
        self._caps = await asyncio.to_thread(capabilities, self._engine)
        self._prompt_limit = await asyncio.to_thread(
            prompt_byte_limit,
            self._engine.tokenizer,
            self._caps.context_length,
            settings.max_prompt_bytes,
        )
        name = self.name
        self._scheduler = Scheduler(
            name, settings.max_queued_requests, lambda waiting: metrics.set_queued(name, waiting)
        )
        return True

    def _model_folder(self) -> Path | None:
        source = getattr(self.settings, "_source", None)
        return Path(source).parent if source else None

    async def unload(self) -> bool:
        scheduler, engine = getattr(self, "_scheduler", None), getattr(self, "_engine", None)
        if scheduler is not None:
            await asyncio.to_thread(scheduler.close)
        if engine is not None:
            engine.close()
        return True

    async def predict_stream(
        self, payloads: AsyncIterator[InferenceRequest]
    ) -> AsyncIterator[InferenceResponse]:
        # One request in, a stream out; don't wait for the client to half-close the stream.
        payload = await payloads.__anext__()
        arrived = time.monotonic()
        transport = transport_of(payloads)
        request: Request | None = None
        sent = 0
        try:
            request = self._parse(payload)
            # closed here, not when garbage collected: closing flags the engine at once
            async with contextlib.aclosing(self._stream(request, payload, arrived)) as events:
                async for event in events:
                    if isinstance(event, FinalEvent):
                        self._finished(payload.id, request, event)
                    if isinstance(event, HiddenStateEvent):
                        # a [seq, hidden] tensor becomes a long list of floats: off the loop
                        yield await asyncio.to_thread(
                            encode_event, self.name, self.version, payload.id, event
                        )
                    else:
                        yield encode_event(self.name, self.version, payload.id, event)
                    sent += 1
        except (asyncio.CancelledError, GeneratorExit):
            # MLServer cancels or closes this generator when the client disconnects; the
            # scheduler has flagged the request, the engine stops at its next block.
            log.info("%s: request %s: the client left after %d events", self.name, payload.id, sent)
            raise
        # Every failure ends the stream with its kind, never a cut: an unexpected exception
        # too (as kind "internal", its traceback logged).
        except Exception as exc:
            error = self._failed(payload, request, exc, sent, arrived)
            if transport is Transport.GRPC:
                # The call's status: INVALID_ARGUMENT, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED,
                # UNAVAILABLE or INTERNAL (grpc_status.py), the details "<kind>: <message>".
                if error is exc:
                    raise
                raise error from exc
            # SSE (or a caller we do not know): the 200 is sent, so the error is the last event
            yield error_response(self.name, self.version, payload.id, error)

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        arrived = time.monotonic()
        request: Request | None = None
        events: list[object] = []
        try:
            request = self._parse(payload)
            async with contextlib.aclosing(self._stream(request, payload, arrived)) as stream:
                async for event in stream:
                    events.append(event)
            self._finished(payload.id, request, events[-1])
            return encode_unary(self.name, self.version, payload.id, request, events)
        except Exception as exc:  # MLServer answers {"error": "<kind>: <message>"}, its status
            error = self._failed(payload, request, exc, len(events), arrived)
            if error is exc:
                raise
            raise error from exc

    def _parse(self, payload: InferenceRequest) -> Request:
        if not self._ready:
            raise InvalidRequest(f"model {self.name} is not loaded")
        damage = self._engine.damage
        if damage is not None:  # a fresh error each time: raising one object grows its traceback
            raise ChunkIntegrityError(damage.message)
        s = self._settings_ls
        return parse_request(
            payload,
            self._caps,
            s.max_new_tokens_limit,
            s.default_max_new_tokens,
            prompt_limit=self._prompt_limit,
        )

    def _stream(
        self, request: Request, payload: InferenceRequest, arrived: float
    ) -> AsyncIterator[object]:
        limit = self._settings_ls.request_timeout_s
        deadline = Deadline.after(limit, "the request_timeout_s setting", arrived)
        if request.timeout_us is not None and request.timeout_us / 1e6 < limit:
            deadline = Deadline.after(
                request.timeout_us / 1e6, "the request's timeout parameter", arrived
            )
        return self._scheduler.stream(self._job(request), deadline, label=payload.id or "")

    def _job(self, request: Request):
        engine, caps = self._engine, self._caps

        def job(emit, stop_requested) -> FinalEvent:
            ids = request.input_ids
            if ids is None:
                ids = tokenize(engine.tokenizer, request.prompt)
                check_context(len(ids), request, caps)
            run = run_generation if request.mode == "tokens" else run_hidden_states
            return run(engine, request, ids, emit, stop_requested)

        return job

    def _finished(self, request_id: str | None, request: Request, final: FinalEvent) -> None:
        metrics.record(self.name, request.mode, final.finish_reason, final.stats)
        self._log_request(request_id, request, final)

    def _failed(
        self,
        payload: InferenceRequest,
        request: Request | None,
        exc: Exception,
        events: int,
        arrived: float,
    ) -> LayerStreamError:
        """The error the client gets for ``exc``; recorded in the metrics and the log."""
        if isinstance(exc, LayerStreamError):
            error = exc
        else:
            log.error("%s: request %r failed unexpectedly", self.name, payload.id, exc_info=exc)
            error = LayerStreamError(
                f"{type(exc).__name__}: {exc} (a bug or a broken model store; the server log "
                "has the traceback)"
            )
        mode = request.mode if request is not None else "unparsed"  # refused before a mode
        metrics.record_error(self.name, mode, error.kind)
        log.warning(
            # %r: an id refused for its characters (a newline, NUL) must not forge log lines
            "%s %s: request %r failed (%s) after %d events in %.3fs: %s",
            self.name,
            mode,
            payload.id or "(no id)",  # gRPC requests carry none unless the client sets one
            error.kind,
            events,
            time.monotonic() - arrived,
            error.message,
        )
        return error

    def _log_request(self, request_id: str | None, request: Request, final: FinalEvent) -> None:
        s = final.stats
        total, wait = s.get("total_us", 0), s.get("weight_wait_us", 0)
        log.info(
            "%s %s: %s, %d prompt + %d tokens in %.3fs (ttft %.3fs): compute %.3fs, weights "
            "waited %.3fs (%s); streamed %.1f MiB, cache %d hit / %d miss (request %s)",
            self.name,
            request.mode,
            final.finish_reason,
            s.get("prompt_tokens", 0),
            s.get("tokens", 0),
            total / 1e6,
            s.get("ttft_us", 0) / 1e6,
            s.get("compute_us", 0) / 1e6,
            wait / 1e6,
            bound(wait, total),
            s.get("bytes_streamed", 0) / 2**20,
            s.get("cache_hits", 0),
            s.get("cache_misses", 0),
            request_id,
        )


def bound(wait_us: int, total_us: int) -> str:
    """A word for the operator: waiting on weights for over half the time means the store
    (or the budget) sets the pace, not the CPU."""
    share = wait_us / total_us if total_us else 0.0
    return f"{share:.0%} waiting: " + ("I/O bound" if share > 0.5 else "compute bound")


def _route_logs_to_mlserver() -> None:
    """Send layerstream's records through MLServer's handlers (its format, its level).

    MLServer configures only its own "mlserver" logger; without this, the load summary and
    the per-request wait-vs-compute lines would stop at the root logger's WARNING level.
    """
    ours, server = logging.getLogger("layerstream"), logging.getLogger("mlserver")
    if ours.handlers or not server.handlers:
        return  # configured by the embedding application already, or not under MLServer
    for handler in server.handlers:
        ours.addHandler(handler)
    ours.setLevel(server.level or logging.INFO)
    ours.propagate = False


def _build_engine(settings: LayerStreamSettings, folder: Path | None) -> Engine:
    started = time.perf_counter()
    torch.set_num_threads(tuning.torch_threads(settings.torch_threads))
    store = open_store(settings.chunk_store, base_dir=folder, options=settings.store_options())
    options = EngineOptions(
        memory_budget=settings.memory_budget,
        read_ahead=settings.read_ahead,
        io_threads=settings.io_threads,
        verify_checksums=settings.verify_checksums,
        verify_in_background=settings.verify_in_background,
        reader=settings.reader,
    )
    try:
        engine = Engine(store, options)
    except BaseException:
        store.close()  # idempotent: the engine may have closed it already
        raise
    log.info("engine for %s ready in %.2fs", store.uri, time.perf_counter() - started)
    return engine
