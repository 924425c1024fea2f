"""layerstream: serve Hugging Face transformers whose weights stream layer by layer.

The flow, by module:

- ``chunker``   a checkpoint -> one safetensors chunk per block + ``manifest.json``
- ``stores``    where chunks live (``ChunkStore``: a directory, S3, HTTP(S), a disk cache)
- ``engine``    the model on a meta skeleton; hooks install/release blocks while it runs
- ``streamer``  reads chunks: pinned blocks once, the others through a buffer pool, ahead
- ``integrity`` chunk sizes and tensors checked at load, streamed chunks hashed after it
- ``runtime``   ``LayerStreamRuntime``, the MLServer model (``predict_stream``/``predict``);
  requests are checked by ``protocol``/``inputs``/``prompts``, errors carry a kind
  (``errors``) that ``transport``/``grpc_status`` turn into SSE events or gRPC statuses

MLServer imports ``layerstream.LayerStreamRuntime`` and then reloads this module, so it
has no side effects: the heavy imports happen on first attribute access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "Engine",
    "EngineOptions",
    "LayerStreamRuntime",
    "Manifest",
    "chunk_checkpoint",
    "open_store",
]
__version__ = "0.1.0"

_EXPORTS = {
    "Engine": "engine.engine",
    "EngineOptions": "engine.engine",
    "LayerStreamRuntime": "serving.runtime",
    "Manifest": "format.manifest",
    "chunk_checkpoint": "chunker.convert",
    "open_store": "stores",
}

if TYPE_CHECKING:
    from .chunker.convert import chunk_checkpoint
    from .engine.engine import Engine, EngineOptions
    from .format.manifest import Manifest
    from .serving.runtime import LayerStreamRuntime
    from .stores import open_store


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'layerstream' has no attribute {name!r}")
