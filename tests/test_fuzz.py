"""Hostile requests against one real ``mlserver start``: each gets a clean answer.

Every case is a request a client can send and MLServer's own schema accepts, so it reaches
the runtime (or MLServer's gRPC converter) and must be refused there with a message and a
kind: over SSE a 200 stream whose only event has ``finish_reason: "error"``, a message and
``error_type: "invalid_request"``; over gRPC (MLServer's stubs, and raw protobuf bytes for
what MLServer's proto cannot express, such as KServe's ``double_param``) the status
INVALID_ARGUMENT with details ``"invalid_request: ..."``; over ``/infer`` a 400 with
``{"error": "invalid_request: ..."}``. Never a 500, INTERNAL, a cut stream or a success.
After every case the server is live and ready; good requests are exact after each batch
and at the end (more than 16 tokens, so a silent cap on max_new_tokens would show).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from httpx_sse import connect_sse
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc import dataplane_pb2_grpc as pb_grpc
from mlserver_proc import BERT, LLAMA, LLAMA_25, MAX_NEW_TOKENS_LIMIT, ids_input, prompt_input
from test_e2e import Reference

pytest_plugins = ["mlserver_proc"]
pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time"
GOOD_TOKENS = 20  # > 16: a max_new_tokens silently capped at 16 would fail the exactness check
BATCH = 25  # cases between two exactness checks
INT64_MAX = 2**63 - 1
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


@dataclass(frozen=True)
class Case:
    """One bad request. ``request`` is V2 JSON (sent as is over REST, converted for gRPC);
    ``body`` is raw JSON text (REST only: NaN, null); ``grpc`` builds the protobuf message or
    its bytes (gRPC only). ``words`` must all appear in the error message."""

    id: str
    words: tuple[str, ...]
    model: str = LLAMA
    request: dict[str, Any] | None = None
    body: str | None = None
    grpc: Callable[[str], pb.ModelInferRequest | bytes] | None = None


def hi(**params: Any) -> dict[str, Any]:
    """A request for the prompt "hi": two new tokens, unless in a mode that generates none
    (where max_new_tokens would be refused as not applying)."""
    short = {} if params.get("mode") in ("hidden_states", "embedding") else {"max_new_tokens": 2}
    return {"inputs": [prompt_input("hi")], "parameters": {**short, **params}}


# -- parameters: types, ranges, non-finite numbers, overflow ---------------------------------

BAD_VALUES: dict[str, list[Any]] = {
    "max_new_tokens": [0, -1, 10**30, 2**63, 1.5, "lots", "", "1e3", True, [4], {"n": 4}],
    "temperature": [-1, -0.0001, 1e-300, "1e-300", 0.001, 1000, 1e308, "nan", "NaN", "inf"],
    "top_p": [0, -0.1, 1.5, "nan", "inf", "x", True, [0.5]],
    "top_k": [-1, 10**30, "x", 1.5, True, "1.0"],
    "seed": [10**30, 2**64, -(2**63) - 1, str(2**64), "x", 1.5, "1e3", "9" * 5000],
    "repetition_penalty": ["nan", "inf", "-inf", 1e-300, 0, -1, 1000, "x", False],
    "do_sample": ["maybe", 2, -1, [], "yes", {"a": 1}],
    "stop": ["", [""], 5, ["x"] * 17, "y" * 257, [1, 2], {"a": "b"}, ["ok", "z" * 300]],
    "timeout": [0, -5, "soon", 1.5, 2**64, "1e6", True],
    "mode": ["summarise", "", 5, ["tokens"], "TOKENS", "embeddings"],
}
HIDDEN_BAD_LAYERS: list[Any] = [[13], "0,-14", "", ",", "a,b", [[0]], list(range(30)), True, 1.5]
BAD_POOLINGS: list[Any] = ["max", 3, "pooler", "", ["mean"]]  # llama has no pooler
UNKNOWN_NAMES = ["temprature", "max_tokens", "", " ", "top-p", "MAX_NEW_TOKENS", "timeout_s"]


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


def parameter_cases() -> list[Case]:
    cases = []
    for name, values in BAD_VALUES.items():
        for value in values:
            cases.append(Case(f"{name}={_show(value)}", (name,), request=hi(**{name: value})))
    cases.append(
        Case(
            "temperature=0+do_sample",
            ("temperature 0", "do_sample"),
            request=hi(temperature=0, do_sample=True),
        )
    )
    cases.append(
        Case(
            f"max_new_tokens>limit {MAX_NEW_TOKENS_LIMIT}",
            ("max_new_tokens", str(MAX_NEW_TOKENS_LIMIT)),
            model=LLAMA_25,
            request=hi(max_new_tokens=MAX_NEW_TOKENS_LIMIT + 1),
        )
    )
    for value in HIDDEN_BAD_LAYERS:
        request = hi(mode="hidden_states", layers=value)
        cases.append(Case(f"layers={_show(value)}", ("layer",), request=request))
    for value in BAD_POOLINGS:
        request = hi(mode="embedding", pooling=value)
        cases.append(Case(f"pooling={_show(value)}", ("pooling",), request=request))
    for name in UNKNOWN_NAMES:
        cases.append(Case(f"unknown {name!r}", ("unknown parameter",), request=hi(**{name: 1})))
    cases.append(Case("mode tokens on bert", ("cannot do mode",), BERT, hi(mode="tokens")))
    # a parameter of another mode would be ignored, and a caller would think it honoured
    for name, value, mode in [
        ("layers", "0", "tokens"),
        ("pooling", "cls", "tokens"),
        ("temperature", 0.5, "embedding"),
        ("stop", "x", "hidden_states"),
        ("seed", 1, "embedding"),
    ]:
        request = hi(mode=mode, **{name: value})
        cases.append(Case(f"{name} in mode {mode}", ("do not apply", name), request=request))
    # the id comes back in headers and gRPC metadata: refused before the work is done
    for request_id in ["\u202e", "a\nb", "\x00", " lead", "ü", "x" * 300, "tab\there"]:
        cases.append(
            Case(
                f"id {_show(request_id)}",
                ("request id", "ASCII"),
                request=dict(hi(), id=request_id),
            )
        )
    prompt = dict(prompt_input("aGk="), parameters={"content_type": "base64"})
    cases.append(
        Case(
            "prompt content_type base64",
            ("content_type", "base64"),
            request={"inputs": [prompt], "parameters": {"max_new_tokens": 2}},
        )
    )
    return cases


# -- inputs: shapes, datatypes, encodings, missing and duplicate ------------------------------


def tensor(name: str, datatype: str, shape: list[int], data: Any) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


LONG = [(7 * i) % 300 + 5 for i in range(200)]  # context of the fixture models: 128
INPUT_CASES: list[tuple[str, tuple[str, ...], list[dict[str, Any]]]] = [
    ("no inputs", ("no inputs",), []),
    ("prompt twice", ("appears 2 times",), [prompt_input("a"), prompt_input("b")]),
    ("ids twice", ("appears 2 times",), [ids_input([1]), ids_input([2])]),
    ("prompt and ids", ("not both",), [prompt_input("a"), ids_input([1])]),
    ("input named text", ("unknown input", "text"), [tensor("text", "BYTES", [1], ["hi"])]),
    ("input named PROMPT", ("unknown input",), [tensor("PROMPT", "BYTES", [1], ["hi"])]),
    ("input named ''", ("unknown input",), [tensor("", "BYTES", [1], ["hi"])]),
    ("prompt as INT64", ("prompt", "BYTES"), [tensor("prompt", "INT64", [2], [5, 6])]),
    ("prompt as FP32", ("prompt", "BYTES"), [tensor("prompt", "FP32", [1], [0.5])]),
    ("prompt as BOOL", ("prompt", "BYTES"), [tensor("prompt", "BOOL", [1], [True])]),
    ("prompt shape [5]", ("prompt", "shape"), [tensor("prompt", "BYTES", [5], ["hi"])]),
    ("prompt shape [0]", ("prompt", "shape"), [tensor("prompt", "BYTES", [0], [])]),
    ("prompt shape [-1]", ("prompt", "shape"), [tensor("prompt", "BYTES", [-1], ["hi"])]),
    ("prompt no data", ("prompt", "one string"), [tensor("prompt", "BYTES", [1], [])]),
    ("prompt two strings", ("prompt", "one string"), [tensor("prompt", "BYTES", [1], ["a", "b"])]),
    ("prompt empty", ("prompt", "empty"), [prompt_input("")]),
    ("prompt blank", ("prompt", "empty"), [prompt_input(" \n\t ")]),
    ("prompt 20 KB", ("prompt", "bytes", "limit"), [prompt_input("word " * 4000)]),
    (
        "ids [5] with 3",
        ("input_ids", "shape [5]", "carries 3"),
        [tensor("input_ids", "INT64", [5], [1, 2, 3])],
    ),
    ("ids [2] with 3", ("input_ids", "carries 3"), [tensor("input_ids", "INT64", [2], [1, 2, 3])]),
    (
        "ids [1,3] with 2",
        ("input_ids", "carries 2"),
        [tensor("input_ids", "INT64", [1, 3], [[1, 2]])],
    ),
    ("ids as FP32", ("input_ids", "INT64"), [tensor("input_ids", "FP32", [2], [1.0, 2.0])]),
    ("ids as BYTES", ("input_ids", "INT64"), [tensor("input_ids", "BYTES", [1], ["1"])]),
    (
        "ids 1.0 under INT64",
        ("input_ids", "integers", "1.0"),
        [tensor("input_ids", "INT64", [2], [1.0, 2.0])],
    ),
    (
        "ids 2.5 under INT64",
        ("input_ids", "integers"),
        [tensor("input_ids", "INT64", [2], [1, 2.5])],
    ),
    ("ids negative", ("outside the vocabulary",), [ids_input([-1, 5])]),
    ("ids >= vocab", ("outside the vocabulary",), [ids_input([5, 320])]),
    ("ids int64 max", ("outside the vocabulary",), [ids_input([INT64_MAX])]),
    ("ids empty", ("input_ids", "empty"), [tensor("input_ids", "INT64", [0], [])]),
    (
        "ids shape [2,2]",
        ("input_ids", "shape"),
        [tensor("input_ids", "INT64", [2, 2], [1, 2, 3, 4])],
    ),
    (
        "ids shape [1,1,3]",
        ("input_ids", "shape"),
        [tensor("input_ids", "INT64", [1, 1, 3], [1, 2, 3])],
    ),
    ("ids over context", ("200 tokens", "context", "128"), [ids_input(LONG)]),
    ("ids + new tokens over context", ("120 tokens", "context"), [ids_input(LONG[:120])]),
]


def input_cases() -> list[Case]:
    cases = []
    for name, words, inputs in INPUT_CASES:
        request: dict[str, Any] = {"inputs": inputs, "parameters": {"max_new_tokens": 16}}
        cases.append(Case(name, words, request=request))
    return cases


# -- REST only: JSON that gRPC cannot carry (NaN literals, null values) ------------------------

REST_BODIES: list[tuple[str, tuple[str, ...], str]] = (
    [
        (
            f"{name}={literal}",
            (name,),
            f'{{"inputs": [{json.dumps(prompt_input("hi"))}], '
            f'"parameters": {{"{name}": {literal}}}}}',
        )
        for name, literal in [
            ("temperature", "null"),
            ("max_new_tokens", "null"),
            ("stop", "null"),
            ("timeout", "null"),
            ("seed", "-9223372036854775809"),  # orjson reads it as a float: -(2**63)
            ("seed", "18446744073709551616"),
            ("top_k", "1e19"),
        ]
    ]
    + [
        (
            f"prompt [{literal}]",
            ("prompt", "string"),
            f'{{"inputs": [{{"name": "prompt", '
            f'"datatype": "BYTES", "shape": [1], "data": [{literal}]}}]}}',
        )
        for literal in ["null", "5", "true", '{"a": 1}', "[null]", "1.5"]
    ]
    + [
        (
            f"ids [{literal}]",
            ("input_ids", "integers"),
            f'{{"inputs": [{{"name": "input_ids", '
            f'"datatype": "INT64", "shape": [1], "data": [{literal}]}}]}}',
        )
        for literal in ["null", '"1"', "true", "1e3"]
    ]
)


def rest_cases() -> list[Case]:
    return [Case(f"json {name}", words, body=body) for name, words, body in REST_BODIES]


# -- gRPC only: bytes, raw contents and parameters MLServer's proto cannot express ------------


Tensor = pb.ModelInferRequest.InferInputTensor


def grpc_message(
    model: str,
    inputs: list[Tensor] | None = None,
    raw: list[bytes] | None = None,
    **params: pb.InferParameter,
) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model)
    message.inputs.extend(
        [tensor_pb("prompt", "BYTES", [1], bytes_contents=[b"hi"])] if inputs is None else inputs
    )
    message.raw_input_contents.extend(raw or [])
    message.parameters["max_new_tokens"].int64_param = 2
    for key, value in params.items():
        message.parameters[key].CopyFrom(value)
    return message


def tensor_pb(name: str, datatype: str, shape: list[int], **contents: list) -> Tensor:
    """A gRPC input tensor; ``contents`` names one InferTensorContents field, or none (raw)."""
    t = Tensor(name=name, datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(t.contents, field).extend(values)
    return t


def prompt_pb(value: bytes) -> list[Tensor]:
    return [tensor_pb("prompt", "BYTES", [1], bytes_contents=[value])]


def ids_pb(
    datatype: str = "INT64", shape: list[int] | None = None, **contents: list
) -> list[Tensor]:
    (values,) = contents.values()
    return [tensor_pb("input_ids", datatype, shape or [len(values)], **contents)]


def framed(*elements: bytes) -> bytes:
    """A raw BYTES tensor as MLServer and Triton pack it: a 4-byte length, then the bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    if wire == 2:  # length-delimited
        payload = _varint(len(payload)) + payload
    return _varint(number << 3 | wire) + payload


def kserve_parameter(name: str, value_field: bytes) -> Callable[[str], bytes]:
    """A request carrying parameter ``name`` as KServe's/Triton's proto encodes a field that
    MLServer's InferParameter lacks (double_param = 4, uint64_param = 5), as raw bytes."""

    def build(model: str) -> bytes:
        entry = _field(1, 2, name.encode()) + _field(2, 2, value_field)
        # ModelInferRequest.parameters is field 4; a map entry appended to the message
        return grpc_message(model).SerializeToString() + _field(4, 2, entry)

    return build


DOUBLE_05 = _field(4, 1, struct.pack("<d", 0.5))  # double_param: 0.5
UINT64_7 = _field(5, 0, _varint(7))  # uint64_param: 7
EMPTY = pb.InferParameter()


def _raw(inputs: list[Tensor], raw: list[bytes]) -> Callable[[str], pb.ModelInferRequest]:
    return lambda model: grpc_message(model, inputs, raw)


def _inputs(inputs: list[Tensor]) -> Callable[[str], pb.ModelInferRequest]:
    return lambda model: grpc_message(model, inputs)


def _params(**params: pb.InferParameter) -> Callable[[str], pb.ModelInferRequest]:
    return lambda model: grpc_message(model, **params)


GRPC_SPECS: list[tuple[str, tuple[str, ...], Callable[[str], Any]]] = [
    ("prompt bytes ff fe", ("prompt", "UTF-8", "0xff"), _inputs(prompt_pb(b"\xff\xfe"))),
    ("prompt cut character", ("prompt", "UTF-8"), _inputs(prompt_pb(b"ok\xc3"))),
    ("prompt overlong NUL", ("prompt", "UTF-8"), _inputs(prompt_pb(b"\xc0\x80"))),
    ("prompt surrogate", ("prompt", "UTF-8"), _inputs(prompt_pb(b"\xed\xa0\x80"))),
    ("prompt stray continuation", ("prompt", "UTF-8"), _inputs(prompt_pb(b"a\x80b"))),
    (
        "prompt shape [-1]",
        ("prompt", "shape"),
        _inputs([tensor_pb("prompt", "BYTES", [-1], bytes_contents=[b"hi"])]),
    ),
    (
        "prompt datatype FOO",
        ("prompt", "BYTES", "FOO"),
        _inputs([tensor_pb("prompt", "FOO", [1], bytes_contents=[b"hi"])]),
    ),
    ("ids fp32_contents", ("input_ids", "integers"), _inputs(ids_pb(fp32_contents=[1.0, 2.0]))),
    ("ids fp64_contents", ("input_ids", "integers"), _inputs(ids_pb(fp64_contents=[1.0]))),
    ("ids bytes_contents", ("input_ids", "integers"), _inputs(ids_pb(bytes_contents=[b"1"]))),
    ("ids bool_contents", ("input_ids", "integers"), _inputs(ids_pb(bool_contents=[True]))),
    (
        "ids uint64 max",
        ("outside the vocabulary",),
        _inputs(ids_pb(uint64_contents=[2**64 - 1])),
    ),
    (
        "ids INT32 [4] with 2",
        ("input_ids", "carries 2"),
        _inputs(ids_pb("INT32", [4], int_contents=[1, 2])),
    ),
    (
        "raw ids 20 bytes for [3]",
        ("input_ids", "raw_input_contents", "20 bytes"),
        _raw([tensor_pb("input_ids", "INT64", [3])], [b"\x01" * 20]),
    ),
    (
        "raw ids 32 bytes for [3]",
        ("input_ids", "32 bytes", "takes 24"),
        _raw([tensor_pb("input_ids", "INT64", [3])], [b"\x01" * 32]),
    ),
    (
        "raw ids shape [-3]",
        ("input_ids", "shape"),
        _raw([tensor_pb("input_ids", "INT64", [-3])], [b"\x01" * 24]),
    ),
    (
        "raw ids datatype FOO",
        ("input_ids", "datatype", "FOO"),
        _raw([tensor_pb("input_ids", "FOO", [1])], [b"\x01" * 8]),
    ),
    (
        "raw ids as FP32",
        ("input_ids", "INT64", "FP32"),
        _raw([tensor_pb("input_ids", "FP32", [2])], [struct.pack("<2f", 1.0, 2.0)]),
    ),
    (
        "raw prompt length past the end",
        ("prompt", "claims 100 bytes"),
        _raw([tensor_pb("prompt", "BYTES", [1])], [struct.pack("<I", 100) + b"hi"]),
    ),
    (
        "raw prompt cut length prefix",
        ("prompt", "length prefix"),
        _raw([tensor_pb("prompt", "BYTES", [1])], [b"\x02\x00"]),
    ),
    (
        "raw prompt two elements",
        ("prompt", "holds 2", "declares 1"),
        _raw([tensor_pb("prompt", "BYTES", [1])], [framed(b"a", b"b")]),
    ),
    (
        "raw prompt not UTF-8",
        ("prompt", "UTF-8"),
        _raw([tensor_pb("prompt", "BYTES", [1])], [framed(b"\xff")]),
    ),
    (
        "raw two inputs, one entry",
        ("input_ids", "no entry 1"),
        _raw(
            [tensor_pb("prompt", "BYTES", [1]), tensor_pb("input_ids", "INT64", [1])],
            [framed(b"hi")],
        ),
    ),
    (
        "ids int64 and fp32 contents",
        ("input_ids", "int64_contents", "fp32_contents"),
        _inputs(
            [tensor_pb("input_ids", "INT64", [2], int64_contents=[1, 2], fp32_contents=[3.0, 4.0])]
        ),
    ),
    (
        "raw contents one entry too many",
        ("raw_input_contents", "2 entries"),
        _raw([tensor_pb("prompt", "BYTES", [1])], [framed(b"hi"), framed(b"yo")]),
    ),
    (
        "id not ASCII",
        ("request id", "ASCII"),
        lambda model: _with_id(grpc_message(model), "ü"),
    ),
    (
        "temperature without a value",
        ("'temperature'", "without a value", "string"),
        _params(temperature=EMPTY),
    ),
    ("max_new_tokens without a value", ("'max_new_tokens'",), _params(max_new_tokens=EMPTY)),
    ("seed without a value", ("'seed'", "without a value"), _params(seed=EMPTY)),
    (
        "KServe double_param temperature",
        ("'temperature'", "without a value", "double_param"),
        kserve_parameter("temperature", DOUBLE_05),
    ),
    ("KServe double_param top_p", ("'top_p'",), kserve_parameter("top_p", DOUBLE_05)),
    ("KServe uint64_param seed", ("'seed'",), kserve_parameter("seed", UINT64_7)),
    (
        "headers parameter as a string",
        ("headers",),
        _params(headers=pb.InferParameter(string_param="x")),
    ),
    (
        "content_type parameter as an int",
        ("content_type",),
        _params(content_type=pb.InferParameter(int64_param=3)),
    ),
    (
        "temperature as a string 'inf'",
        ("temperature", "finite"),
        _params(temperature=pb.InferParameter(string_param="inf")),
    ),
    (
        "seed int64 min - 1 as a string",
        ("seed", "int64"),
        _params(seed=pb.InferParameter(string_param=str(-(2**63) - 1))),
    ),
]


def _with_id(message: pb.ModelInferRequest, request_id: str) -> pb.ModelInferRequest:
    message.id = request_id
    return message


def grpc_cases() -> list[Case]:
    return [Case(f"grpc {name}", words, grpc=build) for name, words, build in GRPC_SPECS]


# -- JSON cases over gRPC: the same request in MLServer's protobuf form -----------------------


def _flat(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    return [v for item in data for v in _flat(item)]


def _contents(datatype: str, values: list[Any]) -> tuple[str, list[Any]] | None:
    """The InferTensorContents field a V2 client would use, or None if gRPC cannot carry
    these values (a null, a string where numbers go)."""
    if not values:
        return "", []
    if datatype == "BYTES" and all(isinstance(v, str | bytes) for v in values):
        return "bytes_contents", [v.encode() if isinstance(v, str) else v for v in values]
    if any(isinstance(v, bool) for v in values):
        return ("bool_contents", values) if datatype == "BOOL" else None
    if datatype in ("INT64", "INT32") and all(isinstance(v, int) for v in values):
        if all(-(2**63) <= v <= INT64_MAX for v in values):
            return ("int64_contents" if datatype == "INT64" else "int_contents"), values
        return None
    if all(isinstance(v, int | float) for v in values):
        return "fp32_contents", [float(v) for v in values]  # floats, whatever the datatype
    return None


def _parameter(value: Any) -> pb.InferParameter | None:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int) and -(2**63) <= value <= INT64_MAX:
        return pb.InferParameter(int64_param=value)
    if isinstance(value, str):
        return pb.InferParameter(string_param=value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return pb.InferParameter(string_param=json.dumps(value))  # as our client sends lists
    if isinstance(value, list):
        return None  # as a JSON string it would be a valid stop string, brackets and all
    if isinstance(value, dict):
        return None  # gRPC parameters are scalars; a JSON object string is a valid stop
    return pb.InferParameter(string_param=repr(value))  # floats; ints beyond int64


def json_to_grpc(model: str, request: dict[str, Any]) -> pb.ModelInferRequest | None:
    message = pb.ModelInferRequest(model_name=model, id=request.get("id", ""))
    for item in request["inputs"]:
        converted = _contents(item["datatype"], _flat(item["data"]))
        if converted is None:
            return None
        field, values = converted
        message.inputs.append(tensor_pb(item["name"], item["datatype"], item["shape"]))
        for key, value in (item.get("parameters") or {}).items():
            message.inputs[-1].parameters[key].string_param = value
        if field:
            getattr(message.inputs[-1].contents, field).extend(values)
    for key, value in (request.get("parameters") or {}).items():
        parameter = _parameter(value)
        if parameter is None:
            return None
        message.parameters[key].CopyFrom(parameter)
    return message


# -- the run ---------------------------------------------------------------------------------

TRANSPORTS = ("sse", "infer", "grpc")
CASES = parameter_cases() + input_cases() + rest_cases() + grpc_cases()


def grpc_form(case: Case) -> Callable[[str], Any] | None:
    if case.grpc is not None:
        return case.grpc
    if case.request is not None and json_to_grpc(case.model, case.request) is not None:
        return lambda model: json_to_grpc(model, case.request)
    return None


def _supports(transport: str, case: Case) -> bool:
    if transport == "grpc":
        return grpc_form(case) is not None
    return case.request is not None or case.body is not None


def _runs() -> list[tuple[str, Case, bool]]:
    """(transport, case, check exactness after it): every BATCH-th case and the last one."""
    runs = []
    for transport in TRANSPORTS:
        cases = [c for c in CASES if _supports(transport, c)]
        for i, case in enumerate(cases):
            runs.append((transport, case, i % BATCH == BATCH - 1 or i == len(cases) - 1))
    return runs


RUNS = _runs()


def test_the_fuzz_covers_at_least_150_distinct_bad_requests():
    assert len({case.id for case in CASES}) == len(CASES), "case ids must be distinct"
    assert len(RUNS) >= 150, len(RUNS)
    assert {t for t, _, _ in RUNS} == set(TRANSPORTS)


@pytest.fixture(scope="module")
def server(layerstream_server):
    return layerstream_server


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield channel


@pytest.fixture(scope="module")
def expected(server) -> list[int]:
    """The resident model's greedy ids for PROMPT: GOOD_TOKENS of them, none of them EOS."""
    ref = Reference(server.chunked[LLAMA])
    ids = ref.greedy(ref.encode(PROMPT), GOOD_TOKENS)
    assert ref.finish_reason(ids, GOOD_TOKENS) == "length"  # all GOOD_TOKENS must come
    return ids


def assert_mentions(message: str, words: tuple[str, ...]) -> None:
    assert message.strip(), "the error has no message"
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"


def sse_events(server, case: Case) -> list[dict[str, Any]]:
    url = f"{server.http_url}/v2/models/{case.model}/generate_stream"
    if case.body is not None:
        send: dict[str, Any] = {
            "content": case.body.encode(),
            "headers": {"content-type": "application/json"},
        }
    else:
        send = {"json": case.request}
    with (
        httpx.Client(timeout=60.0) as client,
        connect_sse(client, "POST", url, **send) as source,
    ):
        assert source.response.status_code == 200, source.response.read()
        assert source.response.headers["content-type"].startswith("text/event-stream")
        return [json.loads(event.data) for event in source.iter_sse()]


def check_sse(server, case: Case) -> None:
    events = sse_events(server, case)  # a cut stream raises here
    assert len(events) == 1, events
    (event,) = events
    params = event["parameters"]
    assert params["finish_reason"] == "error", event
    assert params["error_type"] == "invalid_request", params
    assert_mentions(params["error"], case.words)
    assert event["outputs"][0]["name"] == "error"
    assert event["outputs"][0]["data"] == [f"invalid_request: {params['error']}"]


def check_infer(server, case: Case) -> None:
    url = f"{server.http_url}/v2/models/{case.model}/infer"
    with httpx.Client(timeout=60.0) as client:
        if case.body is not None:
            headers = {"content-type": "application/json"}
            response = client.post(url, content=case.body.encode(), headers=headers)
        else:
            response = client.post(url, json=case.request)
    assert response.status_code == 400, (response.status_code, response.text)
    error = response.json()["error"]
    assert error.startswith("invalid_request: "), error
    assert_mentions(error.removeprefix("invalid_request: "), case.words)


def check_grpc(channel, case: Case) -> None:
    message = grpc_form(case)(case.model)
    if isinstance(message, bytes):  # what MLServer's proto cannot build: sent as is
        call = channel.stream_stream(
            STREAM_METHOD, response_deserializer=pb.ModelInferResponse.FromString
        )
    else:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer
    with pytest.raises(grpc.RpcError) as caught:
        responses = list(call(iter([message]), timeout=60))
        pytest.fail(f"the call succeeded with {len(responses)} responses")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    details = caught.value.details()
    assert details.startswith("invalid_request: "), details
    assert_mentions(details.removeprefix("invalid_request: "), case.words)


def check_healthy(server) -> None:
    assert server.alive()
    with httpx.Client(timeout=10.0) as client:
        for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{LLAMA}/ready"):
            assert client.get(server.http_url + path).status_code == 200, path


def check_exact(server, transport: str, expected: list[int]) -> None:
    request = {"inputs": [prompt_input(PROMPT)], "parameters": {"max_new_tokens": GOOD_TOKENS}}
    if transport == "infer":
        response = httpx.post(
            f"{server.http_url}/v2/models/{LLAMA}/infer", json=request, timeout=60
        )
        assert response.status_code == 200, response.text
        body = response.json()
        ids = next(o["data"] for o in body["outputs"] if o["name"] == "token_ids")
        reason = body["parameters"]["finish_reason"]
    else:
        from layerstream_client import Final, GRPCClient, SSEClient

        client = (
            SSEClient(server.http_url, 60)
            if transport == "sse"
            else GRPCClient(server.grpc_target, 60)
        )
        *tokens, final = client.stream(LLAMA, request)
        assert isinstance(final, Final)
        ids, reason = [t.token_id for t in tokens], final.finish_reason
    assert ids == expected
    assert reason == "length"


@pytest.mark.parametrize(
    ("transport", "case", "then_exact"),
    RUNS,
    ids=[f"{t}-{c.id}" for t, c, _ in RUNS],
)
def test_bad_request_gets_a_clean_answer(server, channel, expected, transport, case, then_exact):
    if transport == "sse":
        check_sse(server, case)
    elif transport == "infer":
        check_infer(server, case)
    else:
        check_grpc(channel, case)
    check_healthy(server)
    if then_exact:
        check_exact(server, transport, expected)


def test_malformed_bodies_are_refused_by_mlserver_before_the_model(server):
    """Bodies MLServer's schema rejects never reach the runtime: a 422 with its details,
    on the streaming and the unary endpoint, and the server stays healthy."""
    bodies = [
        {"inputs": [{"name": "prompt", "datatype": "FOO", "shape": [1], "data": ["x"]}]},
        {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": "x", "data": ["x"]}]},
        {"parameters": {"max_new_tokens": 2}},
        {"inputs": "prompt"},
    ]
    with httpx.Client(timeout=60.0) as client:
        for body in bodies:
            for path in ("generate_stream", "infer"):
                response = client.post(f"{server.http_url}/v2/models/{LLAMA}/{path}", json=body)
                assert response.status_code == 422, (body, path, response.text)
                assert response.json()["detail"]
        # not JSON: cut short, and the NaN/Infinity literals Python's json would accept
        hi = json.dumps(prompt_input("hi"))
        for text in [
            '{"inputs": [',
            f'{{"inputs": [{hi}], "parameters": {{"temperature": NaN}}}}',
            f'{{"inputs": [{hi}], "parameters": {{"top_p": Infinity}}}}',
            f'{{"inputs": [{hi}], "parameters": {{"repetition_penalty": -Infinity}}}}',
            f'{{"inputs": [{hi}], "parameters": {{"top_k": 1e400}}}}',
        ]:
            response = client.post(
                f"{server.http_url}/v2/models/{LLAMA}/infer",
                content=text.encode(),
                headers={"content-type": "application/json"},
            )
            assert response.status_code == 422, (text, response.text)
    check_healthy(server)
