"""The request contract: V2 inputs and parameters in, a validated request out.

Inputs: ``prompt`` (BYTES, one string) or ``input_ids`` (INT64, pre-tokenised); see
inputs.py. Parameters arrive as JSON values over REST but gRPC keeps only bool/int/string
(MLServer's InferParameter has no double field), so every numeric option is also accepted
as a string (``"temperature": "0.7"``). Unknown parameter names are errors: a typo must not
silently change the answer; so is a parameter that arrived without a value (a REST
``null``, or a gRPC ``double_param`` that MLServer's proto cannot read).

Ranges (each violation is an ``invalid_request`` error naming the parameter):

- every number is finite; integers fit int64 (what gRPC's int64_param carries and
  ``torch.manual_seed`` accepts);
- ``temperature``: 0 means greedy decoding (as OpenAI and vLLM read it), otherwise
  0.01..100 (below, the scaled logits overflow to inf/nan);
- ``repetition_penalty``: 0.01..100 (it divides or multiplies logits); ``top_p``: (0, 1];
  ``top_k``: >= 0 (0 = off); ``max_new_tokens``: 1..max_new_tokens_limit;
- ``stop``: at most 16 strings of 1..256 characters;
- ``timeout``: microseconds (as tritonclient sends it), >= 1; the request's deadline is the
  earlier of it and the ``request_timeout_s`` setting, counted from arrival.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlserver.types import InferenceRequest

from ..errors import InvalidRequest
from ..inference.prompts import PromptLimit
from .inputs import PROMPT, prompt_text, the_input, token_ids

MODES = ("tokens", "hidden_states", "embedding")
POOLINGS = ("mean", "cls", "last", "pooler")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
MIN_PENALTY, MAX_PENALTY = 0.01, 100.0
MAX_STOPS, MAX_STOP_CHARS = 16, 256


@dataclass(frozen=True)
class ModelCapabilities:
    modes: tuple[str, ...]
    default_mode: str
    vocab_size: int
    context_length: int | None
    num_layers: int  # hidden-state indexes run 0..num_layers
    has_pooler: bool = False
    has_tokenizer: bool = True


@dataclass
class Request:
    mode: str
    prompt: str | None = None
    input_ids: list[int] | None = None
    max_new_tokens: int = 64
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    do_sample: bool | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)  # normalised, ascending, 0..num_layers
    pooling: str = "mean"
    timeout_us: int | None = None  # the request's own deadline, microseconds from arrival


def _as_int(name: str, value: Any) -> int:
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        # Only where a float is exact: MLServer's JSON parser (orjson) turns an integer
        # beyond 64 bits into a float, and -(2**63)-1 would round to a valid -(2**63).
        number = int(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):  # also a string of more than 4300 digits
            number = int(value.strip())
    if number is None:
        raise InvalidRequest(f"parameter {name} must be an integer, got {_show(value)}")
    if not INT64_MIN <= number <= INT64_MAX:
        raise InvalidRequest(
            f"parameter {name} must fit in int64 ({INT64_MIN}..{INT64_MAX}), got {number}"
        )
    return number


def _as_float(name: str, value: Any) -> float:
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float's range
            number = math.inf
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value.strip())
    if number is None:
        raise InvalidRequest(f"parameter {name} must be a number, got {_show(value)}")
    if not math.isfinite(number):
        raise InvalidRequest(f"parameter {name} must be a finite number, got {_show(value)}")
    return number


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise InvalidRequest(f"parameter {name} must be true or false, got {_show(value)}")


def _as_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"parameter {name} must be a string, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_stop(name: str, value: Any) -> list[str]:
    if isinstance(value, str) and value.startswith("["):
        # gRPC parameters are scalars: a list of stop strings travels as a JSON string. Any
        # other string is a stop string, brackets and all ("[INST]").
        with contextlib.suppress(json.JSONDecodeError, RecursionError):
            listed = json.loads(value)
            if isinstance(listed, list) and all(isinstance(v, str) for v in listed):
                value = listed
    if isinstance(value, str):
        stops = [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        stops = list(value)
    else:
        raise InvalidRequest(
            f"parameter stop must be a string or a list of strings, got {_show(value)}"
        )
    if any(not s for s in stops):
        raise InvalidRequest("parameter stop must not contain empty strings")
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise InvalidRequest(
            f"parameter stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} "
            f"characters (got {len(stops)}, the longest {max(map(len, stops))})"
        )
    return stops


def parse_layers(value: Any, num_layers: int) -> list[int]:
    """``[0, -1]`` or ``"0,-1"`` -> normalised indexes into ``0..num_layers``."""
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
    elif isinstance(value, list):
        parts = value
    elif isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    else:
        raise InvalidRequest(f"parameter layers must be a list or '0,-1', got {_show(value)}")
    if not parts:
        raise InvalidRequest("parameter layers is empty")
    if len(parts) > 2 * (num_layers + 1):  # every index, negative and positive: no more
        raise InvalidRequest(
            f"parameter layers lists {len(parts)} indexes; this model has hidden states "
            f"0..{num_layers}"
        )
    out = set()
    for part in parts:
        index = _as_int("layers", part)
        if not -(num_layers + 1) <= index <= num_layers:
            raise InvalidRequest(
                f"layer {index} is out of range: this model has hidden states 0..{num_layers} "
                f"(negative indexes count from the end, -1 = {num_layers})"
            )
        out.add(index % (num_layers + 1))
    return sorted(out)


_SCALARS: dict[str, Callable[[str, Any], Any]] = {
    "max_new_tokens": _as_int,
    "top_k": _as_int,
    "seed": _as_int,
    "temperature": _as_float,
    "top_p": _as_float,
    "repetition_penalty": _as_float,
    "do_sample": _as_bool,
    "stop": _as_stop,
    "pooling": _as_str,
    "timeout": _as_int,
}
_FIELDS = {"timeout": "timeout_us"}  # parameter name -> Request field, where they differ
KNOWN_PARAMETERS = ("mode", *_SCALARS, "layers")
_GENERATION = ("max_new_tokens", "top_k", "seed", "temperature", "top_p", "repetition_penalty")
# The modes a parameter means something in: given for another mode it would be ignored,
# which a caller would read as honoured (mode and timeout apply to every mode).
APPLIES_TO = {
    **{name: ("tokens",) for name in (*_GENERATION, "do_sample", "stop")},
    "layers": ("hidden_states",),
    "pooling": ("hidden_states", "embedding"),
}
# MLServer copies a request's id into the response's headers (REST Ce-Id) and gRPC metadata:
# anything but printable ASCII there breaks the answer after the work is done.
MAX_ID_CHARS = 256


def request_parameters(payload: InferenceRequest) -> dict[str, Any]:
    """The caller's parameters: MLServer's own (``content_type``, ``headers``) are declared
    fields of its Parameters model; everything a caller sends is an extra field."""
    if payload.parameters is None:
        return {}
    params = dict(payload.parameters.model_extra or {})
    unknown = sorted(set(params) - set(KNOWN_PARAMETERS))
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
    return params


def check_request_id(request_id: str | None) -> None:
    """A request id must travel in HTTP headers and gRPC metadata: printable ASCII."""
    if not request_id:
        return
    printable = all(" " <= c <= "~" for c in request_id)
    if not printable or request_id != request_id.strip() or len(request_id) > MAX_ID_CHARS:
        raise InvalidRequest(
            f"request id {_show(request_id)} cannot be sent back in headers: use up to "
            f"{MAX_ID_CHARS} printable ASCII characters, no leading or trailing spaces"
        )


def parse_request(
    payload: InferenceRequest,
    caps: ModelCapabilities,
    max_new_tokens_limit: int,
    default_max_new_tokens: int,
    prompt_limit: PromptLimit | None = None,
) -> Request:
    check_request_id(payload.id)
    params = request_parameters(payload)
    mode = params.pop("mode", caps.default_mode)
    if mode not in MODES:
        raise InvalidRequest(f"mode {_show(mode)} is not one of {', '.join(MODES)}")
    if mode not in caps.modes:
        raise InvalidRequest(
            f"this model cannot do mode {mode!r}; it supports {', '.join(caps.modes)}"
        )
    stray = sorted(name for name in params if mode not in APPLIES_TO.get(name, MODES))
    if stray:
        raise InvalidRequest(
            f"parameter(s) {', '.join(map(repr, stray))} do not apply to mode {mode!r} ("
            + "; ".join(f"{n}: {', '.join(APPLIES_TO[n])}" for n in stray)
            + ")"
        )
    request = Request(mode=mode, max_new_tokens=min(default_max_new_tokens, max_new_tokens_limit))
    for name, convert in _SCALARS.items():
        if name in params:
            setattr(request, _FIELDS.get(name, name), convert(name, params.pop(name)))
    if "layers" in params:
        request.layers = parse_layers(params.pop("layers"), caps.num_layers)
    elif mode == "hidden_states":
        request.layers = list(range(caps.num_layers + 1))
    _check_ranges(request, caps, max_new_tokens_limit)
    _parse_input(payload, request, caps, prompt_limit)
    return request


def _parse_input(
    payload: InferenceRequest, request: Request, caps: ModelCapabilities, limit: PromptLimit | None
) -> None:
    item = the_input(payload)
    if item.name == PROMPT:
        if not caps.has_tokenizer:
            raise InvalidRequest("this model has no tokenizer; send 'input_ids' (INT64) instead")
        request.prompt = prompt_text(item, limit)
    else:
        request.input_ids = token_ids(item, caps.vocab_size, caps.context_length)
        check_context(len(request.input_ids), request, caps)


def _check_ranges(request: Request, caps: ModelCapabilities, limit: int) -> None:
    if request.mode == "tokens" and not 1 <= request.max_new_tokens <= limit:
        raise InvalidRequest(
            f"max_new_tokens must be between 1 and {limit}, got {request.max_new_tokens}"
        )
    if request.temperature == 0:
        if request.do_sample:
            raise InvalidRequest("temperature 0 means greedy decoding; it contradicts do_sample")
        request.temperature, request.do_sample = None, False
    elif request.temperature is not None and not (
        MIN_TEMPERATURE <= request.temperature <= MAX_TEMPERATURE
    ):
        raise InvalidRequest(
            f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE} and "
            f"{MAX_TEMPERATURE:g}, got {request.temperature}"
        )
    if request.top_p is not None and not 0 < request.top_p <= 1:
        raise InvalidRequest(f"top_p must be in (0, 1], got {request.top_p}")
    if request.top_k is not None and request.top_k < 0:
        raise InvalidRequest(f"top_k must be >= 0 (0 = off), got {request.top_k}")
    penalty = request.repetition_penalty
    if penalty is not None and not MIN_PENALTY <= penalty <= MAX_PENALTY:
        raise InvalidRequest(
            f"repetition_penalty must be between {MIN_PENALTY} and {MAX_PENALTY:g}, got {penalty}"
        )
    if request.timeout_us is not None and request.timeout_us < 1:
        raise InvalidRequest(
            f"timeout is in microseconds and must be >= 1, got {request.timeout_us}"
        )
    if request.pooling not in POOLINGS or (request.pooling == "pooler" and not caps.has_pooler):
        choices = [p for p in POOLINGS if p != "pooler" or caps.has_pooler]
        raise InvalidRequest(f"pooling {request.pooling!r} is not one of {', '.join(choices)}")


def check_context(n_prompt: int, request: Request, caps: ModelCapabilities) -> None:
    """A prompt (plus the tokens to generate) must fit the model's context."""
    if caps.context_length is None:
        return
    needed = n_prompt + (request.max_new_tokens if request.mode == "tokens" else 0)
    if needed > caps.context_length:
        extra = f" + max_new_tokens {request.max_new_tokens}" if request.mode == "tokens" else ""
        raise InvalidRequest(
            f"prompt of {n_prompt} tokens{extra} exceeds the model's context of "
            f"{caps.context_length} tokens; shorten the prompt or lower max_new_tokens"
        )
