"""Bad requests and bad chunk stores against a real ``mlserver start``.

A bad request ends an SSE stream with a ``finish_reason: "error"`` event, fails a gRPC call
with INVALID_ARGUMENT and gets HTTP 400 from ``/infer``; the same server then answers a good
request. A corrupted chunk is an error, never a wrong answer; a store that cannot be loaded
at startup stops ``mlserver start`` with a log that says which file and why.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch
from httpx_sse import connect_sse
from mlserver_proc import (
    BERT,
    HOST,
    LLAMA,
    LLAMA_25,
    MAX_NEW_TOKENS_LIMIT,
    MLServerProcess,
    ModelSpec,
    ids_input,
    prompt_input,
    raw_sse,
    serve,
)

from layerstream.engine.plan import plan_residency, resolve_budget
from layerstream.format.manifest import Manifest
from layerstream_client import Final, GRPCClient, HiddenState, SSEClient, StreamError, Token

pytest_plugins = ["mlserver_proc"]
pytestmark = pytest.mark.e2e

LONG_IDS = [(7 * i) % 300 + 5 for i in range(200)]  # context of the fixture models: 128

# (id, model, request, words the error message must contain)
CASES: list[tuple[str, str, dict[str, Any], list[str]]] = [
    (
        "unknown-parameter",
        LLAMA,
        {"inputs": [prompt_input("hi")], "parameters": {"max_new_tokens": 2, "temprature": 0.5}},
        ["unknown parameter", "temprature"],
    ),
    (
        "wrong-input-name",
        LLAMA,
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]},
        ["unknown input", "'text'", "prompt"],
    ),
    (
        "prompt-as-int64",
        LLAMA,
        {"inputs": [{"name": "prompt", "datatype": "INT64", "shape": [3], "data": [5, 6, 7]}]},
        ["prompt", "BYTES", "INT64"],
    ),
    ("empty-prompt", LLAMA, {"inputs": [prompt_input("")]}, ["prompt", "empty"]),
    ("blank-prompt", LLAMA_25, {"inputs": [prompt_input("  \n\t ")]}, ["prompt", "empty"]),
    (
        "tokens-mode-on-encoder",
        BERT,
        {"inputs": [prompt_input("hi")], "parameters": {"mode": "tokens"}},
        ["cannot do mode", "tokens", "embedding"],
    ),
    (
        "bogus-mode",
        LLAMA,
        {"inputs": [prompt_input("hi")], "parameters": {"mode": "summarise"}},
        ["mode", "summarise"],
    ),
    (
        "max-new-tokens-over-limit",
        LLAMA_25,
        {
            "inputs": [prompt_input("hi")],
            "parameters": {"max_new_tokens": MAX_NEW_TOKENS_LIMIT + 1},
        },
        ["max_new_tokens", str(MAX_NEW_TOKENS_LIMIT), str(MAX_NEW_TOKENS_LIMIT + 1)],
    ),
    (
        "prompt-longer-than-context",
        LLAMA,
        {"inputs": [ids_input(LONG_IDS)], "parameters": {"max_new_tokens": 2}},
        ["200 tokens", "context", "128"],
    ),
    (
        "prompt-plus-new-tokens-over-context",
        LLAMA_25,
        {"inputs": [ids_input(LONG_IDS[:120])], "parameters": {"max_new_tokens": 16}},
        ["120 tokens", "max_new_tokens 16", "context"],
    ),
    (
        "long-text-prompt-hidden-states",
        BERT,
        {
            "inputs": [prompt_input(" ".join(["streaming"] * 150))],
            "parameters": {"mode": "hidden_states"},
        },
        ["context", "128"],
    ),
    (
        "layer-out-of-range",
        BERT,
        {"inputs": [prompt_input("hi")], "parameters": {"mode": "hidden_states", "layers": [13]}},
        ["layer 13", "out of range", "0..12"],
    ),
    (
        "negative-layer-out-of-range",
        LLAMA,
        {
            "inputs": [prompt_input("hi")],
            "parameters": {"mode": "hidden_states", "layers": "0,-14"},
        },
        ["layer -14", "out of range"],
    ),
]
CASE_IDS = [case[0] for case in CASES]


@pytest.fixture(scope="module")
def server(layerstream_server):
    return layerstream_server


def assert_mentions(message: str, words: list[str]) -> None:
    assert message, "the error has no message"
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"


def good_request(model: str) -> dict[str, Any]:
    if model == BERT:
        return {"inputs": [prompt_input("a good request")]}  # embedding mode by default
    return {"inputs": [prompt_input("a good request")], "parameters": {"max_new_tokens": 2}}


def check_good_events(model: str, events: list) -> None:
    *body, final = events
    assert isinstance(final, Final) and final.error is None
    if model == BERT:
        assert final.finish_reason == "stop"
        assert final.embedding is not None and len(final.embedding) == 64
    else:
        assert len(body) == 2 and all(isinstance(e, Token) for e in body)
        assert final.finish_reason in ("length", "stop")


@pytest.mark.parametrize(("name", "model", "request_", "words"), CASES, ids=CASE_IDS)
def test_bad_request_over_sse(server, name, model, request_, words):
    # Our client: the error event becomes a StreamError carrying the server's message.
    sse = SSEClient(server.http_url, timeout=60)
    with pytest.raises(StreamError) as caught:
        list(sse.stream(model, request_))
    assert_mentions(str(caught.value), words)
    assert caught.value.error_type == "invalid_request"

    # The wire: a 200 stream whose only event says finish_reason "error", why, and its kind.
    events = raw_sse(server.http_url, model, request_)
    assert len(events) == 1, events
    (event,) = events
    params = event["parameters"]
    assert params["finish_reason"] == "error"
    assert params["error"] == str(caught.value)
    assert params["error_type"] == "invalid_request"
    assert not params["error"].startswith("invalid_request:")  # the kind has its own field
    # its one output says it too: a client decoding outputs[0] of every event shows it
    assert [o["name"] for o in event["outputs"]] == ["error"]
    assert event["outputs"][0]["data"] == [f"invalid_request: {params['error']}"]

    check_good_events(model, list(sse.stream(model, good_request(model))))


@pytest.mark.parametrize(("name", "model", "request_", "words"), CASES, ids=CASE_IDS)
def test_bad_request_over_grpc(server, name, model, request_, words):
    client = GRPCClient(server.grpc_target, timeout=60)
    with pytest.raises(grpc.RpcError) as caught:
        list(client.stream(model, request_))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert_mentions(caught.value.details(), words)
    assert caught.value.details().startswith("invalid_request: ")
    assert isinstance(caught.value, StreamError)  # our client reads the kind from the details
    assert caught.value.error_type == "invalid_request"
    assert caught.value.details() == f"invalid_request: {caught.value}"

    check_good_events(model, list(client.stream(model, good_request(model))))


@pytest.mark.parametrize(("name", "model", "request_", "words"), CASES, ids=CASE_IDS)
def test_bad_request_over_infer(server, name, model, request_, words):
    url = f"{server.http_url}/v2/models/{model}/infer"
    with httpx.Client(timeout=60) as http:
        response = http.post(url, json=request_)
        assert response.status_code == 400, response.text
        assert_mentions(response.json()["error"], words)
        assert response.json()["error"].startswith("invalid_request: ")

        good = http.post(url, json=good_request(model))
    assert good.status_code == 200, good.text
    outputs = {o["name"]: o for o in good.json()["outputs"]}
    if model == BERT:
        assert outputs["embedding"]["shape"] == [64]
    else:
        assert len(outputs["token_ids"]["data"]) == 2


# -- the transport is MLServer's, never a guess from headers ---------------------------------


BAD = CASES[0][2]  # an unknown parameter


def test_a_rest_client_with_grpc_in_its_user_agent_gets_sse_error_events(server):
    """A gateway's user agent (``my-grpc-gateway/1.0``) does not make a REST stream gRPC."""
    url = f"{server.http_url}/v2/models/{LLAMA}/generate_stream"
    headers = {"User-Agent": "my-grpc-gateway/1.0", "Accept-Encoding": "identity"}
    with httpx.Client(timeout=60) as client:
        with connect_sse(client, "POST", url, json=BAD, headers=headers) as source:
            assert source.response.status_code == 200
            events = [json.loads(e.data) for e in source.iter_sse()]
        with connect_sse(client, "POST", url, json=good_request(LLAMA), headers=headers) as ok:
            good = [json.loads(e.data) for e in ok.iter_sse()]
    (event,) = events
    assert event["parameters"]["finish_reason"] == "error"
    assert event["parameters"]["error_type"] == "invalid_request"
    assert "temprature" in event["parameters"]["error"]
    assert [e["parameters"].get("finish_reason") for e in good] == [None, None, "length"]


def _http10(server, path: str, body: bytes) -> tuple[str, bytes]:
    """POST over HTTP/1.0 with no Host header, from a raw socket; (status line, body)."""
    request = (
        f"POST {path} HTTP/1.0\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection((HOST, server.http_port), timeout=60) as sock:
        sock.sendall(request)
        chunks = []
        while data := sock.recv(65536):  # HTTP/1.0: the server closes after the response
            chunks.append(data)
    head, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), payload


def test_an_http10_request_without_host_gets_sse_error_events(server):
    status, body = _http10(server, f"/v2/models/{LLAMA}/generate_stream", json.dumps(BAD).encode())
    assert status.split()[1] == "200", status
    events = [json.loads(line[len(b"data: ") :]) for line in body.split(b"\n\n") if line]
    (event,) = events
    assert event["parameters"]["finish_reason"] == "error"
    assert event["parameters"]["error_type"] == "invalid_request"


# -- a corrupted block chunk, streamed on every request --------------------------------------

TAMPERED, TAMPERED_HIDDEN, HEALTHY = "tampered", "tampered-hidden", "healthy"


def flip_middle(path: Path, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def tampered(model_factory, tmp_path_factory):
    """A server with a llama store whose last block chunk is corrupted (25% budget, no
    read-ahead: that block is read and verified by each request) and a healthy gpt2."""
    llama, gpt2 = model_factory("llama"), model_factory("gpt2")
    root = tmp_path_factory.mktemp("tampered")
    store = root / "store"
    shutil.copytree(llama.store, store)
    manifest = Manifest.from_json((store / "manifest.json").read_text())
    index = len(manifest.blocks) - 1
    chunk = manifest.chunks[manifest.blocks[index].chunk]
    plan = plan_residency(manifest, resolve_budget("25%", manifest.total_bytes), 0)
    assert index in plan.streamed and index != 0  # not loaded at startup: read per request
    flip_middle(store / chunk.file)

    # no background hashing: these tests are about what a request finds
    extra = {
        "memory_budget": "25%",
        "read_ahead": 0,
        "torch_threads": 1,
        "verify_in_background": False,
    }
    specs = [
        ModelSpec(TAMPERED, store, extra),
        ModelSpec(TAMPERED_HIDDEN, store, extra),  # its first request asks for hidden states
        ModelSpec(HEALTHY, gpt2.store, {"torch_threads": 1}, store_mode="copy"),
    ]
    with serve(root / "server", specs) as server:
        yield server, chunk.name, llama


def test_tampered_block_is_an_sse_error_not_a_wrong_answer(tampered):
    server, chunk_name, _ = tampered
    request = {"inputs": [prompt_input("Once upon a time")], "parameters": {"max_new_tokens": 4}}

    events = raw_sse(server.http_url, TAMPERED, request)

    *body, last = events
    # Every token needs every block: the stream must end with the error before any token.
    assert body == []
    assert last["parameters"]["finish_reason"] == "error"
    assert last["parameters"]["error_type"] == "integrity"
    assert_mentions(last["parameters"]["error"], ["sha256", chunk_name])
    assert last["outputs"][0]["data"] == [f"integrity: {last['parameters']['error']}"]
    # Our client raises it; a second request reads the chunk again and fails again.
    with pytest.raises(StreamError) as caught:
        list(SSEClient(server.http_url).stream(TAMPERED, request))
    assert_mentions(str(caught.value), ["sha256", chunk_name])


def test_tampered_block_over_grpc_and_infer(tampered):
    server, chunk_name, _ = tampered
    request = {"inputs": [prompt_input("Once upon a time")], "parameters": {"max_new_tokens": 4}}

    with pytest.raises(grpc.RpcError) as caught:
        list(GRPCClient(server.grpc_target, timeout=60).stream(TAMPERED, request))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details().startswith("integrity: ")
    assert caught.value.error_type == "integrity"
    assert_mentions(caught.value.details(), ["sha256", chunk_name])

    response = httpx.post(f"{server.http_url}/v2/models/{TAMPERED}/infer", json=request, timeout=60)
    assert response.status_code == 500, response.text
    assert response.json()["error"].startswith("integrity: ")
    assert_mentions(response.json()["error"], ["sha256", chunk_name])


def test_tampered_block_hidden_states_stop_at_the_bad_layer(tampered):
    """Hidden states stream as the blocks run: the layers before the corrupted block arrive
    and are exact, then the stream ends with the error instead of the later layers."""
    server, chunk_name, llama = tampered
    resident = llama.resident()
    ids = [11, 22, 33, 44, 55]
    with torch.no_grad():
        states = resident.model(torch.tensor([ids]), output_hidden_states=True).hidden_states

    events: list = []
    with pytest.raises(StreamError) as caught:
        for event in SSEClient(server.http_url).hidden_states(TAMPERED_HIDDEN, input_ids=ids):
            events.append(event)
    assert_mentions(str(caught.value), ["sha256", chunk_name])
    assert caught.value.error_type == "integrity"

    bad_layer = len(states) - 2  # block 11 (the last) would produce hidden state 12
    assert [e.layer for e in events] == list(range(bad_layer + 1))
    for event in events:
        assert isinstance(event, HiddenState)
        values = np.asarray(event.values, dtype=np.float32).reshape(event.shape)
        np.testing.assert_allclose(values, states[event.layer][0].numpy(), rtol=0, atol=1e-5)

    # Now the damage is known: the next request is refused before it runs, same message.
    with pytest.raises(StreamError) as again:
        list(SSEClient(server.http_url).hidden_states(TAMPERED_HIDDEN, input_ids=ids))
    assert str(again.value) == str(caught.value)


def test_server_stays_up_after_chunk_errors(tampered):
    server, _, _ = tampered
    with pytest.raises(StreamError):
        list(SSEClient(server.http_url).generate(TAMPERED, "Once", max_new_tokens=2))

    assert server.alive()
    with httpx.Client(base_url=server.http_url, timeout=10) as http:
        assert http.get("/v2/health/live").status_code == 200
        assert http.get(f"/v2/models/{HEALTHY}/ready").status_code == 200
        # the damaged model stops reporting ready (an orchestrator reschedules it), so the
        # server as a whole is not ready either; requests still get the integrity error
        assert http.get(f"/v2/models/{TAMPERED}/ready").status_code != 200
        assert http.get("/v2/health/ready").status_code != 200
    with pytest.raises(StreamError) as caught:
        list(SSEClient(server.http_url).generate(TAMPERED, "Once", max_new_tokens=2))
    assert caught.value.error_type == "integrity"
    events = list(SSEClient(server.http_url).generate(HEALTHY, "Once", max_new_tokens=3))
    *tokens, final = events
    assert final.finish_reason in ("length", "stop") and len(tokens) == 3


# -- a store that cannot be loaded at startup ------------------------------------------------

BROKEN = "broken"


@pytest.fixture(scope="module")
def failed_starts(model_factory, tmp_path_factory):
    """Both broken servers start at once (each takes seconds to import torch)."""
    llama = model_factory("llama")
    root = tmp_path_factory.mktemp("failed-starts")

    store = root / "tampered-rest"
    shutil.copytree(llama.store, store)
    rest = json.loads((store / "manifest.json").read_text())["chunks"]["rest"]["file"]
    flip_middle(store / rest)
    missing = root / "no-such-store"

    servers = {
        "tampered-rest": (
            MLServerProcess(root / "srv-rest", [ModelSpec(BROKEN, store, {})]),
            [rest, "sha256"],
        ),
        "missing-store": (
            MLServerProcess(root / "srv-missing", [ModelSpec(BROKEN, missing, store_mode="raw")]),
            [str(missing), "does not exist"],
        ),
    }
    for server, _ in servers.values():
        server.start()
    try:
        yield servers
    finally:
        for server, _ in servers.values():
            server.stop()


@pytest.mark.parametrize("case", ["tampered-rest", "missing-store"])
def test_unloadable_store_stops_mlserver_with_a_clear_log(failed_starts, case):
    server, words = failed_starts[case]

    code = server.wait_exit(timeout=90)

    assert code is not None, f"mlserver still runs; log tail:\n{server.log_tail()}"
    log = server.log_text()
    for word in words:
        assert word in log, f"{word!r} not in the log:\n{server.log_tail()}"
    assert f"'{BROKEN}'" in log  # MLServer names the model that failed to load


# -- the client CLI names the kind -----------------------------------------------------------


@pytest.mark.parametrize("transport", ["sse", "grpc"])
def test_the_cli_prints_the_error_kind(server, capsys, transport):
    from layerstream_client.cli import main

    target = ["--url", server.http_url] if transport == "sse" else ["--grpc", server.grpc_target]
    code = main(["generate", *target, "--model", LLAMA, "--max-new-tokens", "0", "hi"])
    assert code == 1
    err = capsys.readouterr().err
    assert "error (invalid_request): max_new_tokens must be between 1 and" in err
