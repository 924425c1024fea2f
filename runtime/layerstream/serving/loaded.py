"""The layerstream models loaded in this process, by name.

MLServer registers a custom REST handler's fixed route once per model instance, and the
first registered route answers every request on its path: a handler that serves
``/v2/models/{model_name}/...`` therefore finds the model the path names here, whichever
instance's route took the request.
"""

from __future__ import annotations

import functools
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runtime import LayerStreamRuntime

_lock = threading.Lock()
# name -> the instances loaded under it (several versions of one name can be)
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
    """The model loaded as ``name`` at ``version``; without a version, of several the one
    MLServer serves for the name alone (its default, the newest)."""
    instances = versions(name)
    if version is None:
        return instances[0] if instances else None
    return next((r for r in instances if r.version == version), None)


def versions(name: str) -> list[LayerStreamRuntime]:
    """The instances loaded as ``name``, newest first (MLServer's order: no version is
    newest, then numbers, then other names)."""
    from mlserver.registry import _is_newer

    with _lock:
        instances = list(_loaded.get(name, []))
    return sorted(instances, key=functools.cmp_to_key(_is_newer), reverse=True)


def is_loaded(name: str, version: str | None) -> bool:
    """Whether an instance of ``name`` at ``version`` is loaded (MLServer loads a model's
    new instance before it unloads the old one when it reloads it)."""
    with _lock:
        return any(r.version == version for r in _loaded.get(name, []))


def names() -> list[str]:
    with _lock:
        return sorted(_loaded)
