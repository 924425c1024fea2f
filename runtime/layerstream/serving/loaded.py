"""The layerstream models loaded in this process, by name.

MLServer registers a custom REST handler's fixed route once per model instance, and the
first registered route answers every request on its path: a handler that serves
``/v2/models/{model_name}/...`` therefore finds the model the path names here, whichever
instance's route took the request.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runtime import LayerStreamRuntime

_lock = threading.Lock()
# name -> the instances loaded under it, the latest last (MLServer's default version is the
# latest loaded one too)
_loaded: dict[str, list[LayerStreamRuntime]] = {}


def register(runtime: LayerStreamRuntime) -> None:
    with _lock:
        _loaded.setdefault(runtime.name, []).append(runtime)


def unregister(runtime: LayerStreamRuntime) -> None:
    with _lock:
        instances = _loaded.get(runtime.name, [])
        if runtime in instances:
            instances.remove(runtime)
        if not instances:
            _loaded.pop(runtime.name, None)


def find(name: str, version: str | None = None) -> LayerStreamRuntime | None:
    """The model loaded as ``name`` (that ``version`` where given, else the latest loaded)."""
    with _lock:
        instances = _loaded.get(name, [])
        if version is None:
            return instances[-1] if instances else None
        return next((r for r in reversed(instances) if r.version == version), None)


def names() -> list[str]:
    with _lock:
        return sorted(_loaded)
