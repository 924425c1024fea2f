"""Engine events -> V2 InferenceResponses (the same for REST SSE and gRPC).

The only place results become wire words: response parameters are ints and strings only
(gRPC drops floats and nested objects), and their names are the contract. Which outputs an
event carries: outputs.py.
"""

from __future__ import annotations

import numpy as np
from mlserver.types import InferenceResponse, Parameters, ResponseOutput

from ..errors import LayerStreamError
from ..inference.request import Request
from ..inference.types import (
    Event,
    FinalEvent,
    FinishReason,
    HiddenStateEvent,
    Mode,
    RequestStats,
    TokenEvent,
)
from .outputs import BY_NAME, ERROR_OUTPUT


def stats_parameters(stats: RequestStats) -> dict[str, int]:
    """A request's stats as response parameters, under their wire names."""
    return {
        "prompt_tokens": stats.prompt_tokens,
        "tokens": stats.tokens,
        "ttft_us": stats.ttft_us,
        "total_us": stats.total_us,
        "weight_wait_us": stats.weight_wait_us,
        "compute_us": stats.compute_us,
        "bytes_streamed": stats.bytes_streamed,
        "chunks_streamed": stats.chunks_streamed,
        # the names from before block runs were told apart by residency: the contract
        "cache_hits": stats.resident_runs,
        "cache_misses": stats.streamed_runs,
        "sweeps": stats.sweeps,
        "sweep_sequences": stats.sweep_sequences,
        "experts_routed": stats.experts_routed,
        "experts_read": stats.experts_read,
        "expert_bytes": stats.expert_bytes,
        "experts_predicted": stats.experts_predicted,
        "experts_predicted_used": stats.experts_predicted_used,
        "expert_cache_hits": stats.expert_cache_hits,
    }


def _final_parameters(final: FinalEvent) -> dict[str, int | str]:
    return {"finish_reason": final.finish_reason.value, **stats_parameters(final.stats)}


def _text(name: str, text: str) -> ResponseOutput:
    return ResponseOutput(
        name=name,
        shape=[1],
        datatype="BYTES",
        data=[text.encode("utf-8")],
        parameters=Parameters(content_type="str"),
    )


def _ids(name: str, ids: list[int]) -> ResponseOutput:
    return ResponseOutput(
        name=name,
        shape=[len(ids)],
        datatype="INT64",
        data=ids,
        parameters=Parameters(content_type="np"),
    )


def _floats(name: str, array: np.ndarray) -> ResponseOutput:
    # float32 always: gRPC cannot encode fp16 contents, and clients get one dtype to parse
    array = np.ascontiguousarray(array, dtype=np.float32)
    return ResponseOutput(
        name=name,
        shape=list(array.shape),
        datatype="FP32",
        data=array.reshape(-1).tolist(),
        parameters=Parameters(content_type="np"),
    )


def _response(
    model: str,
    version: str | None,
    request_id: str | None,
    outputs: list[ResponseOutput],
    **params: int | str,
) -> InferenceResponse:
    return InferenceResponse(
        model_name=model,
        model_version=version,
        id=request_id,
        outputs=outputs,
        parameters=Parameters(**params),
    )


def _empty(name: str) -> ResponseOutput:
    """A wanted output the final event has no more of: empty, of its datatype."""
    datatype = BY_NAME[name].datatype
    if datatype == "BYTES":
        return _text(name, "")
    if datatype == "INT64":
        return _ids(name, [])
    return _floats(name, np.zeros((0,), dtype=np.float32))


def _pick(
    available: list[ResponseOutput], wanted: tuple[str, ...] | None, final: bool
) -> list[ResponseOutput]:
    if wanted is None:
        return available
    by_name = {output.name: output for output in available}
    if final:
        return [by_name.get(name) or _empty(name) for name in wanted]
    return [by_name[name] for name in wanted if name in by_name]


def encode_event(
    model: str,
    version: str | None,
    request_id: str | None,
    event: Event,
    wanted: tuple[str, ...] | None = None,
) -> InferenceResponse | None:
    """The event's response, with the ``wanted`` outputs (None: its defaults). None where
    the event carries nothing wanted (a hidden-state event when only the embedding was
    asked for): it is not sent."""
    if isinstance(event, TokenEvent):
        available = [_text("text", event.text), _ids("token_id", [event.token_id])]
        return _response(model, version, request_id, _pick(available, wanted, final=False))
    if isinstance(event, HiddenStateEvent):
        if wanted is not None and "hidden_state" not in wanted:
            return None
        output = _floats("hidden_state", event.hidden_state)
        return _response(model, version, request_id, [output], layer=event.layer)
    if isinstance(event, FinalEvent):
        # Every event has an output a V2 client can decode, the final one too: MLServer's
        # own streaming example decodes outputs[0] of each (text, possibly empty).
        if event.embedding is None:
            available = [_text("text", event.text)]
        else:
            available = [_floats("embedding", event.embedding)]
        outputs = _pick(available, wanted, final=True)
        return _response(model, version, request_id, outputs, **_final_parameters(event))
    raise TypeError(f"unknown event {type(event).__name__}")


def error_response(
    model: str, version: str | None, request_id: str | None, error: LayerStreamError
) -> InferenceResponse:
    """The last event of a stream that failed: what failed (``error``, the message without
    the kind prefix ``str(exc)`` carries) and its kind (``error_type``), so a client can
    tell what to retry. Its one output, ``error``, holds ``"<kind>: <message>"``: a client
    that decodes ``outputs[0]`` of every event shows the error instead of crashing on an
    empty list."""
    return _response(
        model,
        version,
        request_id,
        [_text(ERROR_OUTPUT, str(error))],
        finish_reason=FinishReason.ERROR.value,
        error=error.message,
        error_type=error.kind,
    )


def encode_unary(
    model: str,
    version: str | None,
    request_id: str | None,
    request: Request,
    events: list[Event],
    wanted: tuple[str, ...] | None = None,
) -> InferenceResponse:
    """The whole answer in one response: full text and ids, or stacked hidden states."""
    final = events[-1]
    assert isinstance(final, FinalEvent)
    outputs: list[ResponseOutput] = []
    if request.mode is Mode.TOKENS:
        tokens = [e for e in events if isinstance(e, TokenEvent)]
        outputs.append(_text("text", "".join(e.text for e in tokens) + final.text))
        outputs.append(_ids("token_ids", [e.token_id for e in tokens]))
    else:
        # the states in the request's order and count (``[-1, 0]``: the last first)
        hidden = {e.layer: e.hidden_state for e in events if isinstance(e, HiddenStateEvent)}
        layers = request.layers or sorted(hidden)  # hidden.py sends every state asked for
        if layers:
            outputs.append(_floats("hidden_states", np.stack([hidden[k] for k in layers])))
        assert final.embedding is not None  # every hidden_states or embedding request has one
        outputs.append(_floats("embedding", final.embedding))
    params = _final_parameters(final)
    if request.mode is Mode.HIDDEN_STATES:
        params["layers"] = ",".join(map(str, layers))
    return _response(model, version, request_id, _pick(outputs, wanted, final=True), **params)
