"""REST client: ``POST /v2/models/{name}/generate_stream``, one SSE event per response."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
from httpx_sse import connect_sse

from .events import (
    Final,
    HiddenState,
    ModelStatus,
    StreamingClient,
    Token,
    parse_response,
)


class SSEClient(StreamingClient):
    index_errors = (httpx.HTTPError,)

    def __init__(self, url: str = "http://127.0.0.1:8080", timeout: float = 300.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def stream(self, model: str, request: dict[str, Any]) -> Iterator[Token | HiddenState | Final]:
        """Events as they arrive; a stream cut without a final event raises ConnectionError,
        or ModelNotLoadedError when nothing came because the server does not serve ``model``
        (MLServer answers that with HTTP 200 and an empty body)."""
        url = f"{self.url}/v2/models/{model}/generate_stream"
        started = finished = False
        # identity: a gzip-compressing proxy or server would hold every event until the end
        headers = {"Accept-Encoding": "identity"}
        try:
            with (
                httpx.Client(timeout=self.timeout) as client,
                connect_sse(client, "POST", url, json=request, headers=headers) as source,
            ):
                if source.response.status_code != 200:
                    source.response.read()
                    raise httpx.HTTPStatusError(
                        f"{source.response.status_code}: {source.response.text}",
                        request=source.response.request,
                        response=source.response,
                    )
                for sse in source.iter_sse():
                    for event in parse_response(json.loads(sse.data)):
                        started = True
                        finished = finished or isinstance(event, Final)
                        yield event
        except httpx.RemoteProtocolError as exc:  # how MLServer ends an unknown model's stream
            if not started and (error := self._not_loaded(model)):
                raise error from exc
            raise
        if not finished:
            if not started and (error := self._not_loaded(model)):
                raise error
            raise ConnectionError(f"the stream from {url} ended without a final event")

    def models(self) -> list[ModelStatus]:
        """``POST /v2/repository/index``: every model the server knows, with its state."""
        with httpx.Client(timeout=self.timeout) as client:
            response = client.post(f"{self.url}/v2/repository/index", json={})
            response.raise_for_status()
            return [
                ModelStatus(m["name"], m["state"], m.get("reason") or "") for m in response.json()
            ]

    def infer(self, model: str, request: dict[str, Any]) -> dict[str, Any]:
        """Unary ``/infer``: the whole answer in one response (raises on HTTP errors)."""
        with httpx.Client(timeout=self.timeout) as client:
            response = client.post(f"{self.url}/v2/models/{model}/infer", json=request)
            response.raise_for_status()
            return response.json()
