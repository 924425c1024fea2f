from __future__ import annotations

import copy
import dataclasses
import json
import re

import pytest
from mlserver.types import InferenceRequest, RequestOutput

from layerstream.errors import InvalidRequest
from layerstream.inference.kv import request_kv_bytes
from layerstream.inference.prompts import (
    FALLBACK_CHAT_OVERHEAD,
    PromptLimit,
    chat_bytes,
    chat_ids,
    chat_overhead,
)
from layerstream.inference.request import ModelCapabilities, Request, check_context
from layerstream.inference.types import Mode
from layerstream.serving.outputs import STREAM, UNARY, requested_outputs
from layerstream.serving.parameters import parse_layers
from layerstream.serving.protocol import parse_request

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


def parse(req, caps=CAUSAL, max_prompt_bytes=None):
    limit = PromptLimit(max_prompt_bytes, "a test") if max_prompt_bytes else None
    return parse_request(
        req,
        caps,
        max_new_tokens_limit=32,
        default_max_new_tokens=16,
        prompt_limit=limit,
    )


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
        ({"temperature": -0.5}, "temperature must be 0 .greedy. or between 0.01 and 100"),
        ({"top_p": 1.5}, "top_p"),
        ({"do_sample": "maybe"}, "do_sample must be true or false"),
        ({"stop": ["ok", ""]}, "empty strings"),
        ({"mode": "embedding", "pooling": "max"}, "pooling 'max'"),
        ({"mode": "hidden_states", "layers": "0,9"}, "layer 9 is out of range"),
        # a parameter of another mode would be ignored: refused instead
        ({"pooling": "cls"}, r"'pooling' do not apply to mode 'tokens' \(pooling: hidden"),
        ({"layers": "0"}, r"'layers' do not apply to mode 'tokens'"),
        ({"mode": "embedding", "max_new_tokens": -5}, r"'max_new_tokens' do not apply"),
        ({"mode": "hidden_states", "temperature": 0.5, "stop": "x"}, r"'stop', 'temperature'"),
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
        ([], "has no inputs"),
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


def test_layers_list_or_string_normalised_in_the_requests_order_and_count():
    """``[-1, 0]`` asks for the last state first, ``[3, -2, 3]`` for state 3 three times:
    each was once sorted and deduplicated without a word."""
    assert parse_layers("0,-1", 4) == [0, 4]
    assert parse_layers("-1,0", 4) == [4, 0]
    assert parse_layers([3, -2, 3], 4) == [3, 3, 3]
    assert parse(request(mode="hidden_states")).layers == [0, 1, 2, 3, 4]
    assert parse(request(mode="hidden_states", layers="-1")).layers == [4]


def test_context_length():
    r = parse(request(max_new_tokens=16))
    check_context(48, r, CAUSAL)
    with pytest.raises(InvalidRequest, match="exceeds the model's context of 64"):
        check_context(49, r, CAUSAL)
    # a default is not named as if the client had sent it
    defaulted = parse(request())
    with pytest.raises(InvalidRequest, match=r"max_new_tokens 16 \(the default: the request"):
        check_context(60, defaulted, CAUSAL)
    hidden = parse(request(mode="hidden_states"))
    check_context(64, hidden, CAUSAL)
    with pytest.raises(InvalidRequest, match="prompt of 65 tokens"):
        check_context(65, hidden, CAUSAL)


def test_default_max_new_tokens_respects_the_limit_and_other_modes_refuse_it():
    r = parse_request(request(), CAUSAL, max_new_tokens_limit=8, default_max_new_tokens=64)
    assert r.max_new_tokens == 8
    assert parse_request(request(mode="embedding"), CAUSAL, 8, 64).mode == "embedding"
    with pytest.raises(InvalidRequest, match="'max_new_tokens' do not apply to mode 'embedding'"):
        parse_request(request(mode="embedding", max_new_tokens=500), CAUSAL, 8, 64)


def test_stop_list_as_json_string_as_grpc_sends_it():
    assert parse(request(stop='["a,b", "END"]')).stop == ["a,b", "END"]
    # any other string is a stop string, brackets and all
    assert parse(request(stop="[INST]")).stop == ["[INST]"]
    assert parse(request(stop="[not json")).stop == ["[not json"]
    assert parse(request(stop='["a", 1]')).stop == ['["a", 1]']


@pytest.mark.parametrize("stop", ["\ud800", ["ok", "x\udfff"], '["\\ud800"]'])
def test_a_stop_string_that_is_not_utf8_is_refused(stop):
    """A lone surrogate (which JSON can spell) was taken as a stop string no output holds."""
    with pytest.raises(InvalidRequest, match="stop holds text that is not UTF-8"):
        parse(request(stop=stop))


def test_nested_input_ids_for_shape_1_by_n():
    nested = [{"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [[4, 5, 6]]}]
    assert parse(request(nested)).input_ids == [4, 5, 6]


# -- numbers: finite, in range, never a silent default ----------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"temperature": 1e-300}, "temperature must be 0 .greedy. or between"),
        ({"temperature": "1e-300"}, "temperature must be 0 .greedy. or between"),
        ({"temperature": "nan"}, "temperature must be a finite number"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": "inf"}, "temperature must be a finite number"),
        ({"temperature": "-Infinity"}, "temperature must be a finite number"),
        ({"temperature": 10**400}, "temperature must be a finite number"),
        ({"temperature": 1000}, "temperature must be 0 .greedy. or between 0.01 and 100"),
        ({"repetition_penalty": "nan"}, "repetition_penalty must be a finite number"),
        ({"repetition_penalty": "inf"}, "repetition_penalty must be a finite number"),
        ({"repetition_penalty": 1e-300}, "repetition_penalty must be between 0.01 and 100"),
        ({"repetition_penalty": 0}, "repetition_penalty must be between"),
        ({"top_p": float("nan")}, "top_p must be a finite number"),
        ({"top_p": "nan"}, "top_p must be a finite number"),
        ({"top_p": 0}, "top_p must be in"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"top_k": 10**30}, "top_k must fit in int64"),
        ({"seed": 10**30}, "seed must fit in int64"),
        ({"seed": 2**64}, "seed must fit in int64"),
        ({"seed": -(2**63) - 1}, "seed must fit in int64"),
        ({"seed": str(2**64)}, "seed must fit in int64"),
        ({"seed": "9" * 5000}, "seed must be an integer"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"seed": float("inf")}, "seed must be an integer"),
        ({"max_new_tokens": 1e300}, "max_new_tokens must fit in int64"),
        ({"seed": float(-(2**63))}, "seed must fit in int64"),  # orjson's -(2**63)-1
        ({"seed": 2.0**53 + 2}, "seed must be an integer"),
        ({"max_new_tokens": True}, "max_new_tokens must be an integer"),
        ({"temperature": True}, "temperature must be a number"),
        ({"temperature": [0.5]}, "temperature must be a number"),
        ({"temperature": ""}, "temperature must be a number"),
        ({"do_sample": 2}, "do_sample must be true or false"),
        ({"temperature": 0, "do_sample": True}, "temperature 0 means greedy"),
        # the mirror case: sampling parameters with greedy decoding were silently ignored
        ({"temperature": 0.7, "do_sample": False}, "would ignore temperature 0.7"),
        ({"top_p": 0.5, "do_sample": "false"}, "would ignore top_p 0.5"),
        ({"top_k": 5, "temperature": 0.9, "do_sample": 0}, "ignore temperature 0.9, top_k 5"),
        ({"timeout": 0}, "timeout is in microseconds and must be >= 1"),
        ({"timeout": "soon"}, "timeout must be an integer"),
        ({"mode": "embedding", "pooling": 3}, "pooling must be a string"),
        ({"stop": ["x"] * 17}, "at most 16 strings"),
        ({"stop": "y" * 257}, "at most 256 characters"),
        ({"stop": 5}, "stop must be a string or a list of strings"),
        ({"mode": "hidden_states", "layers": list(range(11))}, "layers lists 11 indexes"),
        ({"mode": "hidden_states", "layers": [[0]]}, "layers must be an integer"),
        ({"mode": ["tokens"]}, "mode .'tokens'. is not one of"),
    ],
)
def test_bad_numbers_and_ranges(params, message):
    with pytest.raises(InvalidRequest, match=message):
        parse(request(**params))


def test_int64_edges_are_accepted():
    assert parse(request(seed=2.0**53)).seed == 2**53  # a float, but exact
    assert parse(request(seed=2**63 - 1)).seed == 2**63 - 1
    assert parse(request(seed=-(2**63))).seed == -(2**63)
    assert parse(request(seed=str(-(2**63)))).seed == -(2**63)


def test_temperature_zero_is_greedy():
    for zero in (0, 0.0, "0", "0.0", -0.0):
        r = parse(request(temperature=zero))
        assert (r.do_sample, r.temperature) == (False, None)
    assert parse(request(temperature=0, do_sample=False)).do_sample is False
    # what asks for nothing is no contradiction: OpenAI clients send top_p 1
    assert parse(request(top_p=1, top_k=0, do_sample=False)).do_sample is False


def test_edges_of_the_ranges_are_accepted():
    r = parse(request(temperature="0.01", repetition_penalty=100, top_p=1, top_k=0))
    assert (r.temperature, r.repetition_penalty, r.top_p, r.top_k) == (0.01, 100.0, 1.0, 0)
    assert parse(request(timeout=1)).timeout_us == 1
    assert parse(request(timeout="2500000")).timeout_us == 2_500_000


@pytest.mark.parametrize("name", ["temperature", "seed", "max_new_tokens", "stop", "mode"])
def test_a_parameter_without_a_value_is_an_error_naming_it(name):
    # a REST null, or a gRPC InferParameter with no field MLServer knows (double_param)
    with pytest.raises(InvalidRequest, match=f"parameter.s. '{name}' arrived without a value"):
        parse(request(**{name: None}))
    with pytest.raises(InvalidRequest, match="send numbers as int64_param or as strings"):
        parse(request(**{name: None}))


def test_unknown_parameters_are_named_before_empty_ones():
    with pytest.raises(InvalidRequest, match=r"unknown parameter\(s\) 'bogus'"):
        parse(request(bogus=None, temperature=None))


# -- inputs: checked as sent, never repaired -------------------------------------------------


def ids(data, shape=None, datatype="INT64"):
    shape = [len(data)] if shape is None else shape
    return [{"name": "input_ids", "datatype": datatype, "shape": shape, "data": data}]


def prompt(data, shape=None, datatype="BYTES"):
    return [{"name": "prompt", "datatype": datatype, "shape": shape or [1], "data": data}]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (prompt([None]), "must hold a string, got null"),
        (prompt([5]), "must hold a string, got int 5"),
        (prompt([["a"]], shape=[1, 1]), None),  # nested one string: fine
        (prompt(["a"], shape=[5]), r"one string \(shape \[1\]\)"),
        (prompt(["a", "b"], shape=[1]), "one string, not 2"),
        (prompt(["a"], shape=[-1]), "dimensions must be integers >= 0"),
        (ids([1, 2, 3], shape=[5]), r"shape \[5\] \(5 values\) but carries 3"),
        (ids([1, 2, 3], shape=[1, 2]), "carries 3"),
        (ids([1.0, 2.0]), "must hold integers, got float 1.0"),
        (ids([1, 2.5]), "must hold integers, got float 2.5"),
        (ids([1, True]), "must hold integers, got bool True"),
        (ids(["1"]), "must hold integers, got str '1'"),
        (ids([None]), "must hold integers, got NoneType None"),
        (ids([1.0], datatype="FP32"), r"datatype INT64 \(or INT32\), not FP32"),
        (ids([-1]), "outside the vocabulary"),
        (ids([], shape=[0]), "is empty"),
        (ids(list(range(65))), "prompt of 65 tokens exceeds the model's context of 64"),
        (ids([1, 2], shape=[2, 1]), "shape"),
        (prompt(["a"]) + prompt(["b"]), "input 'prompt' appears 2 times"),
        (ids([1]) + ids([2]), "input 'input_ids' appears 2 times"),
        (prompt(["a"]) + ids([1]), "'prompt' or 'input_ids', not both"),
        (
            [*prompt(["a"]), {"name": "x", "datatype": "BYTES", "shape": [1], "data": ["b"]}],
            "unknown input 'x'",
        ),
        ([], "the request has no inputs"),
    ],
)
def test_inputs_as_sent(inputs, message):
    if message is None:
        assert parse(request(inputs)).prompt == "a"
        return
    with pytest.raises(InvalidRequest, match=message):
        parse(request(inputs))


def test_prompt_bytes_must_be_utf8():
    with pytest.raises(InvalidRequest, match=r"not valid UTF-8 \(byte 0xff at offset 0\)"):
        parse(request(prompt([b"\xff\xfe"])))
    with pytest.raises(InvalidRequest, match="offset 2"):
        parse(request(prompt([b"ok\xc3"])))  # a character cut short
    assert parse(request(prompt(["ünï".encode()]))).prompt == "ünï"


def test_prompt_over_the_byte_limit_is_refused_before_decoding():
    assert parse(request(prompt(["x" * 100])), max_prompt_bytes=100).prompt == "x" * 100
    with pytest.raises(
        InvalidRequest,
        match=r"is at least 101 bytes \(UTF-8\), over this model.s limit of 100 bytes \(a test",
    ):
        parse(request(prompt(["x" * 101])), max_prompt_bytes=100)  # not even encoded
    # counted in UTF-8 bytes, not characters: 34 x 3 bytes
    with pytest.raises(InvalidRequest, match="is 102 bytes"):
        parse(request(prompt(["✓" * 34])), max_prompt_bytes=100)
    assert parse(request(prompt(["✓" * 33])), max_prompt_bytes=100).prompt == "✓" * 33
    with pytest.raises(InvalidRequest, match="is 101 bytes, over this model's limit"):
        parse(request(prompt([b"\xff" * 101])), max_prompt_bytes=100)  # before UTF-8 is checked


# -- transport parameters, requested outputs, the messages input -----------------------------


def test_transport_parameters_are_accepted_and_change_nothing():
    assert parse(request(binary_data_output=True)) == parse(request())
    assert parse(request(binary_data_output="false")) == parse(request())
    with pytest.raises(InvalidRequest, match="binary_data_output must be true or false"):
        parse(request(binary_data_output="yes"))
    # the error that lists the parameters lists those that shape the answer
    with pytest.raises(InvalidRequest) as caught:
        parse(request(max_new_token=3))
    assert "binary_data_output" not in str(caught.value)


def outputs_request(*names: str, **output_params) -> InferenceRequest:
    payload = request()
    payload.outputs = [RequestOutput(name=name, parameters=output_params or None) for name in names]
    return payload


@pytest.mark.parametrize(
    ("names", "mode", "call", "wanted"),
    [
        ((), Mode.TOKENS, STREAM, None),
        (("text",), Mode.TOKENS, STREAM, ("text",)),
        (("token_id", "text"), Mode.TOKENS, STREAM, ("token_id", "text")),
        (("token_ids",), Mode.TOKENS, UNARY, ("token_ids",)),
        (("embedding",), Mode.HIDDEN_STATES, STREAM, ("embedding",)),
    ],
)
def test_requested_outputs(names, mode, call, wanted):
    assert requested_outputs(outputs_request(*names), mode, call) == wanted


@pytest.mark.parametrize(
    ("names", "mode", "call", "words"),
    [
        (
            ("output",),
            Mode.TOKENS,
            STREAM,
            "unknown output 'output'; this model's outputs are text, token_id",
        ),
        (("token_ids",), Mode.TOKENS, STREAM, "not produced by a tokens request on stream"),
        (("text",), Mode.EMBEDDING, UNARY, "this request produces embedding"),
        (("text", "text"), Mode.TOKENS, STREAM, "asked for twice"),
    ],
)
def test_requested_outputs_that_cannot_be_served(names, mode, call, words):
    with pytest.raises(InvalidRequest, match=re.escape(words)):
        requested_outputs(outputs_request(*names), mode, call)


def test_an_outputs_binary_data_is_accepted_other_parameters_are_not():
    wanted = requested_outputs(outputs_request("text", binary_data=True), Mode.TOKENS, STREAM)
    assert wanted == ("text",)
    with pytest.raises(InvalidRequest, match="unknown parameter"):
        requested_outputs(outputs_request("text", classification=3), Mode.TOKENS, STREAM)


CHAT_CAPS = dataclasses.replace(CAUSAL, has_chat_template=True)


def messages(value) -> list[dict]:
    text = value if isinstance(value, str) else json.dumps(value)
    return [{"name": "messages", "datatype": "BYTES", "shape": [1], "data": [text]}]


def test_messages_are_parsed_into_the_request():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    parsed = parse(request(messages(chat)), caps=CHAT_CAPS)
    assert parsed.messages == chat and parsed.prompt is None and parsed.input_ids is None
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    assert parse(request(messages(parts)), caps=CHAT_CAPS).messages == [
        {"role": "user", "content": "ab"}
    ]


@pytest.mark.parametrize(
    ("value", "caps", "words"),
    [
        ([{"role": "user", "content": "hi"}], CAUSAL, "has no chat template"),
        ("not json", CHAT_CAPS, "not valid JSON"),
        ("[" * 100_000, CHAT_CAPS, "not valid JSON"),
        ({"role": "user"}, CHAT_CAPS, "non-empty JSON list"),
        (["hi"], CHAT_CAPS, "messages[0] must be an object"),
        ([{"role": "", "content": "x"}], CHAT_CAPS, "messages[0].role must be one of system"),
        ([{"role": "eos", "content": "x"}], CHAT_CAPS, "got str 'eos'"),
        ([{"role": "user", "content": "a\ud800"}], CHAT_CAPS, "lone surrogate '\\ud800'"),
        ([{"role": "user", "content": "x", "name": "\udfff"}], CHAT_CAPS, "name is not valid"),
        ('[{"role": "user", "content": "x", "name": ' + "9" * 5000 + "}]", CHAT_CAPS, "JSON"),
        ([{"role": "user", "content": None}], CHAT_CAPS, "content must be a string, got null"),
        ([{"role": "user", "content": "x", "tool_calls": []}], CHAT_CAPS, "an assistant's turn"),
        ([{"role": "user", "content": "x", "audio": {}}], CHAT_CAPS, "'audio'"),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}],
            CHAT_CAPS,
            "arguments is not JSON",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}],
            CHAT_CAPS,
            "must be like",
        ),
        ([{"role": "user", "content": "x", "name": 3}], CHAT_CAPS, "name must be a string"),
        # it was taken as empty text
        ([{"role": "user", "content": []}], CHAT_CAPS, "content is an empty list of parts"),
    ],
)
def test_bad_messages(value, caps, words):
    with pytest.raises(InvalidRequest, match=re.escape(words)):
        parse(request(messages(value)), caps=caps)


def test_messages_count_against_the_prompt_limit():
    chat = [{"role": "user", "content": "x" * 200}]
    with pytest.raises(
        InvalidRequest,
        match=r"input 'messages' is at least 233 bytes \(UTF-8\), over this model's limit of 100",
    ):
        parse(request(messages(chat)), caps=CHAT_CAPS, max_prompt_bytes=100)


def test_one_input_only():
    both = messages([{"role": "user", "content": "hi"}]) + request().inputs
    with pytest.raises(InvalidRequest, match="'messages' or 'prompt', not both"):
        parse(InferenceRequest(inputs=both), caps=CHAT_CAPS)


@pytest.fixture(scope="module")
def chat_tokenizer():
    from layerstream.chunker.presets import build_tokenizer, random_init_config

    return build_tokenizer(random_init_config("tiny-llama"))


def test_a_chat_is_rendered_with_the_template_and_typed_control_tokens_stay_text(chat_tokenizer):
    eos = chat_tokenizer.convert_tokens_to_ids("<|eos|>")
    ids = chat_ids(chat_tokenizer, [{"role": "user", "content": "hi <|eos|> there"}])
    text = chat_tokenizer.decode(ids)
    assert text == "<|bos|><|user|>\nhi <|eos|> there<|eos|>\n<|assistant|>\n"
    assert ids.count(eos) == 1  # the template's own; the typed one is text


def test_a_template_that_refuses_the_chat_is_an_invalid_request(chat_tokenizer):
    refusing = copy.copy(chat_tokenizer)
    refusing.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first turn must be "
        "the user') }}{% endif %}{{ messages[0]['content'] }}"
    )
    with pytest.raises(InvalidRequest, match="chat template refused these messages: the first"):
        chat_ids(refusing, [{"role": "assistant", "content": "hi"}])


def test_layers_with_an_empty_entry_are_refused():
    with pytest.raises(InvalidRequest, match="layers has an empty entry"):
        parse(request(mode="hidden_states", layers="0,,1"))
    assert parse(request(mode="hidden_states", layers="0, 1")).layers == [0, 1]


def test_a_chats_kv_estimate_bounds_its_tokens(chat_tokenizer):
    """A chat is tokenized on its worker thread, after admission: its estimate (text plus
    the template's measured overhead per message) must not fall below its real length."""
    overhead = chat_overhead(chat_tokenizer)
    rendered = chat_tokenizer.apply_chat_template(
        [{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=False
    )
    assert overhead >= len(rendered.encode())  # the fixed part counted for every message
    chats = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "é" * 50}],
        [{"role": "user", "content": "<|eos|>" * 20, "name": "bob"}],
    ]
    for chat in chats:
        ids = chat_ids(chat_tokenizer, chat)
        request = Request(mode="tokens", messages=chat, max_new_tokens=1)
        estimate = request_kv_bytes(request, per_token=1, context=None, chat_overhead=overhead)
        assert estimate >= len(ids) + 1, chat
        assert chat_bytes(chat, overhead) >= len(
            chat_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        )


def test_a_template_no_probe_renders_gets_the_fallback_overhead(chat_tokenizer):
    refusing = copy.copy(chat_tokenizer)
    refusing.chat_template = "{{ raise_exception('never') }}"
    assert chat_overhead(refusing) == FALLBACK_CHAT_OVERHEAD


def test_transformers_refusing_a_conversation_is_an_invalid_request(chat_tokenizer):
    """apply_chat_template raises ValueError for conversations it cannot render (an empty
    one here; with sanitize_control_tokens, a control token that plain text also produces):
    a client error, not an internal one."""
    with pytest.raises(InvalidRequest, match="the chat cannot be rendered"):
        chat_ids(chat_tokenizer, [])


def test_a_model_without_hidden_states_says_why_in_its_metadata_and_refusals():
    """A model whose hidden-state layout cannot be learned (its forward fails on the meta
    device) serves tokens and embeddings; its metadata and a hidden_states request name why."""
    from layerstream.serving.metadata import model_metadata

    why = "its hidden-state layout could not be learned: its forward pass on the meta device"
    caps = dataclasses.replace(
        CAUSAL, modes=("tokens", "embedding"), num_layers=0, hidden_states_unavailable=why
    )
    metadata = model_metadata(
        "m", None, "layerstream", caps, "float32", "XLNetLMHeadModel", 8, None
    )
    assert metadata.parameters.hidden_states_unavailable == why
    assert "hidden_state_layers" not in metadata.parameters.model_dump()
    with pytest.raises(InvalidRequest, match=r"cannot do mode 'hidden_states' \(its hidden-state"):
        parse_request(request(mode="hidden_states"), caps, 8, 64)
