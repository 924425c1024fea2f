"""gRPC client: ``ModelStreamInfer`` through MLServer's own generated stubs.

(tritonclient's stream API does not work against MLServer: it expects Triton's
``ModelStreamInferResponse`` wrapper, MLServer sends plain ``ModelInferResponse``.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc import dataplane_pb2_grpc as pb_grpc

from .events import (
    Final,
    HiddenState,
    ModelStatus,
    StreamError,
    StreamingClient,
    Token,
    parse_response,
    split_kind,
)


class GRPCStreamError(StreamError, grpc.RpcError):
    """A failed call whose status details carry a layerstream error kind: a StreamError
    (``error_type``, ``message``) that is still the grpc.RpcError it was (``code()``,
    ``details()``)."""

    def __init__(self, code: grpc.StatusCode, details: str, error_type: str, message: str):
        super().__init__(message, error_type)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _parameter(value: Any) -> pb.InferParameter:
    # gRPC has no float parameter: floats and lists travel as strings, which the server parses.
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, list):
        # layers as "0,-1"; stop strings as a JSON list (they may contain commas)
        if all(isinstance(v, int) for v in value):
            return pb.InferParameter(string_param=",".join(str(v) for v in value))
        return pb.InferParameter(string_param=json.dumps(value))
    return pb.InferParameter(string_param=str(value))


def to_grpc_request(model: str, request: dict[str, Any]) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model, id=request.get("id", ""))
    for item in request["inputs"]:
        tensor = message.inputs.add(
            name=item["name"], datatype=item["datatype"], shape=item["shape"]
        )
        if item["datatype"] == "BYTES":
            tensor.contents.bytes_contents.extend(s.encode() for s in item["data"])
            tensor.parameters["content_type"].string_param = "str"
        else:
            tensor.contents.int64_contents.extend(item["data"])
    for key, value in (request.get("parameters") or {}).items():
        message.parameters[key].CopyFrom(_parameter(value))
    return message


def _to_json(response: pb.ModelInferResponse) -> dict[str, Any]:
    params = {k: MessageToDict(v) for k, v in response.parameters.items()}
    out: dict[str, Any] = {"parameters": {}}
    for key, value in params.items():
        ((kind, raw),) = value.items()
        out["parameters"][key] = int(raw) if kind == "int64Param" else raw
    outputs = []
    for tensor in response.outputs:
        c = tensor.contents
        data: list[Any]
        if tensor.datatype == "BYTES":
            data = [b.decode() for b in c.bytes_contents]
        elif tensor.datatype.startswith("INT"):
            data = list(c.int64_contents) or list(c.int_contents)
        else:
            data = list(c.fp32_contents)
        outputs.append(
            {
                "name": tensor.name,
                "shape": list(tensor.shape),
                "datatype": tensor.datatype,
                "data": data,
            }
        )
    out["outputs"] = outputs
    return out


class GRPCClient(StreamingClient):
    index_errors = (grpc.RpcError,)

    def __init__(self, target: str = "127.0.0.1:8081", timeout: float = 300.0):
        self.target = target
        self.timeout = timeout

    def _channel(self) -> grpc.Channel:
        options = [("grpc.max_receive_message_length", 256 * 2**20)]
        return grpc.insecure_channel(self.target, options=options)

    def stream(self, model: str, request: dict[str, Any]) -> Iterator[Token | HiddenState | Final]:
        """Events as they arrive. A call the server failed with a layerstream error raises
        GRPCStreamError (a StreamError with ``error_type``, and a grpc.RpcError); a model the
        server does not serve raises ModelNotLoadedError; any other failed call (connection,
        deadline) raises the grpc.RpcError as it came."""
        started = False
        with self._channel() as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            calls = stub.ModelStreamInfer(
                iter([to_grpc_request(model, request)]), timeout=self.timeout
            )
            try:
                for response in calls:
                    for event in parse_response(_to_json(response)):
                        started = True
                        yield event
            except grpc.RpcError as exc:
                # MLServer's "Model x with version  not found": say what the server does serve
                code = exc.code() if hasattr(exc, "code") else None
                not_found = code == grpc.StatusCode.NOT_FOUND and not started
                if not_found and (error := self._not_loaded(model)):
                    raise error from exc
                details = exc.details() if hasattr(exc, "details") else None
                kind, message = split_kind(details or "")
                if kind is None:
                    raise
                raise GRPCStreamError(exc.code(), details, kind, message) from exc

    def models(self) -> list[ModelStatus]:
        """``RepositoryIndex``: every model the server knows, with its state."""
        with self._channel() as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=self.timeout)
        # MLServer writes the state as its Python enum prints: "State.READY"
        return [ModelStatus(m.name, m.state.removeprefix("State."), m.reason) for m in index.models]
