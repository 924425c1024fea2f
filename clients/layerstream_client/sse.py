"""REST client: ``POST /v2/models/{name}/generate_stream``, one SSE event per response."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
from httpx_sse import connect_sse

from .events import Final, HiddenState, StreamingClient, Token, parse_response


class SSEClient(StreamingClient):
    def __init__(self, url: str = "http://127.0.0.1:8080", timeout: float = 300.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def stream(self, model: str, request: dict[str, Any]) -> Iterator[Token | HiddenState | Final]:
        """Events as they arrive; a stream cut without a final event raises ConnectionError."""
        url = f"{self.url}/v2/models/{model}/generate_stream"
        finished = False
        # identity: a gzip-compressing proxy or server would hold every event until the end
        headers = {"Accept-Encoding": "identity"}
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
                    finished = finished or isinstance(event, Final)
                    yield event
        if not finished:
            raise ConnectionError(f"the stream from {url} ended without a final event")

    def infer(self, model: str, request: dict[str, Any]) -> dict[str, Any]:
        """Unary ``/infer``: the whole answer in one response (raises on HTTP errors)."""
        with httpx.Client(timeout=self.timeout) as client:
            response = client.post(f"{self.url}/v2/models/{model}/infer", json=request)
            response.raise_for_status()
            return response.json()
