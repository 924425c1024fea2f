"""The OpenAI-compatible endpoints, driven by the official ``openai`` client against a real
``mlserver start``: answers equal the V2 stream's for the same greedy request, usage equals
the V2 stats, and what cannot be honoured is refused with OpenAI's error types."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import httpx2
import numpy as np
import openai
import pytest
import torch
from conftest import CONFIGS
from mlserver_proc import (
    ModelSpec,
    ids_input,
    labels,
    metric_samples,
    prompt_input,
    raw_sse,
    serve,
)
from openai import OpenAI

from layerstream.chunker.convert import chunk_checkpoint
from layerstream.errors import RequestTimeout
from layerstream.inference.types import FinalEvent, FinishReason, RequestStats, TokenEvent
from layerstream.serving.openai import body as openai_body
from layerstream.serving.openai import completions, routes

pytest_plugins = ["mlserver_proc"]

# a llama with a chat template; a gpt2 without one, named as Seldon Core 2 names a model's
# version 1 ("<model>_<version>")
CHAT, PLAIN = "chat", "plain_1"
VERSIONED = "versioned"  # two versions of one name: 1 is PLAIN's store, 2 is CHAT's
TIGHT = "tight"  # PLAIN's store, with a KV cache budget that one request fills
LIMIT = 64  # max_new_tokens_limit of both (a tool call takes some 45 tokens of this vocabulary)
PROMPT = "Once upon a time"
MESSAGES = [
    {"role": "system", "content": "You tell short stories."},
    {"role": "user", "content": "Once upon a time"},
]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
GREEDY = {"temperature": 0, "max_tokens": 12}
RF = "response_format"
TC = "tool_choice"
# short names: the fixture model's small vocabulary spells JSON in many tokens, and its
# max_new_tokens_limit is 32
WEATHER = {
    "type": "object",
    "properties": {"c": {"enum": ["P", "R"]}, "d": {"enum": [1, 2]}},
    "required": ["c", "d"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "wx", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "tm", "parameters": {"enum": [{}]}}},
]


def rechunk(source: Path, root: Path, name: str, template: str | None) -> Path:
    """A copy of ``source`` whose tokenizer has ``template`` as its chat template (or none),
    chunked: side files are checksummed in the manifest, so a store is not edited in place."""
    copy = root / f"{name}-source"
    shutil.copytree(source, copy)
    config_path = copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    if template is not None:
        (copy / "chat_template.jinja").write_text(template)
    store = root / f"{name}-chunks"
    chunk_checkpoint(copy, store, name, progress=False)
    return store


@pytest.fixture(scope="module")
def server(model_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    stores = {
        CHAT: rechunk(model_factory("llama").source, root, CHAT, TEMPLATE),
        PLAIN: rechunk(model_factory("gpt2").source, root, PLAIN, None),
    }
    extra = {"torch_threads": 1, "max_new_tokens_limit": LIMIT}
    specs = [ModelSpec(name, store, extra) for name, store in stores.items()]
    specs += [
        ModelSpec(VERSIONED, stores[PLAIN], extra, version="1"),
        ModelSpec(VERSIONED, stores[CHAT], extra, version="2"),
        # room for one request's KV cache at a time: choices queue behind one another
        ModelSpec(TIGHT, stores[PLAIN], {**extra, "kv_cache_budget": str(one_request_kv())}),
    ]
    with serve(root / "server", specs) as running:
        yield running


def one_request_kv() -> int:
    """A KV budget in bytes that holds one request of TIGHT_TOKENS over PROMPT, not two."""
    import transformers

    from layerstream.inference.kv import PROMPT_SPECIALS, kv_bytes_per_token

    config = transformers.AutoConfig.for_model(**{"model_type": "gpt2", **CONFIGS["gpt2"]})
    per_token = kv_bytes_per_token(config, config.n_layer, "float32")
    return int(per_token * (len(PROMPT.encode()) + PROMPT_SPECIALS + TIGHT_TOKENS) * 1.5)


TIGHT_TOKENS = 8


def client(server, name: str) -> OpenAI:
    # only what a user sets: the model's base URL and a key nobody checks
    return OpenAI(base_url=f"{server.http_url}/v2/models/{name}/openai/v1", api_key="unused")


def v2_answer(server, name: str, item: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The text and final parameters of the same greedy request over V2 SSE."""
    request = {
        "inputs": [item],
        "parameters": {"max_new_tokens": GREEDY["max_tokens"], "temperature": 0},
    }
    events = raw_sse(server.http_url, name, request)
    text = "".join(
        out["data"][0] for event in events for out in event["outputs"] if out["name"] == "text"
    )
    final = events[-1]["parameters"]
    assert "error" not in final, final
    return text, final


def messages_input(messages: list[dict[str, str]]) -> dict[str, Any]:
    return {"name": "messages", "datatype": "BYTES", "shape": [1], "data": [json.dumps(messages)]}


def check_usage(usage, final: dict[str, Any]) -> None:
    assert usage.prompt_tokens == final["prompt_tokens"]
    assert usage.completion_tokens == final["tokens"]
    assert usage.total_tokens == final["prompt_tokens"] + final["tokens"]


# -- answers ---------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("name", [CHAT, PLAIN])  # two models, each on its own base URL
def test_completions_equal_v2(server, name):
    text, final = v2_answer(server, name, prompt_input(PROMPT))
    assert text
    answer = client(server, name).completions.create(model=name, prompt=PROMPT, **GREEDY)
    assert answer.id.startswith("cmpl-") and answer.object == "text_completion"
    assert answer.model == name and answer.created > 0
    (choice,) = answer.choices
    assert choice.text == text
    assert choice.finish_reason == final["finish_reason"]
    check_usage(answer.usage, final)

    chunks = list(
        client(server, name).completions.create(
            model=name,
            prompt=PROMPT,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    check_usage(last.usage, final)
    assert all(c.usage is None and c.object == "text_completion" for c in body)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    assert "".join(c.choices[0].text for c in body) == text
    assert [c.choices[0].finish_reason for c in body][-1] == final["finish_reason"]
    assert all(c.choices[0].finish_reason is None for c in body[:-1])


@pytest.mark.e2e
def test_chat_equals_v2(server):
    text, final = v2_answer(server, CHAT, messages_input(MESSAGES))
    assert text
    chat = client(server, CHAT).chat.completions
    answer = chat.create(model=CHAT, messages=MESSAGES, **GREEDY)
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion"
    (choice,) = answer.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == text
    assert choice.finish_reason == final["finish_reason"]
    check_usage(answer.usage, final)

    # max_completion_tokens is the chat's newer name for max_tokens; no usage asked for
    chunks = list(
        chat.create(
            model=CHAT, messages=MESSAGES, stream=True, temperature=0, max_completion_tokens=12
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert [c.choices[0].finish_reason for c in chunks][-1] == final["finish_reason"]


@pytest.mark.e2e
def test_a_chat_message_echoed_back_is_accepted(server):
    # a response's message as the next turn carries nulls (refusal, tool_calls, ...)
    chat = client(server, CHAT).chat.completions
    first = chat.create(model=CHAT, messages=MESSAGES, **GREEDY)
    turn = first.choices[0].message.model_dump()
    assert None in turn.values()
    messages = [*MESSAGES, turn, {"role": "user", "content": "And then?"}]
    again = chat.create(model=CHAT, messages=messages, **GREEDY)
    assert again.usage.prompt_tokens > first.usage.prompt_tokens


@pytest.mark.e2e
def test_stop_and_length(server):
    text, _ = v2_answer(server, PLAIN, prompt_input(PROMPT))
    stop = text.strip()[:2]
    answer = client(server, PLAIN).completions.create(
        model=PLAIN, prompt=PROMPT, stop=[stop], **GREEDY
    )
    assert answer.choices[0].finish_reason == "stop"
    assert stop not in answer.choices[0].text
    assert text.startswith(answer.choices[0].text)
    short = client(server, PLAIN).completions.create(
        model=PLAIN, prompt=PROMPT, temperature=0, max_tokens=1
    )
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 1


@pytest.mark.e2e
def test_a_stop_string_that_reads_as_a_json_list_is_literal(server):
    """'["x"]' as OpenAI's stop is those five characters: it was read as the V2 JSON list
    and cut the answer at the first x."""
    text, _ = v2_answer(server, PLAIN, prompt_input(PROMPT))
    letter = next(c for c in text.strip() if c.isalpha())
    for stop in (json.dumps([letter]), "[]"):
        answer = client(server, PLAIN).completions.create(
            model=PLAIN, prompt=PROMPT, stop=stop, **GREEDY
        )
        assert answer.choices[0].text == text, stop
        assert answer.choices[0].finish_reason == "length", stop


@pytest.mark.e2e
def test_models(server):
    listed = client(server, CHAT).models.list()
    assert [m.id for m in listed.data] == [CHAT]
    assert client(server, PLAIN).models.retrieve(PLAIN).id == PLAIN
    with pytest.raises(openai.NotFoundError):
        client(server, PLAIN).models.retrieve(CHAT)


# -- refusals ----------------------------------------------------------------------------------


def error_of(excinfo) -> dict[str, Any]:
    body = excinfo.value.body
    assert set(body) == {"message", "type", "param", "code"}, body
    return body


@pytest.mark.e2e
def test_unknown_model(server):
    with pytest.raises(openai.NotFoundError) as excinfo:
        client(server, "nope").completions.create(model="nope", prompt=PROMPT)
    error = error_of(excinfo)
    assert error["code"] == "model_not_found"
    assert CHAT in error["message"] and PLAIN in error["message"]
    # the body's model must be the path's: each model has its own base URL
    with pytest.raises(openai.NotFoundError) as excinfo:
        client(server, CHAT).completions.create(model=PLAIN, prompt=PROMPT)
    assert error_of(excinfo)["param"] == "model"


@pytest.mark.e2e
def test_the_seldon_name_of_a_model(server):
    # Seldon rewrites the path to "plain_1"; the client still names "plain"
    answer = client(server, PLAIN).completions.create(model="plain", prompt=PROMPT, max_tokens=2)
    assert answer.model == "plain"
    with pytest.raises(openai.NotFoundError):
        client(server, PLAIN).completions.create(model="plai", prompt=PROMPT, max_tokens=2)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 17}, "n"),
        ({"n": 0}, "n"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
        ),
        (
            {"response_format": {"type": "json_object", "value": {"type": "nope"}}},
            "response_format",
        ),
        ({"response_format": {"type": "xml"}}, RF),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": 1}}]}, "tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}}, TC),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"extra_body": {"guided_json": {}}}, "guided_json"),
        ({"temperature": "hot"}, "temperature"),
        # refused by the V2 path's checks, named in OpenAI's words
        ({"top_p": 5}, "top_p"),
        ({"seed": -(2**64)}, "seed"),
    ],
)
def test_refused_fields(server, fields, param):
    with pytest.raises(openai.BadRequestError) as excinfo:
        client(server, CHAT).chat.completions.create(model=CHAT, messages=MESSAGES, **fields)
    error = error_of(excinfo)
    assert error["param"] == param and error["type"] == "invalid_request_error", error


@pytest.mark.e2e
@pytest.mark.parametrize("max_tokens", [0, 10**6])
@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_out_of_range(server, max_tokens, stream):
    # refused with its status before any stream begins, in layerstream's words
    with pytest.raises(openai.BadRequestError) as excinfo:
        client(server, PLAIN).completions.create(
            model=PLAIN, prompt=PROMPT, max_tokens=max_tokens, stream=stream
        )
    error = error_of(excinfo)
    assert error["code"] == "invalid_request" and error["param"] == "max_tokens"
    assert f"max_new_tokens must be between 1 and {LIMIT}, got {max_tokens}" in error["message"]


@pytest.mark.e2e
def test_every_openai_request_is_counted_by_outcome(server):
    """Refused by the OpenAI layer (n=17), by the V2 contract (max_tokens 0) or answered:
    each counted once in the model's layerstream_requests_total."""
    before = metric_samples(server.metrics_url)
    with pytest.raises(openai.BadRequestError):
        client(server, PLAIN).completions.create(model=PLAIN, prompt=PROMPT, n=17)
    with pytest.raises(openai.BadRequestError):
        client(server, PLAIN).completions.create(model=PLAIN, prompt=PROMPT, max_tokens=0)
    client(server, PLAIN).completions.create(model=PLAIN, prompt=PROMPT, **GREEDY)
    after = metric_samples(server.metrics_url)

    def grew(**more: str) -> float:
        key = ("layerstream_requests_total", labels(PLAIN, **more))
        return after.get(key, 0.0) - before.get(key, 0.0)

    # n=17 never became a V2 request; max_tokens 0 failed the V2 contract's range check
    assert grew(finish_reason="error", mode="unparsed") == 2
    answered = grew(finish_reason="length", mode="tokens") + grew(
        finish_reason="stop", mode="tokens"
    )
    assert answered == 1


@pytest.mark.e2e
def test_chat_without_a_template(server):
    with pytest.raises(openai.BadRequestError) as excinfo:
        client(server, PLAIN).chat.completions.create(model=PLAIN, messages=MESSAGES)
    assert "no chat template" in error_of(excinfo)["message"]


@pytest.mark.e2e
def test_raw_body_errors(server):
    url = f"{server.http_url}/v2/models/{PLAIN}/openai/v1/completions"
    bad = httpx.post(url, content=b"{not json", timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    several = httpx.post(url, json={"prompt": ["a", "b"]}, timeout=30)
    assert several.status_code == 400 and several.json()["error"]["param"] == "prompt"
    floats = httpx.post(url, json={"prompt": [1.0, 2.0]}, timeout=30)
    assert floats.status_code == 400
    assert "token ids must be integers, got 1.0" in floats.json()["error"]["message"]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        # JSON can spell a lone UTF-16 surrogate, which is no text: refused, never a 500
        ("completions", '{"prompt": "a\\ud800"}', "lone surrogate"),
        ("chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "lone"),
        ("chat/completions", '{"messages": [{"role": "\\ud800", "content": "x"}]}', "lone"),
        ("chat/completions", '{"messages": [], "\\udfff": 1}', "unrecognized request"),
        ("chat/completions", '{"messages": [{"role": "eos", "content": "x"}]}', "role must be"),
        ("completions", '{"prompt": "x", "stream_options": {"include_usage": true}}', "stream"),
        ("completions", '{"prompt": "x", "stream": true, "stream_options": {"a": 1}}', "stream"),
    ],
)
def test_hostile_bodies_are_openai_errors(server, path, body, words):
    url = f"{server.http_url}/v2/models/{CHAT}/openai/v1/{path}"
    answer = httpx.post(url, content=body.encode(), timeout=30)
    assert answer.status_code == 400, answer.text
    assert words in answer.json()["error"]["message"]


# -- one base URL, versions, placeholders ------------------------------------------------------


def server_client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.http_url}/v1", api_key="unused")


def completion(openai_client: OpenAI, model: str) -> str:
    answer = openai_client.completions.create(model=model, prompt=PROMPT, **GREEDY)
    assert answer.model == model
    return answer.choices[0].text


@pytest.mark.e2e
def test_one_base_url_serves_every_model_and_version_by_the_body(server):
    """Gateways and UIs take one base URL and a list of every model: /v1, routed by the
    body's ``model`` (NAME: its default version, NAME:VERSION: that one)."""
    ids = [m.id for m in server_client(server).models.list().data]
    assert ids == [CHAT, PLAIN, TIGHT, VERSIONED, f"{VERSIONED}:2", f"{VERSIONED}:1"]
    assert server_client(server).models.retrieve(f"{VERSIONED}:1").id == f"{VERSIONED}:1"
    for name in (CHAT, PLAIN):
        assert completion(server_client(server), name) == completion(client(server, name), name)
    # each version answers as the model whose store it has; the name alone is the newest
    assert completion(server_client(server), f"{VERSIONED}:1") == completion(
        client(server, PLAIN), PLAIN
    )
    assert completion(server_client(server), f"{VERSIONED}:2") == completion(
        client(server, CHAT), CHAT
    )
    assert completion(server_client(server), VERSIONED) == completion(client(server, CHAT), CHAT)
    chat = server_client(server).chat.completions.create(model=CHAT, messages=MESSAGES, **GREEDY)
    mine = client(server, CHAT).chat.completions.create(model=CHAT, messages=MESSAGES, **GREEDY)
    assert chat.choices[0].message.content == mine.choices[0].message.content


@pytest.mark.e2e
def test_a_version_has_a_base_url_of_its_own(server):
    """A second version of a name was unreachable over OpenAI: its own base URL now."""
    for version, same_as in (("1", PLAIN), ("2", CHAT)):
        url = f"{server.http_url}/v2/models/{VERSIONED}/versions/{version}/openai/v1"
        versioned = OpenAI(base_url=url, api_key="unused")
        assert [m.id for m in versioned.models.list().data] == [
            VERSIONED if version == "2" else f"{VERSIONED}:1"
        ]
        assert completion(versioned, VERSIONED) == completion(client(server, same_as), same_as)
    with pytest.raises(openai.NotFoundError, match="version '3'"):
        OpenAI(
            base_url=f"{server.http_url}/v2/models/{VERSIONED}/versions/3/openai/v1",
            api_key="unused",
        ).completions.create(model=VERSIONED, prompt=PROMPT)


@pytest.mark.e2e
def test_unknown_or_missing_model_at_the_server_base_url(server):
    with pytest.raises(openai.NotFoundError) as excinfo:
        server_client(server).completions.create(model="nope", prompt=PROMPT)
    error = error_of(excinfo)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert all(repr(i) in error["message"] for i in (CHAT, PLAIN, f"{VERSIONED}:1"))
    answer = httpx.post(f"{server.http_url}/v1/completions", json={"prompt": PROMPT}, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "model"
    gone = httpx.get(f"{server.http_url}/v1/models/nope", timeout=30)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


@pytest.mark.e2e
def test_huggingface_hubs_inference_client_on_a_models_base_url(server):
    """Given a base URL, huggingface_hub sends ``"model": "dummy"``, which a model's base URL
    refused (404): a placeholder there means the model of the URL."""
    from huggingface_hub import InferenceClient

    hf = InferenceClient(base_url=f"{server.http_url}/v2/models/{CHAT}/openai/v1")
    answer = hf.chat_completion(messages=MESSAGES, max_tokens=12, temperature=0)
    mine = client(server, CHAT).chat.completions.create(model=CHAT, messages=MESSAGES, **GREEDY)
    text = mine.choices[0].message.content
    assert answer.choices[0].message.content == text
    streamed = hf.chat_completion(messages=MESSAGES, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text


# -- n choices --------------------------------------------------------------------------------


SAMPLED = {"temperature": 1.0, "max_tokens": 8, "seed": 5}


@pytest.mark.e2e
def test_n_choices_are_each_what_their_seed_gives_alone(server):
    """n choices run as requests of their own (sharing the sweeps); choice i uses seed + i,
    so it is reproducible alone."""
    many = client(server, PLAIN).completions.create(model=PLAIN, prompt=PROMPT, n=3, **SAMPLED)
    assert [c.index for c in many.choices] == [0, 1, 2]
    alone = [
        client(server, PLAIN).completions.create(
            model=PLAIN, prompt=PROMPT, **{**SAMPLED, "seed": SAMPLED["seed"] + i}
        )
        for i in range(3)
    ]
    assert [c.text for c in many.choices] == [a.choices[0].text for a in alone]
    assert [c.finish_reason for c in many.choices] == [a.choices[0].finish_reason for a in alone]
    assert many.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert many.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert len({c.text for c in many.choices}) > 1  # sampled: the seeds differ

    chat = client(server, CHAT).chat.completions
    whole = chat.create(model=CHAT, messages=MESSAGES, n=2, **SAMPLED)
    texts: dict[int, str] = {0: "", 1: ""}
    finished: dict[int, str] = {}
    chunks = list(
        chat.create(
            model=CHAT,
            messages=MESSAGES,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
            **SAMPLED,
        )
    )
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finished[choice.index] = choice.finish_reason
    assert [texts[i] for i in (0, 1)] == [c.message.content for c in whole.choices]
    assert [finished[i] for i in (0, 1)] == [c.finish_reason for c in whole.choices]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


# -- logprobs ---------------------------------------------------------------------------------


@pytest.mark.e2e
def test_logprobs_are_those_of_from_pretrained_scores(server, model_factory):
    """Completions' ``logprobs`` (the legacy lists) and chat's (``content`` entries), whole
    and streamed, are log_softmax of the scores from_pretrained chose each token from."""
    ids = [5, 17, 99, 3, 250, 7]
    reference = model_factory("gpt2").resident()
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = reference.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=GREEDY["max_tokens"],
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    chosen = out.sequences[0, len(ids) :].tolist()
    expected = [
        float(torch.log_softmax(s[0].float(), -1)[t])
        for s, t in zip(out.scores, chosen, strict=True)
    ]
    tops = [torch.topk(torch.log_softmax(s[0].float(), -1), 3) for s in out.scores]

    answer = client(server, PLAIN).completions.create(model=PLAIN, prompt=ids, logprobs=3, **GREEDY)
    got = answer.choices[0].logprobs
    assert got.token_logprobs == expected[: len(got.token_logprobs)]
    assert len(got.tokens) == answer.usage.completion_tokens
    # keyed by the tokens' text, as OpenAI's are: two tokens of one text (bytes of a
    # character, U+FFFD alone) are one key
    for alternatives, top in zip(got.top_logprobs, tops, strict=False):
        assert set(alternatives.values()) <= set(top.values.tolist())
        assert max(alternatives.values()) == top.values[0].item()
    assert got.text_offset[0] == 0

    streamed = [
        lp
        for chunk in client(server, PLAIN).completions.create(
            model=PLAIN, prompt=ids, logprobs=0, stream=True, **GREEDY
        )
        if chunk.choices and chunk.choices[0].logprobs
        for lp in chunk.choices[0].logprobs.token_logprobs
    ]
    assert streamed == got.token_logprobs

    chat = client(server, CHAT).chat.completions
    whole = chat.create(model=CHAT, messages=MESSAGES, logprobs=True, top_logprobs=2, **GREEDY)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob for e in content)
    pieces = chat.create(
        model=CHAT, messages=MESSAGES, logprobs=True, top_logprobs=2, stream=True, **GREEDY
    )
    entries = [
        e
        for c in pieces
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in content]
    plain = chat.create(model=CHAT, messages=MESSAGES, **GREEDY)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == whole.choices[0].message.content


# -- structured output --------------------------------------------------------------------------


# short: the fixture model's small vocabulary spells JSON in many tokens, and its
# max_new_tokens_limit is 32
PERSON = {
    "type": "object",
    "properties": {
        "n": {"type": "string", "maxLength": 2},
        "c": {"enum": ["r", "g"]},
        "a": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["n", "c", "a"],
    "additionalProperties": False,
}


@pytest.mark.e2e
def test_response_format_constrains_the_answer_to_the_schema(server):
    import jsonschema

    chat = client(server, CHAT).chat.completions
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for seed in range(3):
        answer = chat.create(
            model=CHAT,
            messages=MESSAGES,
            response_format=schema_format,
            max_tokens=LIMIT,
            temperature=1.0,
            seed=seed,
        )
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", (choice.message.content, answer.usage)
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    streamed = chat.create(
        model=CHAT, messages=MESSAGES, response_format=schema_format, stream=True, **GREEDY
    )
    whole = chat.create(model=CHAT, messages=MESSAGES, response_format=schema_format, **GREEDY)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == whole.choices[0].message.content
    any_object = chat.create(
        model=CHAT, messages=MESSAGES, response_format={"type": "json_object"}, max_tokens=LIMIT
    )
    content = any_object.choices[0].message.content
    assert any_object.choices[0].finish_reason == "length" or isinstance(json.loads(content), dict)


@pytest.mark.e2e
def test_huggingface_hubs_json_schema_reaches_the_constraint(server):
    """huggingface_hub sends a json_schema as TGI's {"type": "json_object", "value": schema}."""
    import jsonschema
    from huggingface_hub import InferenceClient

    hf = InferenceClient(base_url=f"{server.http_url}/v2/models/{CHAT}/openai/v1")
    answer = hf.chat_completion(
        messages=MESSAGES,
        max_tokens=LIMIT,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
    )
    jsonschema.validate(json.loads(answer.choices[0].message.content), PERSON)


# -- tools ----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_required_or_named_tool_is_always_called_with_valid_arguments(server):
    import jsonschema

    chat = client(server, CHAT).chat.completions
    for choice, names in (("required", {"wx", "tm"}), (NAMED, {"wx"})):
        for seed in range(3):
            answer = chat.create(
                model=CHAT,
                messages=MESSAGES,
                tools=TOOLS,
                tool_choice=choice,
                max_tokens=LIMIT,
                temperature=1.0,
                seed=seed,
            )
            (picked,) = answer.choices
            assert picked.finish_reason == "tool_calls", (picked.message, answer.usage)
            assert picked.message.content is None
            (called,) = picked.message.tool_calls
            assert called.type == "function" and called.id.startswith("call_")
            assert called.function.name in names
            if called.function.name == "wx":
                jsonschema.validate(json.loads(called.function.arguments), WEATHER)
    room = {"temperature": 0, "max_tokens": LIMIT}
    streamed = list(
        chat.create(
            model=CHAT, messages=MESSAGES, tools=TOOLS, tool_choice=NAMED, stream=True, **room
        )
    )
    deltas = [c.choices[0].delta for c in streamed if c.choices]
    calls = [call for delta in deltas for call in delta.tool_calls or []]
    (called,) = calls
    whole = chat.create(model=CHAT, messages=MESSAGES, tools=TOOLS, tool_choice=NAMED, **room)
    assert called.function.arguments == whole.choices[0].message.tool_calls[0].function.arguments
    assert streamed[-1].choices[0].finish_reason == "tool_calls"


NAMED = {"type": "function", "function": {"name": "wx"}}


@pytest.mark.e2e
def test_tool_choice_none_answers_text_and_a_call_goes_back_in_the_chat(server):
    chat = client(server, CHAT).chat.completions
    text = chat.create(model=CHAT, messages=MESSAGES, tools=TOOLS, tool_choice="none", **GREEDY)
    assert text.choices[0].message.tool_calls is None and text.choices[0].message.content
    room = {"temperature": 0, "max_tokens": LIMIT}
    called = chat.create(model=CHAT, messages=MESSAGES, tools=TOOLS, tool_choice=NAMED, **room)
    call = called.choices[0].message.tool_calls[0]
    follow_up = [
        *MESSAGES,
        called.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    again = chat.create(model=CHAT, messages=follow_up, tools=TOOLS, **GREEDY)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_an_auto_answer_is_a_call_only_when_it_is_one():
    from layerstream.serving.openai.tools import as_call, parse_tools

    tools = parse_tools({"tools": TOOLS})
    assert tools.choice == "auto" and not tools.must_call
    good = '{"name": "wx", "arguments": {"c": "R", "d": 2}}'
    for text in (good, f"<tool_call>\n{good}\n</tool_call>"):
        called = as_call(tools, text)
        assert called["function"]["name"] == "wx"
        assert json.loads(called["function"]["arguments"]) == {"c": "R", "d": 2}
    for text in (
        "The weather is fine.",
        '{"name": "wx", "arguments": {"c": "O", "d": 2}}',  # not in its schema
        '{"name": "nope", "arguments": {}}',
        '{"name": "wx", "arguments": {"c": "R", "d": 2}} and more',
    ):
        assert as_call(tools, text) is None, text
    assert as_call(parse_tools({"tools": TOOLS, "tool_choice": "none"}), good) is None


# -- litellm ----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_litellm_as_its_docs_show_it_with_an_openai_compatible_server(server, monkeypatch):
    """litellm's "OpenAI-compatible endpoints": model "openai/NAME", api_base the server's
    /v1; whole and streamed, the same text as the openai client's."""
    # its model price list from the package, not fetched from GitHub (loopback only)
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    expected = (
        client(server, CHAT)
        .chat.completions.create(model=CHAT, messages=MESSAGES, **GREEDY)
        .choices[0]
        .message.content
    )
    base = {"api_base": f"{server.http_url}/v1", "api_key": "unused"}
    answer = litellm.completion(model=f"openai/{CHAT}", messages=MESSAGES, **base, **GREEDY)
    assert answer.choices[0].message.content == expected
    chunks = litellm.completion(
        model=f"openai/{CHAT}", messages=MESSAGES, stream=True, **base, **GREEDY
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    vectors = litellm.embedding(model=f"openai/{PLAIN}", input=["one", "two"], **base)
    assert len(vectors.data) == 2


# -- the Responses API ------------------------------------------------------------------------


@pytest.mark.e2e
def test_responses_are_the_chat_answer_whole_and_streamed(server):
    """What the openai client's README leads with: text in, text out, as a chat is."""
    room = {"max_output_tokens": GREEDY["max_tokens"], "temperature": 0}
    chat = client(server, CHAT).chat.completions.create(model=CHAT, messages=MESSAGES, **GREEDY)
    expected = chat.choices[0].message.content
    answer = server_client(server).responses.create(
        model=CHAT, instructions=MESSAGES[0]["content"], input=MESSAGES[1]["content"], **room
    )
    assert answer.output_text == expected
    assert answer.usage.input_tokens == chat.usage.prompt_tokens
    assert answer.usage.output_tokens == chat.usage.completion_tokens
    assert answer.status in ("completed", "incomplete")
    as_list = server_client(server).responses.create(model=CHAT, input=MESSAGES, **room)
    assert as_list.output_text == expected
    events = list(
        server_client(server).responses.create(model=CHAT, input=MESSAGES, stream=True, **room)
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == expected == events[-1].response.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"input": 5}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input"),
    ],
)
def test_responses_refusals_name_the_field(server, fields, param):
    body = {"model": CHAT, "input": "hi", **fields}
    answer = httpx.post(f"{server.http_url}/v1/responses", json=body, timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


# -- what a hostile check found ----------------------------------------------------------------


@pytest.mark.e2e
def test_streamed_choices_that_do_not_fit_at_once_stream(server):
    """A streamed n > 1 waited for every choice's first event before its 200, while the
    first choices held the KV cache the later ones waited for: it hung until the deadline."""
    tight = OpenAI(
        base_url=f"{server.http_url}/v2/models/{TIGHT}/openai/v1", api_key="unused", timeout=60
    )
    sampled = {"temperature": 1.0, "max_tokens": TIGHT_TOKENS, "seed": 9}
    texts = {0: "", 1: "", 2: ""}
    for chunk in tight.completions.create(model=TIGHT, prompt=PROMPT, n=3, stream=True, **sampled):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    for index in range(3):
        alone = tight.completions.create(
            model=TIGHT, prompt=PROMPT, **{**sampled, "seed": 9 + index}
        )
        assert texts[index] == alone.choices[0].text


@pytest.mark.e2e
def test_a_refusal_of_streamed_choices_is_a_400(server):
    """It was a plain-text 500 (closing a generator still running)."""
    long_prompt = PROMPT * 40  # with max_tokens, more than the model's context
    for _ in range(3):
        with pytest.raises(openai.BadRequestError, match="context"):
            client(server, PLAIN).completions.create(
                model=PLAIN, prompt=long_prompt, n=4, stream=True, max_tokens=LIMIT
            )


@pytest.mark.e2e
def test_a_body_that_cannot_be_read_is_a_400(server):
    answer = httpx.post(
        f"{server.http_url}/v1/completions",
        content=b'{"model": "chat", "prompt": "x"}',
        headers={"content-type": "application/json", "content-encoding": "gzip"},
        timeout=30,
    )
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_request"


@pytest.mark.e2e
def test_an_embeddings_batch_larger_than_the_queue_is_answered(server):
    texts = [f"text number {i}" for i in range(100)]  # the queue holds 64
    answer = server_client(server).embeddings.create(model=PLAIN, input=texts)
    assert [d.index for d in answer.data] == list(range(100))


@pytest.mark.e2e
def test_a_seed_whose_choices_leave_int64_is_a_400_naming_seed(server):
    answer = httpx.post(
        f"{server.http_url}/v1/completions",
        json={"model": PLAIN, "prompt": "x", "n": 2, "seed": 2**63 - 1, "max_tokens": 2},
        timeout=30,
    )
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "seed"


# -- embeddings -------------------------------------------------------------------------------


def v2_embedding(server, name: str, item: dict[str, Any], **params: Any) -> np.ndarray:
    events = raw_sse(
        server.http_url, name, {"inputs": [item], "parameters": {"mode": "embedding", **params}}
    )
    (out,) = [o for o in events[-1]["outputs"] if o["name"] == "embedding"]
    return np.asarray(out["data"], dtype=np.float32)


@pytest.mark.e2e
@pytest.mark.parametrize("name", [CHAT, PLAIN])
def test_embeddings_are_the_v2_embedding_mode(server, name):
    texts = [PROMPT, "A second, longer text to embed"]
    expected = [v2_embedding(server, name, prompt_input(t)) for t in texts]
    for fmt in ("float", "base64", openai.NOT_GIVEN):  # the client asks for base64 by default
        got = client(server, name).embeddings.create(model=name, input=texts, encoding_format=fmt)
        assert [d.index for d in got.data] == [0, 1] and got.model == name
        for vector, want in zip(got.data, expected, strict=True):
            if fmt == "base64":  # asked for explicitly, the client hands the string over
                floats = np.frombuffer(base64.b64decode(vector.embedding), dtype="<f4")
            else:
                floats = np.asarray(vector.embedding, dtype=np.float32)
            assert np.array_equal(floats, want)
    ids = [5, 17, 99, 3]
    got = server_client(server).embeddings.create(model=name, input=[ids, ids[:2]])
    assert got.usage.prompt_tokens == got.usage.total_tokens == 6
    assert np.array_equal(
        np.asarray(got.data[0].embedding, dtype=np.float32),
        v2_embedding(server, name, ids_input(ids)),
    )
    single = server_client(server).embeddings.create(model=name, input=texts[0])
    assert len(single.data) == 1
    assert np.array_equal(np.asarray(single.data[0].embedding, dtype=np.float32), expected[0])
    last = server_client(server).embeddings.create(
        model=name, input=texts[0], extra_body={"pooling": "last"}
    )
    assert np.array_equal(
        np.asarray(last.data[0].embedding, dtype=np.float32),
        v2_embedding(server, name, prompt_input(texts[0]), pooling="last"),
    )


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": [1, "a"]}, "input"),
        ({"input": "a", "dimensions": 3}, "dimensions"),
        ({"input": "a", "encoding_format": "hex"}, "encoding_format"),
        ({"input": "a", "truncate": True}, "truncate"),
        ({"input": "a", "pooling": "max"}, "pooling"),
    ],
)
def test_embeddings_refusals_name_the_field(server, fields, param):
    answer = httpx.post(
        f"{server.http_url}/v1/embeddings", json={"model": CHAT, **fields}, timeout=30
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


# -- tokenize / detokenize --------------------------------------------------------------------


@pytest.mark.e2e
def test_tokenize_gives_the_ids_a_completion_starts_from(server):
    for url in (f"{server.http_url}/tokenize", f"{server.http_url}/v1/tokenize"):
        got = httpx.post(url, json={"model": CHAT, "prompt": PROMPT}, timeout=30).json()
        _, final = v2_answer(server, CHAT, prompt_input(PROMPT))
        assert got["count"] == len(got["tokens"]) == final["prompt_tokens"]
        assert got["max_model_len"] == 128
        back = httpx.post(
            url.replace("tokenize", "detokenize"),
            json={"model": CHAT, "tokens": got["tokens"]},
            timeout=30,
        ).json()
        assert PROMPT in back["prompt"]
    chat = httpx.post(
        f"{server.http_url}/v2/models/{CHAT}/openai/v1/tokenize",
        json={"messages": MESSAGES},
        timeout=30,
    ).json()
    _, final = v2_answer(server, CHAT, messages_input(MESSAGES))
    assert chat["count"] == final["prompt_tokens"]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("tokenize", {"prompt": PROMPT, "add_special_tokens": False}, "add_special_tokens"),
        ("tokenize", {"prompt": PROMPT, "messages": MESSAGES}, "prompt"),
        ("tokenize", {}, "prompt"),
        ("tokenize", {"prompt": 5}, "prompt"),
        ("detokenize", {"tokens": [1, 10**9]}, None),
        ("detokenize", {"tokens": ["a"]}, "tokens"),
    ],
)
def test_tokenize_refusals(server, path, fields, param):
    answer = httpx.post(f"{server.http_url}/v1/{path}", json={"model": CHAT, **fields}, timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


@pytest.mark.e2e
def test_a_path_not_served_is_an_openai_404(server):
    with pytest.raises(openai.NotFoundError, match="/files is not served here"):
        client(server, CHAT).files.list()
    gone = httpx.get(f"{server.http_url}/v2/models/{CHAT}/openai/v1/files", timeout=30)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "chat/completions", "POST"),
        ("DELETE", "models/x", "GET"),
        ("PATCH", "anything", "POST"),
    ],
)
def test_other_methods_get_an_openai_405(server, method, path, allow):
    """They got FastAPI's {"detail": "Method Not Allowed"}, which OpenAI clients cannot read."""
    url = f"{server.http_url}/v2/models/{CHAT}/openai/v1/{path}"
    answer = httpx.request(method, url, json={}, timeout=30)
    assert answer.status_code == 405 and answer.headers["allow"] == allow
    error = answer.json()["error"]
    assert error["code"] == "method_not_allowed" and f"{method} /{path}" in error["message"]


# -- the stream's wire format, in process ------------------------------------------------------


STATS = RequestStats(*([0] * len(RequestStats.__dataclass_fields__)))


def sse_bytes(body: dict[str, Any], events: list[Any]) -> bytes:
    """What the chat endpoint streams for ``events`` (an exception: raised there)."""
    call = openai_body.parse_call(body, "m", chat=True)

    async def source():
        for event in events:
            if isinstance(event, Exception):
                raise event
            yield event

    async def run() -> bytes:
        stream = source()
        first = await stream.__anext__()
        body = completions.stream(call, first, [stream], str)
        return b"".join([chunk async for chunk in body])

    return asyncio.run(run())


def mock_client(payload: bytes) -> OpenAI:
    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=payload)

    transport = httpx2.MockTransport(answer)
    return OpenAI(
        base_url="http://test/v1", api_key="unused", http_client=httpx2.Client(transport=transport)
    )


def test_an_error_after_the_stream_began_raises_in_the_client():
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    events = [TokenEvent(5, "Hi"), RequestTimeout("the request ran past its 1s deadline")]
    payload = sse_bytes(body, events)
    assert payload.endswith(b"data: [DONE]\n\n")
    stream = mock_client(payload).chat.completions.create(**body)
    assert next(stream).choices[0].delta.role == "assistant"
    assert next(stream).choices[0].delta.content == "Hi"
    with pytest.raises(openai.APIError) as excinfo:
        next(stream)
    assert excinfo.value.message == "the request ran past its 1s deadline"
    assert excinfo.value.body == {
        "message": "the request ran past its 1s deadline",
        "type": "server_error",
        "param": None,
        "code": "timeout",
    }


def test_usage_chunk_comes_last():
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    body["stream_options"] = {"include_usage": True}
    stats = dataclasses.replace(STATS, prompt_tokens=7, tokens=2)
    events = [TokenEvent(5, "Hi"), TokenEvent(6, ""), FinalEvent(FinishReason.LENGTH, stats, "!")]
    chunks = list(mock_client(sse_bytes(body, events)).chat.completions.create(**body))
    assert [c.choices[0].delta.content for c in chunks[:-1]] == ["", "Hi", "!"]
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump(exclude_none=True) == {
        "prompt_tokens": 7,
        "completion_tokens": 2,
        "total_tokens": 9,
    }


def test_a_client_that_leaves_before_the_answer_cancels_it():
    # queued, or a unary answer being generated: nothing is sent yet, so only the
    # disconnect message tells
    cancelled = []

    class LeavingRequest:
        async def receive(self):
            await asyncio.sleep(0.01)
            return {"type": "http.disconnect"}

    async def work():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    with pytest.raises(routes._ClientGone):
        asyncio.run(routes._unless_client_leaves(work(), LeavingRequest()))
    assert cancelled == [True]


def test_closing_the_stream_closes_the_engine_events():
    # what a client that leaves mid-stream causes: the engine's event stream is closed at once
    call = openai_body.parse_call({"messages": MESSAGES, "stream": True}, "m", chat=True)
    closed = []

    async def source():
        try:
            for i in range(100):
                yield TokenEvent(i, "x")
        finally:
            closed.append(True)

    async def run() -> None:
        events = source()
        first = await events.__anext__()
        stream = completions.stream(call, first, [events], str)
        await stream.__anext__()
        await stream.__anext__()
        assert not closed
        await stream.aclose()

    asyncio.run(run())
    assert closed == [True]


def test_the_openai_routes_serve_the_version_mlserver_serves_by_default():
    """Of several loaded versions of one name, the highest (MLServer's default for the
    unversioned V2 path), whatever order they loaded in."""
    from types import SimpleNamespace

    from layerstream.serving import loaded

    v2, v1 = (SimpleNamespace(name="versioned", version=v) for v in ("2", "1"))
    for runtime in (v2, v1):
        loaded.register(runtime)
    try:
        assert loaded.find("versioned") is v2
        loaded.unregister(v2)
        assert loaded.find("versioned") is v1
    finally:
        for runtime in (v2, v1):
            loaded.unregister(runtime)
    assert loaded.find("versioned") is None
