"""Errors that carry their status: MLServer maps them to HTTP codes and gRPC status codes.

Every message says what failed and what to do next; none of them is ever swallowed into a
default value or a partial answer.
"""

from __future__ import annotations

from mlserver.errors import MLServerError

__all__ = [
    "ChunkIntegrityError",
    "ChunkStoreError",
    "InvalidRequest",
    "LayerStreamError",
    "ManifestError",
    "RequestCancelled",
    "ServerBusy",
    "SettingsError",
]


class LayerStreamError(MLServerError):
    """Base class: a server-side failure (HTTP 500, gRPC INTERNAL) unless a subclass says so."""

    status = 500

    def __init__(self, message: str):
        super().__init__(message, status_code=self.status)


class InvalidRequest(LayerStreamError):
    """The request cannot be served as sent (HTTP 400, gRPC INVALID_ARGUMENT)."""

    status = 400


class ServerBusy(LayerStreamError):
    """The per-model request queue is full; retry later (HTTP 503)."""

    status = 503


class SettingsError(LayerStreamError):
    """model-settings.json / environment settings are invalid; raised at load()."""


class ManifestError(LayerStreamError):
    """The chunk store's manifest.json is missing, unreadable or inconsistent."""


class ChunkStoreError(LayerStreamError):
    """A chunk could not be read from the store."""


class ChunkIntegrityError(ChunkStoreError):
    """A chunk's bytes do not match the manifest (size or sha256)."""


class RequestCancelled(Exception):
    """Raised inside the engine thread when the client has gone away.

    Not an MLServerError: nobody is left to receive it, it only unwinds the forward pass.
    """
