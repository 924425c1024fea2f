"""What MLServer 1.7's gRPC front end needs so that layerstream's errors keep their meaning.

1. Status codes. MLServer turns an MLServerError into a gRPC status through
   ``mlserver.grpc.utils.STATUS_CODE_MAPPING`` (HTTP status -> gRPC code), which knows only
   400, 404, 422 and 500: a full queue (503) or a deadline (504) became UNKNOWN, which a
   gRPC client cannot act on. :func:`install` adds 502 -> UNAVAILABLE (the chunk store),
   503 -> RESOURCE_EXHAUSTED (retry later) and 504 -> DEADLINE_EXCEEDED. MLServer reads the
   mapping on every error (``_grpc_status_code``), so extending the dict is enough; there is
   no other hook, since the status is set by MLServer's servicer around ``predict_stream``.

2. Load statuses. A model that fails to load through the repository API
   (``RepositoryModelLoad``, how Seldon Core v2's agent loads models) took the status of the
   same error at inference: a missing store was UNAVAILABLE and a damaged manifest INTERNAL,
   which read as "retry" and "server bug" (and Seldon's agent retries UNAVAILABLE calls). At
   load nearly every layerstream error says the model as configured cannot load (settings,
   the store's address or credentials, its manifest and chunks): FAILED_PRECONDITION. A
   store that could not be reached in time keeps UNAVAILABLE (the same load may work in a
   moment) and kind ``internal`` keeps INTERNAL. MLServer's servicers look
   ``_grpc_status_code`` up when a call fails, so replacing it serves the load that is
   failing now too; a failure is a load's when it came out of MLServer's repository load
   handler.

3. Request conversion. MLServer converts the gRPC message to its types before any model
   code runs, so a malformed message failed inside MLServer as INTERNAL: raw_input_contents
   whose byte length does not match the input's shape and datatype (``struct.error``), fewer
   raw contents than inputs (``IndexError``), parameters its pydantic model rejects. The
   converter is wrapped so these are INVALID_ARGUMENT errors that name the input.

All are process-wide and only turn failures into clearer ones; :func:`install` is
idempotent, and it fails the load loudly if MLServer no longer has what it extends.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import struct
import threading
import types
from typing import Any

import grpc
from pydantic import ValidationError

from ..errors import ChunkStoreError, InvalidRequest, LayerStreamError
from ..stores.ranged import Transient

log = logging.getLogger(__name__)

EXTRA_STATUS_CODES = {
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.RESOURCE_EXHAUSTED,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# element sizes of MLServer's raw (little-endian, packed) tensor encoding, mlserver/raw.py
_ITEM_BYTES = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "FP32": 4,
    "FP64": 8,
}
_lock = threading.Lock()


class MLServerIncompatible(LayerStreamError):
    """This MLServer lacks what layerstream extends: pin mlserver 1.7.x."""


def install() -> None:
    """Extend MLServer's gRPC status mapping, its statuses of failed loads and its request
    converter (once per process)."""
    with _lock:
        _extend_status_codes()
        _give_loads_their_status()
        _wrap_request_converter()


def load_status(error: LayerStreamError) -> grpc.StatusCode:
    """The gRPC status of a model load that failed with ``error`` (see the module notes)."""
    if error.kind == "internal":
        return grpc.StatusCode.INTERNAL
    if isinstance(error, ChunkStoreError) and isinstance(error.__cause__, Transient):
        # the store did not answer before the read's deadline (ranged.py): a moment later
        # the same load may work
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.FAILED_PRECONDITION


def _extend_status_codes() -> None:
    from mlserver.grpc import utils

    mapping = getattr(utils, "STATUS_CODE_MAPPING", None)
    reader = getattr(utils, "_grpc_status_code", None)
    if reader is not None:
        reader = inspect.unwrap(reader)  # MLServer's own, under ours once installed
    if (
        not isinstance(mapping, dict)
        or mapping.get(400) != grpc.StatusCode.INVALID_ARGUMENT
        or reader is None
        or "STATUS_CODE_MAPPING" not in reader.__code__.co_names
    ):
        raise MLServerIncompatible(
            "mlserver.grpc.utils.STATUS_CODE_MAPPING (read by _grpc_status_code) is not what "
            "MLServer 1.7 has; layerstream needs it to give overload, timeout and store errors "
            "their gRPC status. Install mlserver 1.7.x"
        )
    for status, code in EXTRA_STATUS_CODES.items():
        if mapping.setdefault(status, code) != code:
            raise MLServerIncompatible(
                f"MLServer maps HTTP {status} to {mapping[status]}, layerstream expects {code}; "
                "install mlserver 1.7.x"
            )


def _give_loads_their_status() -> None:
    from mlserver.grpc import utils
    from mlserver.handlers.model_repository import ModelRepositoryHandlers

    current = utils._grpc_status_code
    if getattr(current, "layerstream_load_status", False):
        return
    inner = [c for c in utils.handle_mlserver_error.__code__.co_consts if _is_code(c)]
    if not any("_grpc_status_code" in code.co_names for code in inner):
        raise MLServerIncompatible(
            "mlserver.grpc.utils.handle_mlserver_error no longer reads _grpc_status_code "
            "when a call fails; layerstream needs it to give failed model loads their gRPC "
            "status. Install mlserver 1.7.x"
        )
    load = ModelRepositoryHandlers.load.__code__

    @functools.wraps(current)
    def _grpc_status_code(err):
        if isinstance(err, LayerStreamError) and _passed_through(err, load):
            return load_status(err)
        return current(err)

    _grpc_status_code.layerstream_load_status = True
    utils._grpc_status_code = _grpc_status_code


def _is_code(value: Any) -> bool:
    return isinstance(value, types.CodeType)


def _passed_through(error: BaseException, code: types.CodeType) -> bool:
    """Whether ``error`` was raised below a frame running ``code`` (its traceback, from the
    frame that caught it down to the raise)."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is code:
            return True
        tb = tb.tb_next
    return False


def _wrap_request_converter() -> None:
    from mlserver.grpc.converters import ModelInferRequestConverter

    original = ModelInferRequestConverter.__dict__.get("to_types")
    if getattr(getattr(original, "__func__", None), "layerstream_checked", False):
        return
    if not isinstance(original, classmethod):
        raise MLServerIncompatible(
            "mlserver.grpc.converters.ModelInferRequestConverter.to_types is not the "
            "classmethod MLServer 1.7 has; install mlserver 1.7.x"
        )
    convert = original.__func__

    def to_types(cls, pb_object):
        check_raw_contents(pb_object)
        try:
            return convert(cls, pb_object)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise InvalidRequest(f"the gRPC request does not convert: {problems}") from None

    to_types.layerstream_checked = True
    ModelInferRequestConverter.to_types = classmethod(to_types)


def check_raw_contents(pb_object: Any) -> None:
    """What ``mlserver.raw.inject_raw`` assumes, checked: each input without contents takes
    the next raw_input_contents entry, whose size must match its shape and datatype; an
    input has one contents field; no raw entry is left over."""
    for tensor in pb_object.inputs:
        fields = [f.name for f, _ in tensor.contents.ListFields()]
        if len(fields) > 1:  # MLServer would read the first and drop the rest unseen
            raise InvalidRequest(
                f"input {tensor.name!r} has contents in {', '.join(fields)}; send one"
            )
    raw = list(pb_object.raw_input_contents)
    if not raw:
        return
    index = 0
    for tensor in pb_object.inputs:
        if tensor.contents.ListFields():
            continue  # MLServer reads raw contents only for inputs without contents
        name = tensor.name
        if index >= len(raw):
            raise InvalidRequest(
                f"input {name!r} has no contents and raw_input_contents has no entry "
                f"{index} for it; send one raw entry per input without contents"
            )
        shape = list(tensor.shape)
        if any(d < 0 for d in shape):
            raise InvalidRequest(f"input {name!r} has shape {shape}; dimensions must be >= 0")
        count = math.prod(shape)
        data = raw[index]
        if tensor.datatype == "BYTES":
            found = _bytes_elements(name, data)
            if found != count:
                raise InvalidRequest(
                    f"input {name!r}: raw_input_contents[{index}] holds {found} BYTES "
                    f"elements, shape {shape} declares {count}"
                )
        elif tensor.datatype in _ITEM_BYTES:
            need = count * _ITEM_BYTES[tensor.datatype]
            if len(data) != need:
                raise InvalidRequest(
                    f"input {name!r}: raw_input_contents[{index}] is {len(data)} bytes; shape "
                    f"{shape} of {tensor.datatype} takes {need}"
                )
        else:
            raise InvalidRequest(f"input {name!r} has unknown datatype {tensor.datatype!r}")
        index += 1
    if index != len(raw):
        raise InvalidRequest(
            f"raw_input_contents has {len(raw)} entries for {index} input(s) without contents"
        )


def _bytes_elements(name: str, data: bytes) -> int:
    """Elements in a raw BYTES tensor: each a 4-byte little-endian length, then the bytes."""
    offset = count = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise InvalidRequest(
                f"input {name!r}: raw BYTES contents end inside a 4-byte length prefix"
            )
        (size,) = struct.unpack_from("<I", data, offset)
        offset += 4 + size
        if offset > len(data):
            raise InvalidRequest(
                f"input {name!r}: a raw BYTES element claims {size} bytes, more than remain"
            )
        count += 1
    return count
