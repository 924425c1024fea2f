"""A bounded shutdown for MLServer's REST server.

On SIGTERM, uvicorn waits for every open connection to finish its response, and MLServer
sets no limit to that wait (uvicorn's ``timeout_graceful_shutdown``, None by default): one
SSE client that stopped reading kept the server from ever exiting. Once a layerstream model
is loaded, that wait is bounded by ``GRACE_S``; then uvicorn cancels what still runs (the
request's engine work stops at its next block). A limit set in uvicorn's config is kept.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)

GRACE_S = 10  # seconds; Kubernetes sends SIGKILL 30 s after SIGTERM by default


def bound_rest_shutdown() -> None:
    """Give uvicorn's graceful shutdown a limit (once per process)."""
    import uvicorn

    shutdown = uvicorn.Server.shutdown
    if getattr(shutdown, "_layerstream_bounded", False):
        return

    @functools.wraps(shutdown)
    async def bounded(self: uvicorn.Server, *args, **kwargs) -> None:
        if self.config.timeout_graceful_shutdown is None:
            log.info("open HTTP responses have %d s to finish before they are cut", GRACE_S)
            self.config.timeout_graceful_shutdown = GRACE_S
        await shutdown(self, *args, **kwargs)

    bounded._layerstream_bounded = True  # type: ignore[attr-defined]
    uvicorn.Server.shutdown = bounded  # type: ignore[method-assign]
