"""SIGTERM ends the server in a bounded time, whatever its clients do (serving/shutdown.py)."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from mlserver_proc import (
    JOIN_HOOK,
    MLServerProcess,
    ModelSpec,
    hooked,
    joined,
    prompt_input,
    raw_sse,
    wait_until,
)

from layerstream.chunker.convert import chunk_checkpoint
from layerstream.chunker.presets import write_random_checkpoint
from layerstream.serving.shutdown import GRACE_S

WAIT_S = 60  # bound on every wait for an event; reached only when the code under test hangs


def wide_model(root: Path) -> Path:
    """A GPT-2 whose hidden states for a long prompt are tens of MB as JSON: more than the
    kernel's socket buffers hold, so the server's writes block on a client that reads nothing."""
    config = root / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text(
        json.dumps(
            {
                "model_type": "gpt2",
                "architectures": ["GPT2LMHeadModel"],
                "n_embd": 256,
                "n_layer": 4,
                "n_head": 4,
                "n_positions": 1024,
                "vocab_size": 320,
            }
        )
    )
    source = write_random_checkpoint(str(config), root / "source")
    chunk_checkpoint(source, root / "chunks", "wide", progress=False)
    return root / "chunks"


@pytest.mark.e2e
def test_sigterm_ends_the_server_while_an_sse_client_has_stopped_reading(tmp_path):
    """A client that asked for hidden states and stopped reading kept uvicorn's graceful
    shutdown waiting for its response to finish: SIGTERM did not end the server in 90 s.
    The wait is bounded now: the server exits about GRACE_S after SIGTERM."""
    server = MLServerProcess(
        tmp_path / "server",
        [ModelSpec("wide", wide_model(tmp_path / "wide"), {"torch_threads": 1})],
    ).start()
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        server.wait_ready(["wide"])
        # a small receive window: the server's writes block once a few KiB are unread
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        host, port = server.http_url.removeprefix("http://").split(":")
        client.connect((host, int(port)))
        body = json.dumps(
            {
                "inputs": [prompt_input("streaming weights layer by layer " * 60)],
                "parameters": {"mode": "hidden_states"},
            }
        ).encode()
        client.sendall(
            b"POST /v2/models/wide/generate_stream HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        # the answer has begun and filled the receive window: the server's writes block
        peeked, give_up = b"", time.monotonic() + 120
        while len(peeked) < 4000:
            assert time.monotonic() < give_up, (peeked[:300], server.log_tail())
            select.select([client], [], [], 1)
            peeked = client.recv(8192, socket.MSG_PEEK)
        assert peeked.startswith(b"HTTP/1.1 200"), peeked[:300]

        started = time.monotonic()
        os.killpg(server.proc.pid, signal.SIGTERM)
        code = server.wait_exit(timeout=GRACE_S + 50)
        took = time.monotonic() - started
        assert code is not None, f"still running {took:.0f}s after SIGTERM: {server.log_tail()}"
        assert "to finish before they are cut" in server.log_text()
    finally:
        client.close()
        server.stop()


# the server's sitecustomize.py: the drain is over as soon as shutdown begins, so the test
# (not a clock) decides when the requests in flight reach their next block; and a log line
# for each request joining the sweeps
NO_DRAIN_TIME = "from layerstream.serving import shutdown\nshutdown.DRAIN_S = 0.0\n" + JOIN_HOOK


@pytest.mark.e2e
@pytest.mark.filterwarnings("ignore:The `construct` method is deprecated")  # MLServer's own
def test_sigterm_ends_streams_in_flight_with_a_final_shutdown_event(model_factory, tmp_path):
    """gRPC streams still running after MLServer's 5 s grace were cut with no final event.
    Now every stream in flight, gRPC and SSE, ends with ``finish_reason: shutdown`` after
    the tokens it sent (its solo output's first tokens), and the server exits. The requests
    cannot end on their own first: the store holds a block read until the drain is over."""
    from reference import Reference
    from test_overload import GatedStore

    from layerstream_client import Final, GRPCClient, SSEClient, Token

    llama = model_factory("llama")
    store = GatedStore(llama.store).start()
    env = hooked(tmp_path, NO_DRAIN_TIME)
    extra = {
        "memory_budget": "25%",
        "read_ahead": 0,
        "torch_threads": 1,
        "max_active_sequences": 2,
        "store_read_timeout_s": 600,
        "store_deadline_s": 600,
    }
    server = MLServerProcess(
        tmp_path / "server",
        [ModelSpec("drained", store.url, extra, store_mode="raw")],
        env=env,
    ).start()
    clients = {
        "grpc": GRPCClient(server.grpc_target, timeout=120.0),
        "sse": SSEClient(server.http_url, timeout=120.0),
    }
    prompt = "Once upon a time"
    request = {
        "inputs": [prompt_input(prompt)],
        "parameters": {"max_new_tokens": 100, "temperature": 0},
    }
    events: dict[str, list] = {name: [] for name in clients}
    failures: dict[str, BaseException] = {}

    def read(name: str) -> None:
        try:
            events[name].extend(clients[name].stream("drained", request))
        except BaseException as exc:  # reported by the test below
            failures[name] = exc

    readers = [threading.Thread(target=read, args=(name,)) for name in clients]
    try:
        server.wait_ready()
        one = {"inputs": [prompt_input(prompt)], "parameters": {"max_new_tokens": 1}}
        raw_sse(server.http_url, "drained", one)  # warm: a first request reads more
        before = store.gate.passed
        raw_sse(server.http_url, "drained", one)
        reads_per_token = store.gate.passed - before
        store.gate.close(allow=2 * reads_per_token)  # a few reads pass, a later one is held
        for reader in readers:
            reader.start()
        wait_until(lambda: failures or joined(server) >= 4, "both requests to join the sweeps")
        assert not failures, failures
        store.gate.wait_held()  # inside a token: 100 of them cannot be done
        os.killpg(server.proc.pid, signal.SIGTERM)
        wait_until(
            lambda: "end with finish_reason shutdown" in server.log_text(), "shutdown to begin"
        )
        store.gate.open()
        for reader in readers:
            reader.join(WAIT_S)
        code = server.wait_exit(timeout=GRACE_S + 50)
    finally:
        store.gate.open()
        server.stop()
        store.stop()
    assert not failures, (failures, server.log_tail())
    reference = Reference(llama)
    solo = reference.greedy(reference.encode(prompt), 100)
    for name, got in events.items():
        *tokens, final = got
        assert isinstance(final, Final) and final.finish_reason == "shutdown", (name, final)
        assert all(isinstance(t, Token) for t in tokens)
        assert [t.token_id for t in tokens] == solo[: len(tokens)], name
        assert final.stats["tokens"] == len(tokens) < 100
    assert code is not None, server.log_tail()
