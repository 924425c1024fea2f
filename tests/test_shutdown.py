"""SIGTERM ends the server in a bounded time, whatever its clients do (serving/shutdown.py)."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import time
from pathlib import Path

import pytest
from mlserver_proc import MLServerProcess, ModelSpec, prompt_input

from layerstream.chunker.convert import chunk_checkpoint
from layerstream.chunker.presets import write_random_checkpoint
from layerstream.serving.shutdown import GRACE_S


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
