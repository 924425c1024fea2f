"""Which MLServer front end a stream came in through: REST (SSE) or gRPC.

It decides how a failure reaches the client. Over SSE the 200 and its headers are sent
before the model runs, so a failure must be the stream's last event; over gRPC it is the
call's status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...). Headers cannot tell the two apart
for certain: a REST client picks its own user agent (``my-grpc-gateway/1.0``) and an
HTTP/1.0 request may have no Host header, and a wrong guess cut such a client's stream with
no error at all.

The signal used instead is the object MLServer itself hands over, which no client can
shape. MLServer 1.7's ``DataPlane.infer_stream`` passes ``predict_stream`` the generator
``_prepare_payloads_generator(first_payload, subsequent_payloads, model)``, and
``subsequent_payloads`` is the REST endpoint's ``payloads_generator`` (mlserver/rest/
endpoints.py) or the gRPC servicer's ``_PayloadsMetadataGenerator`` (mlserver/grpc/
servicers.py): their code objects name the transport. Any other structure (another
MLServer, a caller of our own) is UNKNOWN, and the runtime then sends errors as events,
which reach every client as data.
"""

from __future__ import annotations

import enum
import functools
import inspect
import sys
import types
from collections.abc import AsyncIterator


class Transport(enum.Enum):
    REST = "rest"
    GRPC = "grpc"
    UNKNOWN = "unknown"


@functools.cache
def _mlserver_codes() -> tuple[types.CodeType, dict[types.CodeType, Transport]]:
    """MLServer's wrapper generator, and the inner generator of each transport."""
    from mlserver.grpc.servicers import InferenceServicer
    from mlserver.handlers.dataplane import DataPlane
    from mlserver.rest.endpoints import Endpoints

    inner = {InferenceServicer._PayloadsMetadataGenerator.__code__: Transport.GRPC}
    for const in Endpoints.infer_stream.__code__.co_consts:
        if isinstance(const, types.CodeType) and const.co_name == "payloads_generator":
            inner[const] = Transport.REST
    return DataPlane._prepare_payloads_generator.__code__, inner


def transport_of(payloads: AsyncIterator) -> Transport:
    """The transport of the stream ``payloads`` (MLServer's request generator, after its
    first ``__anext__``), or UNKNOWN when it is not the structure described above."""
    wrapper, inner = _mlserver_codes()
    frame = getattr(payloads, "ag_frame", None)
    if getattr(payloads, "ag_code", None) is not wrapper or frame is None:
        return Transport.UNKNOWN  # not MLServer's wrapper, or finished (its locals are gone)
    code = getattr(frame.f_locals.get("subsequent_payloads"), "ag_code", None)
    return inner.get(code, Transport.UNKNOWN)


@functools.cache
def _request_gate() -> types.CodeType:
    from mlserver.handlers.dataplane import DataPlane

    return inspect.unwrap(DataPlane._infer_contextmanager).__code__


def asked_before_a_request(depth: int = 2) -> bool:
    """Whether the code ``depth`` frames up is MLServer's per-request readiness check
    (``DataPlane._infer_contextmanager``, for /infer, SSE and gRPC alike), as opposed to a
    health or readiness probe. MLServer asks the same ``model.ready`` for both; a model
    that must fail its probes yet still answer requests with a clear error (a damaged
    chunk store) needs to tell them apart, and the caller's code object says it for
    certain."""
    return sys._getframe(depth).f_code is _request_gate()
