"""Which loaded model an OpenAI request is for, and the model list.

Three base URLs reach the same routes:

- ``/v1``, the server's: the body's ``model`` chooses (``NAME``: its default version, the
  newest; ``NAME:VERSION``: that one), as gateways and UIs expect of one base URL;
- ``/v2/models/NAME/openai/v1``: NAME's default version;
- ``/v2/models/NAME/versions/VERSION/openai/v1``: that version.

Under a model's own base URL the body's ``model`` may name it, be absent, or be a placeholder
a client sends when it was given a URL instead of a model (huggingface_hub's
``InferenceClient(base_url=...)`` sends ``"dummy"``); any other name is a 404 that lists what
is served.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import loaded
from ..parameters import show
from .errors import OpenAIError, invalid

if TYPE_CHECKING:
    from ..runtime import LayerStreamRuntime

PLACEHOLDERS = frozenset({"dummy"})


@dataclass(frozen=True)
class Target:
    runtime: LayerStreamRuntime
    model: str  # the name answers carry: the client's own where it sent one


def model_id(runtime: LayerStreamRuntime) -> str:
    """``NAME`` for a model's default version, ``NAME:VERSION`` for another."""
    default = loaded.find(runtime.name)
    if runtime is default or not runtime.version:
        return runtime.name
    return f"{runtime.name}:{runtime.version}"


def served_ids() -> list[str]:
    """Every id a request can name: each model, then each of its versions, newest first."""
    ids: list[str] = []
    for name in loaded.names():
        ids.append(name)
        ids.extend(f"{name}:{r.version}" for r in loaded.versions(name) if r.version)
    return ids


def model_card(model: str) -> dict[str, Any]:
    # created: when asked, as vLLM does (the loaded model has no creation time of its own)
    return {"id": model, "object": "model", "created": int(time.time()), "owned_by": "layerstream"}


def by_body(named: Any) -> Target:
    """The model the server's ``/v1`` serves a request for: the one its body names."""
    if named is None:
        raise invalid(
            f"model is required at /v1: one of {_listing()} (GET /v1/models lists them)", "model"
        )
    runtime = _find(_string(named))
    if runtime is None:
        raise _not_found(f"model {named!r} is not served here")
    return Target(runtime, named)


def by_path(model_name: str, version: str | None, named: Any) -> Target:
    """The model a model's own base URL serves (its default version, or ``version``); the
    body's ``model``, where it has one, must agree."""
    runtime = loaded.find(model_name, version)
    if runtime is None:
        what = repr(model_name) if version is None else f"{model_name!r} version {version!r}"
        raise _not_found(f"model {what} is not loaded here as a layerstream model")
    if named is None or _string(named) in PLACEHOLDERS:
        return Target(runtime, model_id(runtime))
    if named in {model_name, model_id(runtime)} or _seldon_internal(named, model_name):
        return Target(runtime, named)
    raise _not_found(
        f"model {named!r} is not served at this URL, which serves {model_id(runtime)!r}; the "
        "server's /v1 serves every model by the body's model"
    )


def _find(named: str) -> LayerStreamRuntime | None:
    runtime = loaded.find(named)
    if runtime is None and ":" in named:
        name, version = named.rsplit(":", 1)
        runtime = loaded.find(name, version)
    return runtime


def _seldon_internal(named: str, model_name: str) -> bool:
    # under Seldon Core 2 the path holds the internal name <model>_<version>, while the
    # client sends <model>
    return re.fullmatch(re.escape(named) + r"_\d+", model_name) is not None


def _string(named: Any) -> str:
    if not isinstance(named, str):
        raise invalid(f"model must be a string, got {show(named)}", "model")
    return named


def _listing() -> str:
    return ", ".join(repr(i) for i in served_ids()) or "none is loaded"


def _not_found(message: str) -> OpenAIError:
    return OpenAIError(404, f"{message} (served: {_listing()})", "model_not_found", "model")
