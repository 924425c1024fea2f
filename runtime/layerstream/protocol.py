"""The request contract: V2 inputs and parameters in, a validated request out.

Inputs: ``prompt`` (BYTES, one string) or ``input_ids`` (INT64, pre-tokenised).
Parameters arrive as JSON values over REST but gRPC keeps only bool/int/string (floats are
dropped), so every numeric option is also accepted as a string (``"temperature": "0.7"``).
Unknown parameter names are errors: a typo must not silently change the answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mlserver.codecs import StringCodec
from mlserver.types import InferenceRequest

from .errors import InvalidRequest

MODES = ("tokens", "hidden_states", "embedding")
POOLINGS = ("mean", "cls", "last", "pooler")
# Set by MLServer itself on every request, never by the caller.
_TRANSPORT_KEYS = {"content_type", "headers"}


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


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise InvalidRequest(f"parameter {name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise InvalidRequest(f"parameter {name} must be an integer, got {value!r}")


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise InvalidRequest(f"parameter {name} must be a number, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise InvalidRequest(f"parameter {name} must be a number, got {value!r}")


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise InvalidRequest(f"parameter {name} must be true or false, got {value!r}")


def _as_stop(value: Any) -> list[str]:
    if isinstance(value, str) and value.startswith("["):
        # gRPC parameters are scalars: a list of stop strings travels as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(
                f"parameter stop looks like a JSON list but is not ({exc})"
            ) from exc
    if isinstance(value, str):
        stops = [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        stops = list(value)
    else:
        raise InvalidRequest(f"parameter stop must be a string or a list of strings, got {value!r}")
    if any(not s for s in stops):
        raise InvalidRequest("parameter stop must not contain empty strings")
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
        raise InvalidRequest(f"parameter layers must be a list or '0,-1', got {value!r}")
    if not parts:
        raise InvalidRequest("parameter layers is empty")
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


_NUMERIC = {
    "max_new_tokens": _as_int,
    "top_k": _as_int,
    "seed": _as_int,
    "temperature": _as_float,
    "top_p": _as_float,
    "repetition_penalty": _as_float,
    "do_sample": _as_bool,
}
KNOWN_PARAMETERS = ("mode", *_NUMERIC, "stop", "layers", "pooling")


def _parse_input(
    payload: InferenceRequest, caps: ModelCapabilities
) -> tuple[str | None, list[int] | None]:
    if len(payload.inputs) != 1:
        names = [i.name for i in payload.inputs]
        raise InvalidRequest(f"send exactly one input, 'prompt' or 'input_ids' (got {names})")
    item = payload.inputs[0]
    if item.name == "prompt":
        if item.datatype != "BYTES":
            raise InvalidRequest(f"input 'prompt' must have datatype BYTES, not {item.datatype}")
        if not caps.has_tokenizer:
            raise InvalidRequest("this model has no tokenizer; send 'input_ids' (INT64) instead")
        texts = StringCodec.decode_input(item)
        if len(texts) != 1:
            raise InvalidRequest(f"input 'prompt' must hold one string, not {len(texts)}")
        if not texts[0].strip():
            raise InvalidRequest("input 'prompt' is empty")
        return texts[0], None
    if item.name == "input_ids":
        if item.datatype not in ("INT64", "INT32"):
            raise InvalidRequest(f"input 'input_ids' must have datatype INT64, not {item.datatype}")
        if len(item.shape) > 2 or (len(item.shape) == 2 and item.shape[0] != 1):
            raise InvalidRequest(
                f"input 'input_ids' must have shape [n] or [1, n], not {item.shape}"
            )
        ids = list(item.data.root if hasattr(item.data, "root") else item.data)
        if len(item.shape) == 2 and len(ids) == 1 and isinstance(ids[0], list):
            ids = ids[0]  # V2 JSON allows nested data: [[1, 2, 3]] for shape [1, 3]
        ids = [_flatten_one(v) for v in ids]
        if not ids:
            raise InvalidRequest("input 'input_ids' is empty")
        bad = [i for i in ids if not 0 <= i < caps.vocab_size]
        if bad:
            raise InvalidRequest(
                f"input_ids {bad[:5]} are outside the vocabulary 0..{caps.vocab_size - 1}"
            )
        return None, ids
    raise InvalidRequest(
        f"unknown input {item.name!r}; send 'prompt' (BYTES) or 'input_ids' (INT64)"
    )


def _flatten_one(value: Any) -> int:
    if isinstance(value, list):
        raise InvalidRequest("input 'input_ids' must hold one sequence")
    return _as_int("input_ids", value)


def parse_request(
    payload: InferenceRequest,
    caps: ModelCapabilities,
    max_new_tokens_limit: int,
    default_max_new_tokens: int,
) -> Request:
    params = payload.parameters.model_dump(exclude_none=True) if payload.parameters else {}
    for key in _TRANSPORT_KEYS:
        params.pop(key, None)
    unknown = sorted(set(params) - set(KNOWN_PARAMETERS))
    if unknown:
        raise InvalidRequest(
            f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(KNOWN_PARAMETERS)}"
        )
    mode = params.pop("mode", caps.default_mode)
    if mode not in MODES:
        raise InvalidRequest(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if mode not in caps.modes:
        raise InvalidRequest(
            f"this model cannot do mode {mode!r}; it supports {', '.join(caps.modes)}"
        )
    prompt, input_ids = _parse_input(payload, caps)
    request = Request(
        mode=mode,
        prompt=prompt,
        input_ids=input_ids,
        max_new_tokens=min(default_max_new_tokens, max_new_tokens_limit),
    )
    for name, convert in _NUMERIC.items():
        if name in params:
            setattr(request, name, convert(name, params.pop(name)))
    if "stop" in params:
        request.stop = _as_stop(params.pop("stop"))
    if "layers" in params:
        request.layers = parse_layers(params.pop("layers"), caps.num_layers)
    elif mode == "hidden_states":
        request.layers = list(range(caps.num_layers + 1))
    if "pooling" in params:
        request.pooling = str(params.pop("pooling"))
    _check_ranges(request, caps, max_new_tokens_limit)
    return request


def _check_ranges(request: Request, caps: ModelCapabilities, limit: int) -> None:
    if request.mode == "tokens" and not 1 <= request.max_new_tokens <= limit:
        raise InvalidRequest(
            f"max_new_tokens must be between 1 and {limit}, got {request.max_new_tokens}"
        )
    if request.temperature is not None and request.temperature <= 0:
        raise InvalidRequest("temperature must be > 0 (use do_sample=false for greedy decoding)")
    if request.top_p is not None and not 0 < request.top_p <= 1:
        raise InvalidRequest(f"top_p must be in (0, 1], got {request.top_p}")
    if request.top_k is not None and request.top_k < 0:
        raise InvalidRequest(f"top_k must be >= 0, got {request.top_k}")
    if request.repetition_penalty is not None and request.repetition_penalty <= 0:
        raise InvalidRequest("repetition_penalty must be > 0")
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
