"""The MLServer runtime: translates between V2 requests/responses and the engine.

Configure it in model-settings.json (``implementation: layerstream.LayerStreamRuntime``,
settings in ``parameters.extra``, see settings.py). Serve with ``mlserver start`` and a
settings.json that has ``parallel_workers: 0`` and ``gzip_enabled: false``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from mlserver import MLModel
from mlserver.types import InferenceRequest, InferenceResponse

from . import metrics, tuning
from .capabilities import capabilities
from .encoding import encode_event, encode_unary, error_response
from .engine import Engine, EngineOptions
from .errors import InvalidRequest, LayerStreamError
from .events import FinalEvent, HiddenStateEvent
from .generation import run_generation
from .hidden import run_hidden_states
from .protocol import Request, check_context, parse_request
from .scheduler import Scheduler
from .settings import LayerStreamSettings
from .stores import open_store

log = logging.getLogger(__name__)


def is_grpc(payload: InferenceRequest) -> bool:
    """MLServer puts HTTP headers or gRPC metadata into ``parameters.headers``; only gRPC
    metadata carries a ``grpc-`` user agent or lacks the HTTP ``host`` header."""
    headers = (payload.parameters.headers if payload.parameters else None) or {}
    agent = str(headers.get("user-agent", ""))
    return "grpc" in agent.lower() or ("host" not in headers and bool(headers))


class LayerStreamRuntime(MLModel):
    """Streams a chunked Hugging Face model's weights while it answers."""

    @property
    def ready(self) -> bool:
        """MLServer's readiness (set from load()), withdrawn once the engine has found a
        damaged chunk: an orchestrator then reschedules the model instead of sending it
        requests that would fail."""
        engine = getattr(self, "_engine", None)
        return self._ready and (engine is None or engine.damage is None)

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = value

    async def load(self) -> bool:
        _route_logs_to_mlserver()
        settings = LayerStreamSettings.from_extra(
            self.settings.parameters.extra if self.settings.parameters else None
        )
        folder = self._model_folder()
        # Building the engine reads chunks and builds the model: off the event loop, which
        # serves every other model and the health probes meanwhile.
        self._engine = await asyncio.to_thread(_build_engine, settings, folder)
        self._settings_ls = settings
        self._caps = capabilities(self._engine)
        self._scheduler = Scheduler(self.name, settings.max_queued_requests)
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
        grpc = is_grpc(payload)
        try:
            request = self._parse(payload)
            async for event in self._scheduler.stream(self._job(request)):
                if isinstance(event, FinalEvent):
                    metrics.record(self.name, request.mode, event.finish_reason, event.stats)
                    self._log_request(request, event)
                if isinstance(event, HiddenStateEvent):
                    # a [seq, hidden] tensor becomes a long list of floats: not on the loop
                    yield await asyncio.to_thread(
                        encode_event, self.name, self.version, payload.id, event
                    )
                else:
                    yield encode_event(self.name, self.version, payload.id, event)
        except LayerStreamError as exc:
            # Over gRPC the error becomes the call's status (INVALID_ARGUMENT for a bad
            # request); over SSE the 200 is already sent, so it becomes the last event.
            if grpc:
                raise
            log.warning("request %s failed: %s", payload.id, exc)
            yield error_response(self.name, self.version, payload.id, str(exc))

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        request = self._parse(payload)
        events = [event async for event in self._scheduler.stream(self._job(request))]
        final = events[-1]
        metrics.record(self.name, request.mode, final.finish_reason, final.stats)
        self._log_request(request, final)
        return encode_unary(self.name, self.version, payload.id, request, events)

    def _parse(self, payload: InferenceRequest) -> Request:
        if not self.ready:
            raise InvalidRequest(f"model {self.name} is not loaded")
        s = self._settings_ls
        return parse_request(payload, self._caps, s.max_new_tokens_limit, s.default_max_new_tokens)

    def _job(self, request: Request):
        engine, caps = self._engine, self._caps

        def job(emit, cancelled) -> FinalEvent:
            ids = request.input_ids
            if ids is None:
                ids = engine.tokenizer(request.prompt)["input_ids"]
                if not ids:
                    raise InvalidRequest("the prompt tokenizes to nothing")
            check_context(len(ids), request, caps)
            run = run_generation if request.mode == "tokens" else run_hidden_states
            return run(engine, request, ids, emit, cancelled)

        return job

    def _log_request(self, request: Request, final: FinalEvent) -> None:
        s = final.stats
        total, wait = s.get("total_us", 0), s.get("weight_wait_us", 0)
        log.info(
            "%s %s: %s, %d prompt + %d tokens in %.3fs (ttft %.3fs): compute %.3fs, weights "
            "waited %.3fs (%s); streamed %.1f MiB, cache %d hit / %d miss",
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
        reader=settings.reader,
    )
    try:
        engine = Engine(store, options)
    except BaseException:
        store.close()  # idempotent: the engine may have closed it already
        raise
    log.info("engine for %s ready in %.2fs", store.uri, time.perf_counter() - started)
    return engine
