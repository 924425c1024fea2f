"""MLServer's parallel workers cannot serve layerstream: refuse them at once, naming the fix.

With ``parallel_workers`` above 0 (MLServer's default is 1, and Seldon Core v2's stock
ServerConfig leaves it there) MLServer 1.7 builds the model in the server process, then
hands it to worker processes (``mlserver/parallel/``) and answers requests through a
``ParallelModel``, which does not forward ``predict_stream``: a stream ends after one
response, produced by ``predict``. Worse, under uvloop 0.22 or later each worker dies at
start (``Worker._ignore_signals`` asks for an event loop that no longer exists) and is
restarted every second; a load is dispatched to a worker that has died, its reply never
comes, and ``RepositoryModelLoad`` waits until the client's deadline with nothing in the
log that names the cause.

:func:`refuse_parallel_workers` runs where MLServer builds the model. It recognises both
places from MLServer's own objects, not from process names:

- in the server process, the caller is ``InferencePoolRegistry.model_initialiser`` (it
  exists only when parallel workers are on) and MLServer's own ``_should_load_model``
  says this model goes to the workers (a model-level ``parallel_workers: 0`` keeps it in
  the server process, where it works);
- in a worker (reached only by models with an ``environment_tarball``, which the server
  process builds as a plain ``MLModel``), the current process is MLServer's ``Worker``.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys

from mlserver.settings import ModelSettings

from ..errors import SettingsError
from .grpc_status import MLServerIncompatible

log = logging.getLogger(__name__)

MESSAGE = (
    "MLServer is set to serve models from parallel worker processes (parallel_workers > 0: "
    "its default is 1, and Seldon Core v2's stock ServerConfig keeps it), where layerstream "
    "cannot work: the workers do not forward streams (a stream would end after one "
    "response), and with uvloop 0.22 or later MLServer 1.7's workers die at start, so the "
    "load would wait forever. Set MLSERVER_PARALLEL_WORKERS=0 in the server's environment "
    "(Seldon Core v2: the env of the 'mlserver' container in the Server's spec.podSpec), or "
    '"parallel_workers": 0 in settings.json, which takes precedence over the variable'
)
# frames between refuse_parallel_workers and InferencePoolRegistry.model_initialiser: the
# runtime's __init__ and mlserver.registry.model_initialiser, with room for subclasses
_CALLER_DEPTH = 8


def refuse_parallel_workers(settings: ModelSettings) -> None:
    """Raise SettingsError (FAILED_PRECONDITION, HTTP 422) if MLServer would serve the model
    with these settings from its parallel workers. Call it from the model's ``__init__``:
    MLServer never calls ``load()`` in the server process then, and in a worker it may
    never call it at all."""
    if not (_in_worker() or _handed_to_workers(settings)):
        return
    log.error("model %s: %s", settings.name, MESSAGE)
    raise SettingsError(MESSAGE)


def _in_worker() -> bool:
    from mlserver.parallel.worker import Worker

    # multiprocessing's spawn start sets the current process to the Worker it unpickled
    return isinstance(multiprocessing.current_process(), Worker)


def _handed_to_workers(settings: ModelSettings) -> bool:
    try:
        from mlserver.parallel.registry import InferencePoolRegistry

        initialiser = InferencePoolRegistry.model_initialiser.__code__
        InferencePoolRegistry._should_load_model  # noqa: B018  (what the check below calls)
    except (ImportError, AttributeError) as exc:
        raise MLServerIncompatible(
            "MLServer's parallel-worker registry is not what layerstream knows "
            f"(InferencePoolRegistry.model_initialiser, _should_load_model: {exc}); install "
            "mlserver 1.7.x"
        ) from exc
    frame = sys._getframe(1)
    for _ in range(_CALLER_DEPTH):
        if frame is None:
            return False
        if frame.f_code is initialiser:
            return bool(frame.f_locals["self"]._should_load_model(settings))
        frame = frame.f_back
    return False
