"""Errors that carry their status and their kind: MLServer maps them to HTTP codes and gRPC
status codes, and every error a client sees names its kind, so the client can tell what to
retry.

Every message says what failed and what to do next; none of them is ever swallowed into a
default value or a partial answer.

Kinds (``error_type``; HTTP status; gRPC status once ``grpc_status.install`` has run):

- ``invalid_request``: the request cannot be served as sent; do not retry it (400,
  INVALID_ARGUMENT).
- ``overloaded``: the model's queue is full; retry later (503, RESOURCE_EXHAUSTED).
- ``store_unavailable``: the chunk store could not be read; retry, here or elsewhere (502,
  UNAVAILABLE).
- ``integrity``: chunk bytes do not match the manifest; the model is damaged: re-chunk it,
  the request may succeed on another replica (500, INTERNAL).
- ``timeout``: the request ran past its deadline (504, DEADLINE_EXCEEDED).
- ``configuration``: the model's settings cannot work (a budget below the model's
  minimum, an unknown setting): fix model-settings.json (422, FAILED_PRECONDITION). Seen at
  load, not by requests.
- ``internal``: anything else: a bug (500, INTERNAL).

A manifest that does not describe the store or the model (``ManifestError``) is an
``integrity`` error, like a chunk that does not match the manifest.

MLServer is not imported here: the library and the chunker run without it. In a process
that has imported MLServer (a server), each error is created as its class's twin that is
also an ``MLServerError``, the class MLServer's REST and gRPC handlers map to a status.
"""

from __future__ import annotations

import functools
import sys

__all__ = [
    "ERROR_TYPES",
    "ChunkIntegrityError",
    "ChunkStoreError",
    "InvalidRequest",
    "LayerStreamError",
    "ManifestError",
    "RequestCancelled",
    "RequestTimeout",
    "ServerBusy",
    "SettingsError",
    "ShuttingDown",
    "error_type",
]

ERROR_TYPES = (
    "invalid_request",
    "overloaded",
    "store_unavailable",
    "integrity",
    "timeout",
    "configuration",
    "internal",
)


class LayerStreamError(Exception):
    """Base class: a server-side failure (HTTP 500, gRPC INTERNAL) unless a subclass says so.

    ``str(exc)`` is ``"<kind>: <message>"``: MLServer's REST error body is fixed to
    ``{"error": str(exc)}`` and gRPC carries one details string, so the kind travels in the
    text there; SSE error events carry ``message`` and ``kind`` as separate fields.
    """

    status = 500
    kind = "internal"

    def __new__(cls, *args: object, **kwargs: object):
        # asked at creation, not at import: whichever of the two is imported first
        cls = _public(cls)  # type(error)(...) of a twin makes the same twin
        served = sys.modules.get("mlserver.errors") is not None
        return super().__new__(_served(cls) if served else cls)

    def __init__(self, message: str):
        self.message = message
        super().__init__(f"{self.kind}: {message}")
        self.status_code = self.status  # what MLServer's handlers read

    def __reduce__(self):
        # copied (one copy per request an error fails, engine/sweeps.py) or pickled from the
        # message and the public class (a twin is made again where MLServer is imported): the
        # default rebuilds from ``args``, which hold the kind prefix already
        return _public(type(self)), (self.message,), self.__dict__


@functools.cache
def _served(cls: type[LayerStreamError]) -> type[LayerStreamError]:
    """``cls`` that is also an ``MLServerError`` (module docstring)."""
    from mlserver.errors import MLServerError

    return type(cls.__name__, (cls, MLServerError), {"__module__": cls.__module__, "_twin": True})


def _public(cls: type[LayerStreamError]) -> type[LayerStreamError]:
    return cls.__bases__[0] if cls.__dict__.get("_twin") else cls


class InvalidRequest(LayerStreamError):
    """The request cannot be served as sent (HTTP 400, gRPC INVALID_ARGUMENT)."""

    status = 400
    kind = "invalid_request"


class ServerBusy(LayerStreamError):
    """The per-model request queue is full; retry later (HTTP 503)."""

    status = 503
    kind = "overloaded"


class ShuttingDown(ServerBusy):
    """The server is shutting down: a request waiting is refused, one in flight past the
    drain is stopped (serving/shutdown.py); retry on another replica (HTTP 503)."""


class RequestTimeout(LayerStreamError):
    """The request ran past its deadline (``timeout`` or ``request_timeout_s``)."""

    status = 504
    kind = "timeout"


class SettingsError(LayerStreamError):
    """model-settings.json / environment settings are invalid; raised at load()."""

    status = 422
    kind = "configuration"


class ManifestError(LayerStreamError):
    """The chunk store's manifest.json is missing, unreadable or inconsistent."""

    kind = "integrity"


class ChunkStoreError(LayerStreamError):
    """A chunk could not be read from the store."""

    status = 502
    kind = "store_unavailable"


class ChunkIntegrityError(ChunkStoreError):
    """A chunk's bytes do not match the manifest (size, sha256, tensor shapes)."""

    status = 500
    kind = "integrity"


class RequestCancelled(Exception):
    """Raised on the request's worker thread when the client has gone away.

    Not an MLServerError: nobody is left to receive it, it only unwinds the forward pass.
    """


def error_type(exc: BaseException) -> str:
    """The kind of any exception a request can end with (``internal`` for the unexpected)."""
    return exc.kind if isinstance(exc, LayerStreamError) else "internal"
