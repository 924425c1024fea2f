"""OpenAI's errors: ``{"error": {message, type, param, code}}`` with the status."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi.responses import JSONResponse

from ...errors import LayerStreamError

# layerstream error kind -> HTTP status. The openai client retries 408, 429 and 5xx
# (``max_retries``): the statuses of the V2 path, except that a store that cannot be read
# answers 503 (retry, here or on another replica) and a broken setting 500 (422 means
# nothing to an OpenAI client).
STATUS = {
    "invalid_request": 400,
    "overloaded": 503,
    "timeout": 504,
    "store_unavailable": 503,
    "integrity": 500,
    "configuration": 500,
    "internal": 500,
}


class OpenAIError(Exception):
    """An error as OpenAI sends it: ``{"error": {message, type, param, code}}``, its
    status on the response. ``code`` is the layerstream kind for engine errors."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    @classmethod
    def of(cls, error: LayerStreamError) -> OpenAIError:
        return cls(STATUS.get(error.kind, 500), error.message, error.kind, _field(error))

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }

    def response(self) -> JSONResponse:
        return _AsciiJSON(self.body(), status_code=self.status)


class _AsciiJSON(JSONResponse):
    """JSON with every non-ASCII character escaped: an error may quote what the client sent,
    and a lone surrogate in it (JSON can spell one) cannot be encoded as UTF-8."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def invalid(message: str, param: str | None, code: str = "invalid_request") -> OpenAIError:
    """A 400 naming the field (``param``) that is wrong."""
    return OpenAIError(400, message, code, param)


# the V2 parameters an OpenAI field sets, by the name the V2 path's messages give them
_FIELDS = {
    "max_new_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "stop": "stop",
    "repetition_penalty": "repetition_penalty",
    "do_sample": "temperature",
    "pooling": "pooling",
}
_NAMED = re.compile(r"^(?:parameter )?(\w+) ")


def _field(error: LayerStreamError) -> str | None:
    """The OpenAI field a V2 refusal is about, where its message begins by naming the V2
    parameter (``parameter seed must ...``, ``max_new_tokens must be ...``)."""
    if error.kind != "invalid_request":
        return None
    named = _NAMED.match(error.message)
    return _FIELDS.get(named.group(1)) if named else None
