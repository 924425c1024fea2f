"""The MLServer model-repository entry that serves a chunk store."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

IMPLEMENTATION = "layerstream.LayerStreamRuntime"


def model_settings(name: str, chunk_store: str, extra: dict[str, Any] | None = None) -> dict:
    """model-settings.json content; everything the runtime reads sits in ``parameters.extra``
    because Seldon Core v2 keeps only that when it rewrites the file."""
    return {
        "name": name,
        "implementation": IMPLEMENTATION,
        "parameters": {"extra": {"chunk_store": chunk_store, **(extra or {})}},
    }


def write_model_settings(
    model_dir: Path,
    name: str,
    store: Path | str,
    force: bool,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model_dir/model-settings.json`` pointing at ``store``: a directory (relative
    when inside the model folder) or a remote URI, written as given."""
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "model-settings.json"
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")
    if isinstance(store, str) and "://" in store:
        uri = store
    else:
        local = Path(store).resolve()
        try:
            uri = "./" + local.relative_to(model_dir.resolve()).as_posix()
        except ValueError:
            uri = os.path.relpath(local, model_dir.resolve())
    path.write_text(json.dumps(model_settings(name, uri, extra), indent=2) + "\n")
    return path
