"""Request parameters: which exist, what each converts to, and their ranges.

Parameters arrive as JSON values over REST but gRPC keeps only bool/int/string (MLServer's
InferParameter has no double field), so every numeric option is also accepted as a string
(``"temperature": "0.7"``).

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

Transport parameters (``binary_data_output``, from the binary tensor extension that
tritonclient adds when a request names no outputs) choose an encoding, not an answer: they
are accepted (a boolean) and the answer is JSON, which tritonclient reads as well (MLServer
has no binary encoding).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from typing import Any

from ..errors import InvalidRequest
from ..inference.request import ModelCapabilities, Request
from ..inference.types import Mode, Pooling

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
MIN_PENALTY, MAX_PENALTY = 0.01, 100.0
MAX_STOPS, MAX_STOP_CHARS = 16, 256


def show(value: Any) -> str:
    """A caller's value in an error message, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
    if number is None and isinstance(value, float) and math.isfinite(value) and abs(value) >= 2**63:
        # MLServer's JSON parser (orjson) hands over an integer beyond 64 bits as a float
        raise InvalidRequest(
            f"parameter {name} must fit in int64 ({INT64_MIN}..{INT64_MAX}), got about {value:.3g}"
        )
    if number is None:
        raise InvalidRequest(f"parameter {name} must be an integer, got {show(value)}")
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
        raise InvalidRequest(f"parameter {name} must be a number, got {show(value)}")
    if not math.isfinite(number):
        raise InvalidRequest(f"parameter {name} must be a finite number, got {show(value)}")
    return number


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise InvalidRequest(f"parameter {name} must be true or false, got {show(value)}")


def _as_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"parameter {name} must be a string, got {show(value)}")
    return value


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
            f"parameter stop must be a string or a list of strings, got {show(value)}"
        )
    if any(not s for s in stops):
        raise InvalidRequest("parameter stop must not contain empty strings")
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise InvalidRequest(
            f"parameter stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} "
            f"characters (got {len(stops)}, the longest {max(map(len, stops))})"
        )
    for stop in stops:
        try:  # a lone surrogate (which JSON can spell) is not text, and no output holds one
            stop.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest(
                f"parameter stop holds text that is not UTF-8: {show(stop)}"
            ) from None
    return stops


def parse_layers(value: Any, num_layers: int) -> list[int]:
    """``[0, -1]`` or ``"0,-1"`` -> normalised indexes into ``0..num_layers``, in the
    request's order and count (a unary answer stacks them so; a stream sends each state
    once, in index order, as it is computed)."""
    if isinstance(value, str):
        parts = value.replace(" ", "").split(",")
        if "" in parts and value.strip():
            raise InvalidRequest(f"parameter layers has an empty entry: {show(value)}")
        parts = [p for p in parts if p]
    elif isinstance(value, list):
        parts = value
    elif isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    else:
        raise InvalidRequest(f"parameter layers must be a list or '0,-1', got {show(value)}")
    if not parts:
        raise InvalidRequest("parameter layers is empty")
    if len(parts) > 2 * (num_layers + 1):  # every index, negative and positive: no more
        raise InvalidRequest(
            f"parameter layers lists {len(parts)} indexes; this model has hidden states "
            f"0..{num_layers}"
        )
    out = []
    for part in parts:
        index = _as_int("layers", part)
        if not -(num_layers + 1) <= index <= num_layers:
            raise InvalidRequest(
                f"layer {index} is out of range: this model has hidden states 0..{num_layers} "
                f"(negative indexes count from the end, -1 = {num_layers})"
            )
        out.append(index % (num_layers + 1))
    return out


# Every parameter but mode and layers (which need the model): its converter, in the order
# they are read (the first bad one is the error).
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
TRANSPORT_PARAMETERS = ("binary_data_output",)
_GENERATION = ("max_new_tokens", "top_k", "seed", "temperature", "top_p", "repetition_penalty")
# The modes a parameter means something in: given for another mode it would be ignored,
# which a caller would read as honoured (mode and timeout apply to every mode).
APPLIES_TO: dict[str, tuple[Mode, ...]] = {
    **{name: (Mode.TOKENS,) for name in (*_GENERATION, "do_sample", "stop")},
    "layers": (Mode.HIDDEN_STATES,),
    "pooling": (Mode.HIDDEN_STATES, Mode.EMBEDDING),
}


def drop_transport(params: dict[str, Any]) -> None:
    """Check and remove the transport parameters: they do not change the answer."""
    for name in TRANSPORT_PARAMETERS:
        if name in params:
            _as_bool(name, params.pop(name))


def check_applicable(params: dict[str, Any], mode: Mode) -> None:
    """Parameters of another mode are refused, not ignored."""
    stray = sorted(name for name in params if mode not in APPLIES_TO.get(name, tuple(Mode)))
    if stray:
        raise InvalidRequest(
            f"parameter(s) {', '.join(map(repr, stray))} do not apply to mode {mode.value!r} ("
            + "; ".join(f"{n}: {', '.join(APPLIES_TO[n])}" for n in stray)
            + ")"
        )


def convert_scalars(params: dict[str, Any]) -> dict[str, Any]:
    """The scalar parameters, converted, keyed by the ``Request`` field they set (popped
    from ``params``)."""
    return {
        _FIELDS.get(name, name): convert(name, params.pop(name))
        for name, convert in _SCALARS.items()
        if name in params
    }


def check_ranges(request: Request, limit: int) -> None:
    """The ranges of the module docstring; temperature 0 becomes greedy decoding."""
    if request.mode is Mode.TOKENS and not 1 <= request.max_new_tokens <= limit:
        raise InvalidRequest(
            f"max_new_tokens must be between 1 and {limit}, got {request.max_new_tokens}"
        )
    if request.do_sample is False:
        ignored = [
            f"{name} {value}"
            for name, value, asks in (
                ("temperature", request.temperature, request.temperature not in (None, 0)),
                ("top_p", request.top_p, request.top_p is not None and request.top_p < 1),
                ("top_k", request.top_k, request.top_k is not None and request.top_k > 0),
            )
            if asks
        ]
        if ignored:
            raise InvalidRequest(
                f"do_sample false decodes greedily, which would ignore {', '.join(ignored)}: "
                "drop them, or set do_sample true to sample with them"
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


def as_pooling(value: str, caps: ModelCapabilities) -> Pooling:
    """A pooling the model can do (``pooler`` only where it has a pooler head)."""
    if value in tuple(Pooling) and (value != Pooling.POOLER or caps.has_pooler):
        return Pooling(value)
    choices = [p.value for p in Pooling if p is not Pooling.POOLER or caps.has_pooler]
    raise InvalidRequest(f"pooling {value!r} is not one of {', '.join(choices)}")
