"""layerstream: serve Hugging Face transformers whose weights stream layer by layer.

The flow, by subpackage (one line per module: docs/design.md, "How it is built"):

- ``chunker``    a checkpoint -> one safetensors chunk per block + ``manifest.json``, and
  the model-repo entry that serves it (the ``layerstream chunk`` command)
- ``format``     the store's files: the manifest, safetensors chunk headers and tensor
  views, the streaming chunk writer
- ``stores``     where chunks live (``ChunkStore``: a directory, S3, HTTP(S), a disk cache);
  optional capabilities (mapping, conditional reads) are declared as protocols
- ``engine``     the model on a meta skeleton; the residency plan pins the first blocks
  that fit the budget, the streamer reads the others ahead into a buffer pool, hooks
  install/release them around each block; integrity checks at load, in the background
  and on use
- ``inference``  what one request runs, free of MLServer: generation, hidden states,
  embeddings, prompt limits, and the events and stats it produces
- ``serving``    ``LayerStreamRuntime``, the MLServer model (``predict_stream``/``predict``):
  settings, the request contract (``protocol``/``parameters``/``inputs``), the
  per-model queue, responses, metrics; errors carry a kind (``errors``) that
  ``transport``/``grpc_status`` turn into SSE events, HTTP or gRPC statuses

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
    "load",
    "open_store",
]
__version__ = "0.1.0"

_EXPORTS = {
    "Engine": "engine.engine",
    "EngineOptions": "engine.engine",
    "LayerStreamRuntime": "serving.runtime",
    "Manifest": "format.manifest",
    "chunk_checkpoint": "chunker.convert",
    "load": "library",
    "open_store": "stores",
}

if TYPE_CHECKING:
    from .chunker.convert import chunk_checkpoint
    from .engine.engine import Engine, EngineOptions
    from .format.manifest import Manifest
    from .library import load
    from .serving.runtime import LayerStreamRuntime
    from .stores import open_store


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        try:
            module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != "mlserver":
                raise
            raise ModuleNotFoundError(
                f"layerstream.{name} is the MLServer runtime, which needs the server extra: "
                "pip install 'layerstream[server]' (or scripts/install.sh)",
                name=exc.name,
            ) from exc
        return getattr(module, name)
    raise AttributeError(f"module 'layerstream' has no attribute {name!r}")
