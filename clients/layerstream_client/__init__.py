"""Clients for a layerstream model served by MLServer: REST SSE and gRPC streams.

Needs only httpx, httpx-sse and (for gRPC) MLServer's generated stubs; never torch.

    from layerstream_client import SSEClient
    for event in SSEClient("http://127.0.0.1:8080").generate("demo", "Once upon a time"):
        print(event.text, end="", flush=True)
"""

from .events import (
    ERROR_TYPES,
    Final,
    HiddenState,
    ModelNotLoadedError,
    ModelStatus,
    StreamError,
    Token,
    build_request,
    parse_response,
)
from .sse import SSEClient

__all__ = [
    "ERROR_TYPES",
    "Final",
    "GRPCClient",
    "HiddenState",
    "ModelNotLoadedError",
    "ModelStatus",
    "SSEClient",
    "StreamError",
    "Token",
    "build_request",
    "parse_response",
]


def __getattr__(name: str):
    if name == "GRPCClient":  # grpc stubs load only when asked for
        from .grpc import GRPCClient

        return GRPCClient
    raise AttributeError(name)
