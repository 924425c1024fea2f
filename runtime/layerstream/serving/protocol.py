"""The request contract: V2 inputs and parameters in, a validated request out.

Inputs: ``prompt`` (BYTES, one string), ``messages`` (BYTES, a chat as one JSON string) or
``input_ids`` (INT64, pre-tokenised); see inputs.py. Parameters and their ranges: see
parameters.py; outputs: outputs.py. Unknown parameter names are errors: a typo must not
silently change the answer; so is a parameter that arrived without a value (a REST
``null``, or a gRPC ``double_param`` that MLServer's proto cannot read).

Everything here runs on the event loop and looks at the request only: the prompt is
tokenized, and checked against the context, on the worker thread (inference/run.py), a
chat too (rendered with the model's template there).
"""

from __future__ import annotations

from typing import Any

from mlserver.types import InferenceRequest

from ..errors import InvalidRequest
from ..inference.prompts import PromptLimit
from ..inference.request import ModelCapabilities, Request, check_context
from ..inference.types import Mode, Pooling
from .inputs import MESSAGES, PROMPT, chat_messages, prompt_text, the_input, token_ids
from .parameters import (
    KNOWN_PARAMETERS,
    TRANSPORT_PARAMETERS,
    as_pooling,
    check_applicable,
    check_ranges,
    convert_scalars,
    drop_transport,
    parse_layers,
    show,
)

# MLServer copies a request's id into the response's headers (REST Ce-Id) and gRPC metadata:
# anything but printable ASCII there breaks the answer after the work is done.
MAX_ID_CHARS = 256


def request_parameters(payload: InferenceRequest) -> dict[str, Any]:
    """The caller's parameters: MLServer's own (``content_type``, ``headers``) are declared
    fields of its Parameters model; everything a caller sends is an extra field."""
    if payload.parameters is None:
        return {}
    params = dict(payload.parameters.model_extra or {})
    unknown = sorted(set(params) - set(KNOWN_PARAMETERS) - set(TRANSPORT_PARAMETERS))
    if unknown:
        raise InvalidRequest(
            f"unknown parameter(s) {', '.join(map(repr, unknown))}; known: "
            f"{', '.join(KNOWN_PARAMETERS)}"
        )
    empty = sorted(name for name, value in params.items() if value is None)
    if empty:
        raise InvalidRequest(
            f"parameter(s) {', '.join(map(repr, empty))} arrived without a value (a REST "
            "null, or a gRPC InferParameter MLServer cannot read: it has no double_param); "
            "give a value, and "
            'over gRPC send numbers as int64_param or as strings (string_param "0.7")'
        )
    drop_transport(params)
    return params


def check_request_id(request_id: str | None) -> None:
    """A request id must travel in HTTP headers and gRPC metadata: printable ASCII."""
    if not request_id:
        return
    printable = all(" " <= c <= "~" for c in request_id)
    if not printable or request_id != request_id.strip() or len(request_id) > MAX_ID_CHARS:
        raise InvalidRequest(
            f"request id {show(request_id)} cannot be sent back in headers: use up to "
            f"{MAX_ID_CHARS} printable ASCII characters, no leading or trailing spaces"
        )


def _mode(params: dict[str, Any], caps: ModelCapabilities) -> Mode:
    mode = params.pop("mode", caps.default_mode)
    if mode not in tuple(Mode):
        raise InvalidRequest(f"mode {show(mode)} is not one of {', '.join(Mode)}")
    mode = Mode(mode)
    if mode not in caps.modes:
        why = ""
        if mode == Mode.HIDDEN_STATES and caps.hidden_states_unavailable is not None:
            why = f" ({caps.hidden_states_unavailable})"
        raise InvalidRequest(
            f"this model cannot do mode {mode.value!r}{why}; it supports {', '.join(caps.modes)}"
        )
    return mode


def parse_request(
    payload: InferenceRequest,
    caps: ModelCapabilities,
    max_new_tokens_limit: int,
    default_max_new_tokens: int,
    prompt_limit: PromptLimit | None = None,
) -> Request:
    check_request_id(payload.id)
    params = request_parameters(payload)
    mode = _mode(params, caps)
    check_applicable(params, mode)
    fields = convert_scalars(params)
    sent = "max_new_tokens" in fields
    fields.setdefault("max_new_tokens", min(default_max_new_tokens, max_new_tokens_limit))
    pooling = fields.pop("pooling", Pooling.MEAN)  # checked after the ranges
    request = Request(mode=mode, max_new_tokens_sent=sent, **fields)
    if "layers" in params:
        request.layers = parse_layers(params.pop("layers"), caps.num_layers)
    elif mode is Mode.HIDDEN_STATES:
        request.layers = list(range(caps.num_layers + 1))
    check_ranges(request, max_new_tokens_limit)
    request.pooling = as_pooling(pooling, caps)
    _parse_input(payload, request, caps, prompt_limit)
    return request


def _parse_input(
    payload: InferenceRequest, request: Request, caps: ModelCapabilities, limit: PromptLimit | None
) -> None:
    item = the_input(payload)
    if item.name in (PROMPT, MESSAGES) and not caps.has_tokenizer:
        raise InvalidRequest("this model has no tokenizer; send 'input_ids' (INT64) instead")
    if item.name == PROMPT:
        request.prompt = prompt_text(item, limit)
    elif item.name == MESSAGES:
        if not caps.has_chat_template:
            raise InvalidRequest(
                "this model's tokenizer has no chat template, so 'messages' cannot be "
                "rendered; send 'prompt' with the text formatted as the model expects"
            )
        request.messages = chat_messages(item, limit)
    else:
        request.input_ids = token_ids(item, caps.vocab_size, caps.context_length)
        # now, on the event loop: ids that cannot fit never wait in the queue
        check_context(len(request.input_ids), request, caps)
