from __future__ import annotations

import pytest
from mlserver.types import InferenceRequest

from layerstream.errors import InvalidRequest
from layerstream.protocol import ModelCapabilities, check_context, parse_layers, parse_request

CAUSAL = ModelCapabilities(
    modes=("tokens", "hidden_states", "embedding"),
    default_mode="tokens",
    vocab_size=100,
    context_length=64,
    num_layers=4,
)
ENCODER = ModelCapabilities(
    modes=("hidden_states", "embedding"),
    default_mode="embedding",
    vocab_size=100,
    context_length=64,
    num_layers=4,
    has_pooler=True,
)


def request(inputs=None, **params) -> InferenceRequest:
    if inputs is None:
        inputs = [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]
    return InferenceRequest(inputs=inputs, parameters=params or None)


def parse(req, caps=CAUSAL):
    return parse_request(req, caps, max_new_tokens_limit=32, default_max_new_tokens=16)


def test_defaults():
    r = parse(request())
    assert (r.mode, r.prompt, r.max_new_tokens, r.stop) == ("tokens", "hello", 16, [])
    assert parse(request(), ENCODER).mode == "embedding"


def test_numbers_as_strings_as_grpc_sends_them():
    r = parse(
        request(
            max_new_tokens="8",
            temperature="0.7",
            top_p="0.9",
            top_k="5",
            seed="3",
            do_sample="true",
            repetition_penalty="1.1",
        )
    )
    assert (r.max_new_tokens, r.temperature, r.top_p, r.top_k, r.seed, r.do_sample) == (
        8,
        0.7,
        0.9,
        5,
        3,
        True,
    )
    assert r.repetition_penalty == pytest.approx(1.1)


def test_mlserver_transport_parameters_are_not_unknown():
    assert parse(request(headers={"host": "x"}, content_type="str")).mode == "tokens"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"max_tokens": 5}, "unknown parameter"),
        ({"mode": "banana"}, "mode 'banana'"),
        ({"max_new_tokens": 33}, "between 1 and 32"),
        ({"max_new_tokens": "lots"}, "max_new_tokens must be an integer"),
        ({"temperature": 0}, "temperature must be > 0"),
        ({"top_p": 1.5}, "top_p"),
        ({"do_sample": "maybe"}, "do_sample must be true or false"),
        ({"stop": ["ok", ""]}, "empty strings"),
        ({"pooling": "max"}, "pooling 'max'"),
        ({"layers": "0,9"}, "layer 9 is out of range"),
    ],
)
def test_bad_parameters(params, message):
    with pytest.raises(InvalidRequest, match=message):
        parse(request(**params))


def test_mode_the_model_cannot_do():
    with pytest.raises(InvalidRequest, match="cannot do mode 'tokens'"):
        parse(request(mode="tokens"), ENCODER)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}],
            "unknown input 'text'",
        ),
        ([{"name": "prompt", "datatype": "INT64", "shape": [1], "data": [1]}], "datatype BYTES"),
        ([{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["  "]}], "empty"),
        ([{"name": "prompt", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}], "one string"),
        ([{"name": "input_ids", "datatype": "FP32", "shape": [1], "data": [1.0]}], "INT64"),
        (
            [{"name": "input_ids", "datatype": "INT64", "shape": [2], "data": [1, 500]}],
            "outside the vocabulary",
        ),
        ([{"name": "input_ids", "datatype": "INT64", "shape": [2, 1], "data": [1, 2]}], "shape"),
        ([], "exactly one input"),
    ],
)
def test_bad_inputs(inputs, message):
    with pytest.raises(InvalidRequest, match=message):
        parse(request(inputs))


def test_input_ids():
    r = parse(
        request([{"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]}])
    )
    assert r.input_ids == [1, 2, 3] and r.prompt is None


def test_layers_list_or_string_normalised():
    assert parse_layers("0,-1", 4) == [0, 4]
    assert parse_layers([3, -2, 3], 4) == [3]
    assert parse(request(mode="hidden_states")).layers == [0, 1, 2, 3, 4]
    assert parse(request(mode="hidden_states", layers="-1")).layers == [4]


def test_context_length():
    r = parse(request(max_new_tokens=16))
    check_context(48, r, CAUSAL)
    with pytest.raises(InvalidRequest, match="exceeds the model's context of 64"):
        check_context(49, r, CAUSAL)
    hidden = parse(request(mode="hidden_states"))
    check_context(64, hidden, CAUSAL)
    with pytest.raises(InvalidRequest, match="prompt of 65 tokens"):
        check_context(65, hidden, CAUSAL)


def test_default_max_new_tokens_respects_the_limit_and_other_modes_ignore_it():
    r = parse_request(request(), CAUSAL, max_new_tokens_limit=8, default_max_new_tokens=64)
    assert r.max_new_tokens == 8
    hidden = parse_request(
        request(mode="embedding", max_new_tokens=500), CAUSAL, 8, default_max_new_tokens=64
    )
    assert hidden.mode == "embedding"


def test_stop_list_as_json_string_as_grpc_sends_it():
    assert parse(request(stop='["a,b", "END"]')).stop == ["a,b", "END"]
    with pytest.raises(InvalidRequest, match="JSON list"):
        parse(request(stop="[not json"))


def test_nested_input_ids_for_shape_1_by_n():
    nested = [{"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [[4, 5, 6]]}]
    assert parse(request(nested)).input_ids == [4, 5, 6]
