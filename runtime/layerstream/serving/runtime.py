"""The MLServer runtime: translates between V2 requests/responses and the engine.

Configure it in model-settings.json (``implementation: layerstream.LayerStreamRuntime``,
settings in ``parameters.extra``, see settings.py). Serve with ``mlserver start`` and a
settings.json that has ``parallel_workers: 0`` and ``gzip_enabled: false``.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import functools
import gc
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from mlserver import MLModel
from mlserver.settings import ModelSettings
from mlserver.types import InferenceRequest, InferenceResponse, MetadataModelResponse

from ..engine import tuning
from ..engine.engine import Engine, EngineOptions
from ..errors import ChunkIntegrityError, InvalidRequest, LayerStreamError
from ..inference.capabilities import capabilities
from ..inference.kv import (
    describe,
    kv_bytes_per_token,
    request_kv_bytes,
    request_output_bytes,
    resolve_kv_budget,
)
from ..inference.prompts import NO_CONTEXT_LIMIT, chat_overhead, prompt_byte_limit
from ..inference.request import Extras, ModelCapabilities, Request
from ..inference.run import prompt_ids, run
from ..inference.types import Cancelled, Emit, Event, FinalEvent, HiddenStateEvent
from ..stores import open_store
from ..units import format_size
from . import grpc_status, loaded, shutdown, workers
from .accounting import UNPARSED, RequestRecord
from .encoding import encode_event, encode_unary, error_response
from .metadata import model_metadata
from .metrics import ModelMetrics
from .openai import OpenAIRoutes
from .outputs import STREAM, UNARY, requested_outputs
from .protocol import parse_request
from .scheduler import Deadline, Scheduler
from .settings import LayerStreamSettings
from .transport import Transport, asked_before_a_request, transport_of

log = logging.getLogger(__name__)


class LayerStreamRuntime(OpenAIRoutes, MLModel):
    """Streams a chunked Hugging Face model's weights while it answers."""

    def __init__(self, settings: ModelSettings):
        # here, not in load(): MLServer's parallel workers never call this object's load()
        workers.refuse_parallel_workers(settings)
        # set by load(); None until then, and where load() failed part way (unload closes
        # what there is). MLServer's __init__ sets ``ready``, which reads the engine.
        self._engine: Engine | None = None
        self._caps: ModelCapabilities | None = None
        self._scheduler: Scheduler | None = None
        super().__init__(settings)
        self._metrics = ModelMetrics(self.name, self.version)

    @property
    def ready(self) -> bool:
        """MLServer's readiness (set from load()), withdrawn once the engine has found a
        damaged chunk: an orchestrator then reschedules the model instead of sending it
        requests that would fail.

        Withdrawn from the probes only: MLServer asks the same property before each request
        and would refuse it with "not ready yet", which cuts an SSE stream (its 200 is sent)
        and names no chunk. Requests go on to ``_parse``, which answers them with the
        integrity error that names the chunk and the fix."""
        engine = self._engine
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
        shutdown.bound_shutdown()
        settings = LayerStreamSettings.from_extra(
            self.settings.parameters.extra if self.settings.parameters else None
        )
        folder = self._model_folder()
        # Building the engine reads chunks and builds the model: off the event loop, which
        # serves every other model and the health probes meanwhile.
        self._engine = await asyncio.to_thread(_build_engine, settings, folder)
        # ``self.settings`` is MLServer's ModelSettings; these are layerstream's, from its extras
        self._options = settings
        # capabilities run the model once on the meta device, the limit scans the vocabulary
        self._caps = await asyncio.to_thread(capabilities, self._engine)
        self._prompt_limit = await asyncio.to_thread(
            prompt_byte_limit,
            self._engine.tokenizer,
            self._caps.context_length,
            settings.max_prompt_bytes,
        )
        engine = self._engine
        self._chat_overhead = (
            await asyncio.to_thread(chat_overhead, engine.tokenizer)
            if self._caps.has_chat_template
            else 0
        )
        self._kv_per_token = kv_bytes_per_token(
            engine.config, len(engine.prefixes), engine.manifest.dtype
        )
        self._kv_budget = resolve_kv_budget(
            settings.kv_cache_budget,
            self._kv_per_token,
            settings.max_active_sequences,
            self._caps.context_length,
        )
        name = self.name
        max_active = settings.max_active_sequences
        if engine.sequential_only is not None and max_active > 1:
            log.warning(
                "%s: serving one request at a time, not %d: %s",
                name,
                max_active,
                engine.sequential_only,
            )
            max_active = 1
        self._metrics.declare()
        self._metrics.watch_pinning(lambda: engine.pinned_bytes)
        engine.sweeps.on_sweep = self._metrics.record_sweep
        self._scheduler = Scheduler(
            name,
            settings.max_queued_requests,
            max_active,
            self._kv_budget,
            on_queue_change=self._metrics.set_queued,
            on_active_change=self._metrics.set_active,
        )
        log.info(
            "%s: up to %d requests at once, KV cache budget %s, %d compute slot(s)",
            name,
            max_active,
            describe(self._kv_budget, self._kv_per_token),
            engine.sweeps.slots.count,
        )
        loaded.register(self)
        _settle_heap()
        return True

    async def metadata(self) -> MetadataModelResponse:
        if self._engine is None:  # not loaded (or failed to): what model-settings.json says
            return await super().metadata()
        manifest = self._engine.manifest
        return model_metadata(
            self.name,
            self.settings.versions,
            self.settings.platform or "layerstream",
            self._caps,
            manifest.dtype,
            manifest.architecture,
            self._options.max_new_tokens_limit,
            self._prompt_limit.max_bytes if self._prompt_limit is not None else None,
            manifest.quantization.describe() if manifest.quantization is not None else None,
            self._engine.pinned_bytes,
        )

    def _model_folder(self) -> Path | None:
        source = getattr(self.settings, "_source", None)
        return Path(source).parent if source else None

    async def unload(self) -> bool:
        loaded.unregister(self)
        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.close)
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if not loaded.is_loaded(self.name, self.version):  # not a reload's old instance
            self._metrics.forget()
        _settle_heap(release=True)
        return True

    async def predict_stream(
        self, payloads: AsyncIterator[InferenceRequest]
    ) -> AsyncIterator[InferenceResponse]:
        # One request in, a stream out; don't wait for the client to half-close the stream.
        payload = await payloads.__anext__()
        record = RequestRecord(self.name, self._metrics, payload.id)
        transport = transport_of(payloads)
        # A gRPC stream may carry more requests; one sent while this one is served is
        # refused when it ends (it was dropped without a word, the call ending OK).
        another = asyncio.ensure_future(_next_payload(payloads))
        try:
            async for response in self._stream_one(payload, record, transport):
                yield response
            await asyncio.sleep(0)  # a request already received is seen now
            if another.done() and another.result() is not None:
                raise InvalidRequest(
                    "a ModelStreamInfer stream carries one request, answered as a stream: "
                    f"the one after {payload.id or 'the first'} was not served; open a "
                    "stream per request"
                )
        finally:
            another.cancel()

    async def _stream_one(
        self, payload: InferenceRequest, record: RequestRecord, transport: Transport
    ) -> AsyncIterator[InferenceResponse]:
        try:
            with record.failures():
                # closed here, not when garbage collected: closing flags the engine at once
                events = self._events(payload, record, STREAM)
                async with contextlib.aclosing(events) as events:
                    async for event in events:
                        response = await self._encode(payload.id, event, record.outputs)
                        if response is not None:
                            yield response
                        record.events += 1
        except (asyncio.CancelledError, GeneratorExit):
            # MLServer cancels or closes this generator when the client disconnects; the
            # scheduler has flagged the request, the engine stops at its next block.
            log.info(
                "%s: request %s: the client left after %d events",
                self.name,
                payload.id or "(no id)",  # gRPC requests carry none unless the client sets one
                record.events,
            )
            raise
        # Every failure ends the stream with its kind, never a cut: an unexpected exception
        # too (as kind "internal", its traceback logged).
        except LayerStreamError as error:
            if transport is Transport.GRPC:
                # The call's status: INVALID_ARGUMENT, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED,
                # UNAVAILABLE or INTERNAL (grpc_status.py), the details "<kind>: <message>".
                raise
            # SSE (or a caller we do not know): the 200 is sent, so the error is the last event
            yield error_response(self.name, self.version, payload.id, error)

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        # MLServer answers a failure with {"error": "<kind>: <message>"} and its status
        record = RequestRecord(self.name, self._metrics, payload.id)
        events: list[Event] = []
        with record.failures():
            async with contextlib.aclosing(self._events(payload, record, UNARY)) as stream:
                async for event in stream:
                    events.append(event)
                    record.events += 1
            assert record.request is not None
            return encode_unary(
                self.name, self.version, payload.id, record.request, events, record.outputs
            )

    async def events(
        self, payload: InferenceRequest, extras: Extras | None = None
    ) -> AsyncIterator[Event]:
        """The engine events of one V2 request, accounted for like any other (metrics, the
        log line): what the OpenAI endpoints serve, with what an OpenAI request asks beyond
        V2 parameters (``extras``: log probabilities, a grammar, tools). A failure raises the
        LayerStreamError the client gets (its ``kind`` and ``message``)."""
        record = RequestRecord(self.name, self._metrics, payload.id)
        with record.failures():
            events = self._events(payload, record, STREAM, extras)
            async with contextlib.aclosing(events) as stream:
                async for event in stream:
                    yield event
                    record.events += 1

    def max_in_flight(self) -> int:
        """How many of its requests the model runs at once (max_active_sequences, or 1)."""
        return self._scheduler.max_active if self._scheduler is not None else 1

    def token_text(self, token_id: int) -> str:
        """One token's own text, special tokens spelled out (U+FFFD where its bytes are part
        of a character)."""
        engine = self._engine
        if engine is None or engine.tokenizer is None:
            return ""
        return engine.tokenizer.decode([token_id])

    def caps(self) -> ModelCapabilities:
        """What the loaded model can do (modes, sizes); InvalidRequest before load. A method:
        MLServer reads every attribute of a model (inspect.getmembers) while loading it."""
        if self._caps is None:
            raise InvalidRequest(f"model {self.name} is not loaded")
        return self._caps

    async def token_ids(self, payload: InferenceRequest) -> list[int]:
        """The ids the prompt or chat of ``payload`` becomes, checked as the same request
        would be (its size, before anything tokenizes it), without running it."""
        request = self._parse(payload)
        return await asyncio.to_thread(prompt_ids, self._engine, request)

    async def detokenize(self, ids: list[int]) -> str:
        """The text of ``ids`` (at most the model's context of them); InvalidRequest for an
        id outside the vocabulary."""
        engine, caps = self._engine, self.caps()
        if engine is None or engine.tokenizer is None:
            raise InvalidRequest(f"model {self.name} has no tokenizer")
        most = caps.context_length or NO_CONTEXT_LIMIT
        if len(ids) > most:
            raise InvalidRequest(f"{len(ids)} token ids are more than the model's {most}")
        last = caps.vocab_size - 1
        wrong = next((i for i in ids if not 0 <= i <= last), None)
        if wrong is not None:
            raise InvalidRequest(f"token id {wrong} is outside the vocabulary (0..{last})")
        return await asyncio.to_thread(engine.tokenizer.decode, ids)

    def count_refused(self, error_type: str) -> None:
        """A request refused before it became a V2 request (an OpenAI body this server
        cannot honour): counted in the metrics like every other refusal."""
        self._metrics.record_error(UNPARSED, error_type)

    async def _encode(
        self, request_id: str | None, event: Event, wanted: tuple[str, ...] | None
    ) -> InferenceResponse | None:
        encode = functools.partial(encode_event, self.name, self.version, request_id, event, wanted)
        if isinstance(event, HiddenStateEvent):
            if wanted is not None and "hidden_state" not in wanted:
                return None  # not asked for: nothing to encode
            # a [seq, hidden] tensor becomes a long list of floats: off the loop
            return await asyncio.to_thread(encode)
        return encode()

    async def _events(
        self,
        payload: InferenceRequest,
        record: RequestRecord,
        call: str,
        extras: Extras | None = None,
    ) -> AsyncIterator[Event]:
        """The one path of every request: parse, queue, run; the final event is recorded
        (metrics, log) as it passes. ``call``: outputs.STREAM or UNARY (which outputs the
        request may ask for)."""
        engine = self._engine
        if engine is not None and engine.damage is not None:
            # the store may have been repaired since (hashing is I/O: off the event loop)
            await asyncio.to_thread(engine.recheck_damage)
        request = record.request = self._parse(payload)
        if extras is not None:
            extras.apply(request)
        record.outputs = requested_outputs(payload, request.mode, call)
        async with contextlib.aclosing(self._stream(request, payload, record.arrived)) as events:
            async for event in events:
                if isinstance(event, FinalEvent):
                    record.finished(event)
                yield event

    def _parse(self, payload: InferenceRequest) -> Request:
        engine = self._engine
        if not self._ready or engine is None:  # not loaded yet, or unloaded
            raise InvalidRequest(f"model {self.name} is not loaded")
        damage = engine.damage
        if damage is not None:  # a fresh error each time: raising one object grows its traceback
            raise ChunkIntegrityError(damage.message)
        s = self._options
        return parse_request(
            payload,
            self._caps,
            s.max_new_tokens_limit,
            s.default_max_new_tokens,
            prompt_limit=self._prompt_limit,
        )

    def _stream(
        self, request: Request, payload: InferenceRequest, arrived: float
    ) -> AsyncIterator[Event]:
        limit = self._options.request_timeout_s
        deadline = Deadline.after(limit, "the request_timeout_s setting", arrived)
        if request.timeout_us is not None and request.timeout_us / 1e6 < limit:
            deadline = Deadline.after(
                request.timeout_us / 1e6, "the request's timeout parameter", arrived
            )
        engine, caps = self._engine, self._caps
        kv = request_kv_bytes(request, self._kv_per_token, caps.context_length, self._chat_overhead)
        # hidden states are held until the client has read them: they count as its KV does
        out = request_output_bytes(
            request, caps.hidden_size, caps.context_length, self._chat_overhead
        )
        if kv + out > self._kv_budget:
            held = f"{describe(kv, self._kv_per_token)} of KV cache" + (
                f" and {format_size(out)} of hidden states" if out else ""
            )
            raise InvalidRequest(
                f"this request may hold {held}, more than the model's kv_cache_budget of "
                f"{describe(self._kv_budget, self._kv_per_token)}; lower max_new_tokens, ask "
                "for fewer layers or shorten the prompt"
            )

        def job(emit: Emit, cancelled: Cancelled) -> FinalEvent:
            return run(engine, request, caps, emit, cancelled)

        return self._scheduler.stream(job, deadline, label=payload.id or "", kv_bytes=kv + out)


def _settle_heap(release: bool = False) -> None:
    """Move what is loaded (model skeletons, modules, tokenizers, MLServer itself) out of the
    garbage collector's walks: a full collection otherwise walks all of it, which took up to
    229 ms with a 1 GB Llama loaded, during which no thread runs and the server answers
    nothing, not even its readiness probe. ``release``: a model was unloaded, so its frozen
    objects are handed back to the collector first (cycles among them would never be
    freed otherwise)."""
    if release:
        gc.unfreeze()
    gc.collect()
    gc.freeze()


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
        expert_streaming=settings.expert_streaming,
        expert_prefetch=settings.expert_prefetch,
        expert_cache_in_place=settings.expert_cache_in_place,
        pin_in_background=settings.pin_in_background,
    )
    try:
        engine = Engine(store, options)
    except BaseException:
        store.close()  # idempotent: the engine may have closed it already
        raise
    log.info("engine for %s ready in %.2fs", store.uri, time.perf_counter() - started)
    return engine


async def _next_payload(payloads: AsyncIterator[InferenceRequest]) -> InferenceRequest | None:
    """The stream's next request, or None once the client has closed its side (or the call
    has failed: a client gone after its answer is no second request)."""
    try:
        return await payloads.__anext__()
    except Exception:  # StopAsyncIteration among them
        return None
