"""The MLServer model-repository entry that serves a chunk store."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

IMPLEMENTATION = "layerstream.LayerStreamRuntime"

log = logging.getLogger(__name__)


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
    when inside the model folder) or a remote URI, written as given. Settings the file
    already holds (``memory_budget``, ``max_active_sequences``...) are kept."""
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
    kept = _kept(path)
    parameters = kept.get("parameters")
    parameters = parameters if isinstance(parameters, dict) else {}
    kept_extra = parameters.get("extra")
    kept_extra = kept_extra if isinstance(kept_extra, dict) else {}
    # the user's settings stay; the chunker's own (the store, what this run was given) win
    settings = kept | model_settings(name, uri)
    settings["parameters"] = parameters | {
        "extra": kept_extra | {"chunk_store": uri, **(extra or {})}
    }
    path.write_text(json.dumps(settings, indent=2) + "\n")
    return path


def _kept(path: Path) -> dict[str, Any]:
    """The settings already in ``path`` (a model re-chunked keeps them), or none."""
    try:
        kept = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s): written anew, its settings lost", path, exc)
        return {}
    return kept if isinstance(kept, dict) else {}
