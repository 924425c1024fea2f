"""The V2 request a layerstream model expects, and the events its stream carries."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# Parameters the client sends as given; numbers are sent as they are over REST and as
# strings over gRPC (which drops floats), the server accepts both.
GENERATION_PARAMS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "do_sample",
    "seed",
    "stop",
    "repetition_penalty",
)
# timeout: the server-side deadline in microseconds (the name and unit tritonclient uses)
_PARAMS = ("mode", *GENERATION_PARAMS, "layers", "pooling", "timeout")


# The kinds a layerstream server gives its errors (``error_type``), and what they mean for
# a retry: invalid_request (do not retry as is), overloaded (retry later), store_unavailable
# (retry, here or elsewhere), integrity (the model is damaged: another replica may serve),
# timeout (allow more time or ask for less), configuration (the model's settings cannot work:
# seen at load), internal (a server bug).
ERROR_TYPES = (
    "invalid_request",
    "overloaded",
    "store_unavailable",
    "integrity",
    "timeout",
    "configuration",
    "internal",
)


class StreamError(RuntimeError):
    """The server ended the request with an error: ``str(exc)`` is its message and
    ``error_type`` its kind (one of ERROR_TYPES; None from a server that sends no kind)."""

    def __init__(self, message: str, error_type: str | None = None):
        super().__init__(message)
        self.message = message
        self.error_type = error_type


@dataclass(frozen=True)
class ModelStatus:
    """One entry of the server's repository index."""

    name: str
    state: str  # READY, LOADING, UNAVAILABLE, UNLOADING, UNKNOWN
    reason: str = ""


class ModelNotLoadedError(LookupError):
    """The server does not serve ``model`` (a wrong name, or a model that failed to load).

    MLServer answers a stream for an unknown model with HTTP 200 and an empty body (gRPC:
    NOT_FOUND), so the clients ask the repository index what it does serve and say so."""

    def __init__(self, model: str, index: list[ModelStatus]):
        self.model = model
        self.loaded = sorted(m.name for m in index if m.state == "READY")
        mine = next((m for m in index if m.name == model), None)
        state = f" ({mine.state}{': ' + mine.reason if mine.reason else ''})" if mine else ""
        loaded = ", ".join(self.loaded) or "none"
        super().__init__(f"model {model} is not loaded here{state}; loaded: {loaded}")


def split_kind(text: str) -> tuple[str | None, str]:
    """``"timeout: the request ran..."`` -> ``("timeout", "the request ran...")``: how the kind
    travels where there is one text field (gRPC status details, the /infer error body)."""
    kind, sep, message = text.partition(": ")
    if sep and kind in ERROR_TYPES:
        return kind, message
    return None, text


@dataclass(frozen=True)
class Token:
    token_id: int
    text: str


@dataclass(frozen=True)
class HiddenState:
    layer: int
    shape: tuple[int, ...]
    values: list[float] = field(repr=False)  # row-major float32 values

    def __repr__(self) -> str:
        values = f"float32[{len(self.values)}]"
        return f"HiddenState(layer={self.layer}, shape={self.shape}, values={values})"

    def rows(self) -> list[list[float]]:
        """``[seq][hidden]`` nested lists."""
        width = self.shape[-1]
        return [self.values[i : i + width] for i in range(0, len(self.values), width)]


@dataclass(frozen=True)
class Final:
    finish_reason: str
    stats: dict[str, int]
    text: str = ""
    embedding: list[float] | None = None
    # Always None: a stream that failed raises StreamError instead of yielding a Final.
    # Kept because callers (and the tests) check it.
    error: str | None = None

    def __repr__(self) -> str:
        # print(event) is for people: the token count, not a dozen stats; the embedding's
        # size, not its 768 values
        parts = [f"finish_reason={self.finish_reason!r}"]
        if "tokens" in self.stats and self.embedding is None:  # an embedding generates none
            parts.append(f"tokens={self.stats['tokens']}")
        if self.text:
            parts.append(f"text={_shorten(self.text)!r}")
        if self.embedding is not None:
            parts.append(f"embedding=float32[{len(self.embedding)}]")
        if self.error is not None:
            parts.append(f"error={self.error!r}")
        return f"Final({', '.join(parts)})"


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def build_request(
    prompt: str | None = None,
    input_ids: list[int] | None = None,
    request_id: str | None = None,
    **parameters: Any,
) -> dict[str, Any]:
    """A V2 inference request (JSON form) for a prompt or pre-tokenised ids."""
    if (prompt is None) == (input_ids is None):
        raise ValueError("pass exactly one of prompt or input_ids")
    unknown = set(parameters) - set(_PARAMS)
    if unknown:
        raise ValueError(f"unknown parameters {sorted(unknown)}; known: {', '.join(_PARAMS)}")
    if prompt is not None:
        inputs = [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [prompt]}]
    else:
        inputs = [
            {
                "name": "input_ids",
                "datatype": "INT64",
                "shape": [len(input_ids)],
                "data": list(input_ids),
            }
        ]
    request: dict[str, Any] = {"inputs": inputs}
    if request_id:
        request["id"] = request_id
    params = {k: v for k, v in parameters.items() if v is not None}
    if params:
        request["parameters"] = params
    return request


def _output(response: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((o for o in response.get("outputs") or [] if o["name"] == name), None)


def parse_response(response: dict[str, Any]) -> list[Token | HiddenState | Final]:
    """Events in one streamed InferenceResponse (JSON form); raises StreamError on error."""
    params = {k: v for k, v in (response.get("parameters") or {}).items() if k != "headers"}
    reason = params.pop("finish_reason", None)
    if reason == "error":
        raise StreamError(
            params.get("error") or "the server reported an error", params.get("error_type")
        )
    text = _output(response, "text")
    if reason is not None:
        embedding = _output(response, "embedding")
        stats = {
            k: int(v)
            for k, v in params.items()
            if isinstance(v, int | str) and str(v).lstrip("-").isdigit()
        }
        return [
            Final(
                finish_reason=reason,
                stats=stats,
                text=text["data"][0] if text else "",
                embedding=list(embedding["data"]) if embedding else None,
            )
        ]
    token = _output(response, "token_id")
    if token is not None:
        return [Token(token_id=int(token["data"][0]), text=text["data"][0] if text else "")]
    hidden = _output(response, "hidden_state")
    if hidden is not None:
        return [
            HiddenState(
                layer=int(params["layer"]),
                shape=tuple(hidden["shape"]),
                values=list(hidden["data"]),
            )
        ]
    raise ValueError(f"unexpected response: {sorted(response)}")


class StreamingClient:
    """What the SSE and gRPC clients share: requests built the same way, one ``stream``, one
    ``models`` (the repository index)."""

    def stream(self, model: str, request: dict[str, Any]) -> Iterator[Token | HiddenState | Final]:
        raise NotImplementedError

    def models(self) -> list[ModelStatus]:
        """Every model the server knows, with its state."""
        raise NotImplementedError

    # what reading the repository index raises when the server cannot answer it
    index_errors: tuple[type[Exception], ...] = ()

    def check_model(self, model: str) -> None:
        """Raises ModelNotLoadedError unless the server has ``model`` loaded and ready."""
        index = self.models()
        if not any(m.name == model and m.state == "READY" for m in index):
            raise ModelNotLoadedError(model, index)

    def _not_loaded(self, model: str) -> ModelNotLoadedError | None:
        """Why a stream failed before its first event, if the reason is that ``model`` is
        not served; None when it is, or when the index cannot be read either (the caller
        raises what it saw)."""
        try:
            self.check_model(model)
        except ModelNotLoadedError as exc:
            return exc
        except self.index_errors:
            pass
        return None

    def generate(
        self,
        model: str,
        prompt: str | None = None,
        input_ids: list[int] | None = None,
        **params: Any,
    ) -> Iterator[Token | HiddenState | Final]:
        """Token events then a Final (or hidden-state events with ``mode="hidden_states"``)."""
        return self.stream(model, build_request(prompt, input_ids, **params))

    def hidden_states(
        self,
        model: str,
        prompt: str | None = None,
        input_ids: list[int] | None = None,
        **params: Any,
    ) -> Iterator[Token | HiddenState | Final]:
        params.setdefault("mode", "hidden_states")
        return self.stream(model, build_request(prompt, input_ids, **params))
