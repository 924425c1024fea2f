"""layerstream as a library: a streamed transformers model in one call, without a server.

    model = layerstream.load("s3://bucket/llama/chunks", memory_budget="25%")
    ids = model.tokenizer("Once upon a time", return_tensors="pt").input_ids
    print(model.tokenizer.decode(model.generate(ids, max_new_tokens=16)[0]))
    model.close()  # or: with layerstream.load(...) as model:

``load`` returns the engine's own model: the transformers ``PreTrainedModel`` of the
store's architecture, its blocks streamed from the store while it runs (``generate``,
``forward``, ``output_hidden_states``, a ``pipeline``), with the store's tokenizer as
``model.tokenizer``. Each top-level ``generate`` or ``forward`` call is one request on the
engine, so calls from several threads share the passes over the streamed blocks, as the
server's requests do. Closing it (``close()``, or leaving its ``with``) releases the store,
the buffers and the threads.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from .engine.engine import Engine, EngineOptions
from .stores import StoreOptions, open_store


def load(
    store: str | Path,
    memory_budget: str | int = "auto",
    store_options: StoreOptions | None = None,
    **engine_options: Any,
) -> PreTrainedModel:
    """The model in ``store`` (a directory, ``s3://bucket/prefix`` or ``http(s)://``, as
    ``chunk_store`` takes it), its weights held in ``memory_budget`` (bytes, ``"2GiB"``,
    ``"25%"`` of the model, ``"auto"``); other ``EngineOptions`` by name."""
    chunks = open_store(str(store), options=store_options)
    try:
        engine = Engine(chunks, EngineOptions(memory_budget=memory_budget, **engine_options))
    except BaseException:
        chunks.close()
        raise
    model = engine.model
    # the same class, with the calls wrapped as requests and a close(): isinstance checks
    # and transformers' class-name lookups (pipelines) see the model's own class
    cls = type(model)
    model.__class__ = type(cls.__name__, (_Streamed, cls), {"__module__": cls.__module__})
    model._layerstream_engine = engine
    model._layerstream_calls = threading.local()
    model.tokenizer = engine.tokenizer
    return model


class _Streamed:
    """Mixed in before the model's class: top-level calls run as engine requests."""

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self._layerstream_request():
            return super().generate(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._layerstream_request():
            return super().forward(*args, **kwargs)

    def _layerstream_request(self):
        if self._layerstream_engine is None:
            raise RuntimeError("this layerstream model was closed: load it again to run it")
        calls = self._layerstream_calls
        if getattr(calls, "inside", False):  # generate's own forwards: one request
            return contextlib.nullcontext()
        return _Request(self._layerstream_engine, calls)

    def close(self) -> None:
        """Release the store, buffers and threads (the model cannot run after)."""
        engine, self._layerstream_engine = self._layerstream_engine, None
        if engine is not None:
            engine.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Request:
    """One engine request for a top-level call on this thread."""

    def __init__(self, engine: Engine, calls: threading.local):
        self.engine, self.calls = engine, calls

    def __enter__(self) -> None:
        self.calls.inside = True
        self._context = self.engine.request()
        self._context.__enter__()

    def __exit__(self, *exc: object) -> None:
        try:
            self._context.__exit__(*exc)
        finally:
            self.calls.inside = False
