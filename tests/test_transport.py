"""How the runtime tells REST from gRPC, and what it adds to MLServer's gRPC front end.

The real transports are exercised end to end (test_errors.py, test_fuzz.py,
test_overload.py); here: the structures ``transport_of`` recognises, built from MLServer's
own generator functions, and the ones it must not guess about.
"""

from __future__ import annotations

import asyncio
import struct
import types

import grpc
import pytest
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc import utils as grpc_utils
from mlserver.grpc.converters import ModelInferRequestConverter
from mlserver.grpc.servicers import InferenceServicer
from mlserver.handlers.dataplane import DataPlane
from mlserver.rest.endpoints import Endpoints
from mlserver.types import InferenceRequest

from layerstream.errors import (
    ChunkIntegrityError,
    ChunkStoreError,
    InvalidRequest,
    RequestTimeout,
    ServerBusy,
)
from layerstream.serving import grpc_status
from layerstream.serving.transport import Transport, transport_of

# MLServer's converter uses pydantic's deprecated ``construct``: its warning, not ours
pytestmark = pytest.mark.filterwarnings("ignore:The `construct` method is deprecated")

PAYLOAD = InferenceRequest(
    inputs=[{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["x"]}]
)


class _Hooks:
    """What MLServer's generators call on ``self``: payload preparation, header insertion."""

    def _prepare_payload(self, payload, model):
        return payload

    def _InsertHeaders(self, request, context):
        return PAYLOAD


def _rest_inner():
    """The REST endpoint's own nested ``payloads_generator``, rebuilt from its code."""
    (code,) = [
        c
        for c in Endpoints.infer_stream.__code__.co_consts
        if isinstance(c, types.CodeType) and c.co_name == "payloads_generator"
    ]
    return types.FunctionType(code, Endpoints.infer_stream.__globals__)(PAYLOAD)


async def _plain(payload):
    yield payload


async def _first_then_transport(payloads) -> Transport:
    await payloads.__anext__()
    return transport_of(payloads)


def _through_dataplane(inner) -> Transport:
    wrapper = DataPlane._prepare_payloads_generator(_Hooks(), PAYLOAD, inner, None)
    return asyncio.run(_first_then_transport(wrapper))


def test_mlserver_rest_structure_is_rest():
    assert _through_dataplane(_rest_inner()) is Transport.REST


def test_mlserver_grpc_structure_is_grpc():
    inner = InferenceServicer._PayloadsMetadataGenerator(_Hooks(), None, _plain(None), None)
    assert _through_dataplane(inner) is Transport.GRPC


def test_another_inner_generator_is_unknown():
    assert _through_dataplane(_plain(PAYLOAD)) is Transport.UNKNOWN


def test_anything_but_mlservers_wrapper_is_unknown():
    assert asyncio.run(_first_then_transport(_plain(PAYLOAD))) is Transport.UNKNOWN
    # MLServer's gRPC generator handed over directly, without DataPlane's wrapper
    direct = InferenceServicer._PayloadsMetadataGenerator(_Hooks(), None, _plain(None), None)
    assert asyncio.run(_first_then_transport(direct)) is Transport.UNKNOWN


def test_a_finished_wrapper_is_unknown():
    async def drain():
        wrapper = DataPlane._prepare_payloads_generator(_Hooks(), PAYLOAD, _rest_inner(), None)
        return [p async for p in wrapper], transport_of(wrapper)

    payloads, transport = asyncio.run(drain())
    assert len(payloads) == 2 and transport is Transport.UNKNOWN


# -- gRPC status codes -----------------------------------------------------------------------


def test_install_maps_every_kind_to_its_grpc_status_and_is_idempotent():
    grpc_status.install()
    grpc_status.install()
    expected = {
        InvalidRequest("x"): grpc.StatusCode.INVALID_ARGUMENT,
        ServerBusy("x"): grpc.StatusCode.RESOURCE_EXHAUSTED,
        RequestTimeout("x"): grpc.StatusCode.DEADLINE_EXCEEDED,
        ChunkStoreError("x"): grpc.StatusCode.UNAVAILABLE,
        ChunkIntegrityError("x"): grpc.StatusCode.INTERNAL,
    }
    for error, code in expected.items():
        assert grpc_utils._grpc_status_code(error) == code, error.kind
    assert ModelInferRequestConverter.to_types.__func__.layerstream_checked


# -- raw contents, checked before MLServer unpacks them ---------------------------------------


def _request(datatype: str, shape: list[int], raw: list[bytes], name: str = "input_ids"):
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name=name, datatype=datatype, shape=shape)
    message.raw_input_contents.extend(raw)
    return message


@pytest.mark.parametrize(
    ("message", "words"),
    [
        (_request("INT64", [3], [b"\0" * 20]), "20 bytes; shape [3] of INT64 takes 24"),
        (_request("INT32", [2], [b"\0" * 12]), "12 bytes; shape [2] of INT32 takes 8"),
        (_request("INT64", [-1], [b"\0" * 8]), "dimensions must be >= 0"),
        (_request("FOO", [1], [b"\0" * 8]), "unknown datatype 'FOO'"),
        (_request("BYTES", [1], [struct.pack("<I", 9) + b"ab"], "prompt"), "claims 9 bytes"),
        (_request("BYTES", [1], [b"\x01\x00"], "prompt"), "inside a 4-byte length prefix"),
        (
            _request("BYTES", [1], [struct.pack("<I", 1) + b"a" + struct.pack("<I", 0)], "prompt"),
            "holds 2 BYTES elements, shape [1] declares 1",
        ),
    ],
)
def test_raw_contents_that_disagree_with_shape_and_datatype_are_invalid(message, words):
    grpc_status.install()
    with pytest.raises(InvalidRequest, match=words.replace("[", r"\[").replace("]", r"\]")):
        ModelInferRequestConverter.to_types(message)


def test_raw_contents_missing_for_an_input_are_invalid():
    grpc_status.install()
    message = _request("BYTES", [1], [struct.pack("<I", 2) + b"hi"], "prompt")
    message.inputs.add(name="input_ids", datatype="INT64", shape=[1])
    with pytest.raises(InvalidRequest, match="no entry 1 for it"):
        ModelInferRequestConverter.to_types(message)


def test_raw_contents_that_agree_convert_as_mlserver_converts_them():
    grpc_status.install()
    ids = _request("INT64", [3], [struct.pack("<3q", 5, 6, 7)])
    assert ModelInferRequestConverter.to_types(ids).inputs[0].data.root == [5, 6, 7]
    prompt = _request("BYTES", [1], [struct.pack("<I", 2) + b"hi"], "prompt")
    assert ModelInferRequestConverter.to_types(prompt).inputs[0].data.root == [b"hi"]


def test_parameters_mlserver_cannot_type_are_invalid():
    grpc_status.install()
    message = _request("INT64", [1], [struct.pack("<q", 5)])
    message.parameters["content_type"].int64_param = 3
    with pytest.raises(InvalidRequest, match="content_type"):
        ModelInferRequestConverter.to_types(message)
