"""Overload, abandoned work and huge prompts, against a real ``mlserver start``.

The model streams its blocks from an HTTP store whose block reads the test can hold (a
gate): a request whose read is held occupies the engine for exactly as long as the test
says, so a full queue, a deadline that passes in the queue or mid-request, and a client
that leaves mid-request are produced on purpose, never by racing a clock.

- A full queue: SSE error event ``overloaded``, ``/infer`` 503, gRPC RESOURCE_EXHAUSTED.
- Deadlines (the ``timeout`` parameter, microseconds): SSE error event ``timeout``,
  ``/infer`` 504, gRPC DEADLINE_EXCEEDED; the engine stops at the next block boundary, so
  the next request is not held behind abandoned work.
- A client that leaves stops the engine at the next block boundary.
- Twenty 1 MB prompts, each refused, leave the server's RSS where it was.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from mlserver_proc import ModelSpec, labels, metric_samples, prompt_input, raw_sse, serve
from remote_servers import StaticServer, _RangeHandler
from test_e2e import Reference

from layerstream_client import Final, GRPCClient, SSEClient, StreamError, Token

pytest_plugins = ["mlserver_proc"]
pytestmark = pytest.mark.e2e

GATED = "gated"
IMPATIENT = "gated-impatient"  # the same store, giving up on it after a second
PROMPT = "Once upon a time"
WAIT_S = 60.0  # bound on waiting for an event; reached only if the code under test hangs
POLL_S = 0.05  # polling interval of bounded polls, not a timing assertion


class Gate:
    """Holds block-chunk GETs while closed; ``allow`` lets that many more through first."""

    def __init__(self):
        self._cond = threading.Condition()
        self._open = True
        self._allow = 0
        self.failing = False  # block GETs are answered 503 (a store that is down)
        self.held = 0  # GETs waiting at the gate now
        self.passed = 0  # block GETs served so far

    def close(self, allow: int = 0) -> None:
        with self._cond:
            self._open, self._allow = False, allow

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def is_open(self) -> bool:
        with self._cond:
            return self._open

    def wait_turn(self) -> None:
        with self._cond:
            if not self._open and self._allow > 0:
                self._allow -= 1
            elif not self._open:
                self.held += 1
                self._cond.notify_all()
                assert self._cond.wait_for(lambda: self._open, timeout=5 * WAIT_S)
                self.held -= 1
            self.passed += 1

    def wait_held(self, count: int = 1) -> None:
        """Until ``count`` GETs wait at the gate (the engine is blocked in a read)."""
        with self._cond:
            assert self._cond.wait_for(lambda: self.held >= count, timeout=WAIT_S), "no read held"


class GatedStore(StaticServer):
    """A static HTTP chunk store (byte ranges) whose block GETs pass through a Gate."""

    def __init__(self, directory: Path):
        self.gate = gate = Gate()

        class GatedHandler(_RangeHandler):
            def do_GET(self) -> None:
                if "block_" in self.path and gate.failing:
                    self.send_error(503, "store down for the test")
                    return
                if "block_" in self.path:
                    gate.wait_turn()
                super().do_GET()

        super().__init__(directory, base=GatedHandler)

    def stop(self) -> None:
        self.gate.open()
        super().stop()


@pytest.fixture(scope="module")
def gated(model_factory, tmp_path_factory) -> Iterator[tuple[Any, Gate, Reference]]:
    """One server: the llama fixture model at a 25% budget, no read-ahead, streamed from a
    gated HTTP store, running one request at a time with room for one waiting request."""
    llama = model_factory("llama")
    store = GatedStore(llama.store).start()
    extra = {
        "memory_budget": "25%",
        "read_ahead": 0,
        "torch_threads": 1,
        "max_queued_requests": 1,
        "max_active_sequences": 1,
        "store_read_timeout_s": 600,
        "store_deadline_s": 600,
    }
    impatient = {**extra, "store_deadline_s": 1, "store_connect_timeout_s": 1}
    specs = [
        ModelSpec(GATED, store.url, extra, store_mode="raw"),
        ModelSpec(IMPATIENT, store.url, impatient, store_mode="raw"),
    ]
    try:
        root = tmp_path_factory.mktemp("overload")
        with serve(root, specs) as server:
            yield server, store.gate, Reference(llama)
    finally:
        store.stop()


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


def greedy_request(n: int, **params: Any) -> dict[str, Any]:
    return {"inputs": [prompt_input(PROMPT)], "parameters": {"max_new_tokens": n, **params}}


def sse_ids(server, request: dict[str, Any]) -> list[int]:
    *tokens, final = SSEClient(server.http_url, timeout=WAIT_S).stream(GATED, request)
    assert isinstance(final, Final) and final.finish_reason in ("length", "stop"), final
    return [t.token_id for t in tokens]


def infer(server, request: dict[str, Any]) -> httpx.Response:
    url = f"{server.http_url}/v2/models/{GATED}/infer"
    return httpx.post(url, json=request, timeout=WAIT_S)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """A bounded poll of something only the server can tell (a metric, a log line)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(POLL_S)


def queued(server) -> float:
    samples = metric_samples(server.metrics_url)
    return samples.get(("layerstream_queued_requests", labels(GATED)), -1.0)


def errors(server, kind: str) -> float:
    key = ("layerstream_request_errors_total", labels(GATED, error_type=kind))
    return metric_samples(server.metrics_url).get(key, 0.0)


def log_lines(server, pattern: str) -> list[int]:
    """Indexes of the server log lines that match ``pattern``."""
    lines = server.log_text().splitlines()
    return [i for i, line in enumerate(lines) if re.search(pattern, line)]


def hold_engine(server, gate: Gate, pool: ThreadPoolExecutor, n: int = 2) -> Future:
    """Start a request whose first block read the gate holds: it occupies the engine."""
    gate.close()
    running = pool.submit(sse_ids, server, greedy_request(n))
    gate.wait_held()
    return running


# -- a full queue ----------------------------------------------------------------------------


def test_a_full_queue_is_overloaded_on_every_transport(gated, pool):
    server, gate, ref = gated
    before = errors(server, "overloaded")
    running = hold_engine(server, gate, pool)
    try:
        waiting = pool.submit(infer, server, greedy_request(3))
        wait_until(lambda: queued(server) == 1, "the second request to be queued")

        (event,) = raw_sse(server.http_url, GATED, greedy_request(2))
        params = event["parameters"]
        assert (params["finish_reason"], params["error_type"]) == ("error", "overloaded")
        assert "retry later" in params["error"] and not params["error"].startswith("overloaded")

        with pytest.raises(StreamError) as caught:
            list(GRPCClient(server.grpc_target, timeout=WAIT_S).stream(GATED, greedy_request(2)))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert caught.value.details().startswith("overloaded: ")
        assert caught.value.error_type == "overloaded"

        refused = infer(server, greedy_request(2))
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"].startswith("overloaded: ")
        assert "retry later" in refused.json()["error"]
        assert not gate.is_open() and not running.done()  # all refused while it was held
    finally:
        gate.open()
    ids = ref.encode(PROMPT)
    assert running.result(timeout=WAIT_S) == ref.greedy(ids, 2)
    body = waiting.result(timeout=WAIT_S)
    assert body.status_code == 200, body.text
    outputs = {o["name"]: o for o in body.json()["outputs"]}
    assert outputs["token_ids"]["data"] == ref.greedy(ids, 3)
    assert errors(server, "overloaded") == before + 3


# -- deadlines -------------------------------------------------------------------------------


def test_a_deadline_that_passes_in_the_queue_is_a_timeout_on_every_transport(gated, pool):
    """The ``timeout`` parameter (microseconds) counts from arrival: a request queued behind
    a held one times out at its deadline, while the first still holds the engine."""
    server, gate, ref = gated
    before = errors(server, "timeout")
    short = greedy_request(2, timeout=200_000)
    running = hold_engine(server, gate, pool)
    try:
        response = infer(server, short)
        assert response.status_code == 504, response.text
        error = response.json()["error"]
        assert error.startswith("timeout: ") and "while waiting for its next event" in error
        assert "0.2s from arrival" in error and "timeout parameter" in error

        (event,) = raw_sse(server.http_url, GATED, short)
        assert event["parameters"]["error_type"] == "timeout"
        assert event["parameters"]["finish_reason"] == "error"

        with pytest.raises(StreamError) as caught:
            list(GRPCClient(server.grpc_target, timeout=WAIT_S).stream(GATED, short))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert caught.value.error_type == "timeout"
        assert not gate.is_open() and not running.done()  # the first never let go
    finally:
        gate.open()
    assert running.result(timeout=WAIT_S) == ref.greedy(ref.encode(PROMPT), 2)
    assert errors(server, "timeout") == before + 3
    # The expired requests never ran: the next one is served at once, and exactly.
    assert sse_ids(server, greedy_request(4)) == ref.greedy(ref.encode(PROMPT), 4)


def test_a_long_request_past_its_deadline_stops_at_the_next_block(gated, pool):
    """The issue's abandoned /infer: 100 tokens asked, a short timeout. The client gets 504
    at its deadline; the engine, blocked in a read until then, stops at the next block
    instead of generating 100 tokens, and only then does the next request start."""
    server, gate, ref = gated
    gate.close()
    try:
        long = {**greedy_request(100, timeout=1_000_000), "id": "long-one"}
        answer = pool.submit(infer, server, long)
        gate.wait_held()  # running, and its block read is held: it runs past the deadline
        response = answer.result(timeout=WAIT_S)
        assert response.status_code == 504, response.text
        assert response.json()["error"].startswith("timeout: ")
        assert not gate.is_open() and gate.held == 1  # the engine is still in that read
    finally:
        gate.open()
    after = {**greedy_request(6), "id": "next-one"}
    assert sse_ids(server, after) == ref.greedy(ref.encode(PROMPT), 6)

    stopped = log_lines(server, r"request long-one stopped at its deadline after 0 events")
    served = log_lines(server, r"gated tokens: length.*\(request next-one\)")
    assert stopped, server.log_tail()
    assert served, server.log_tail()
    assert stopped[0] < served[0]  # the abandoned job ended before the next one ran


# -- a store that is down -------------------------------------------------------------------


def test_a_store_that_is_down_is_store_unavailable_on_every_transport(gated):
    server, gate, ref = gated
    request = greedy_request(2)
    gate.failing = True
    try:
        (event,) = raw_sse(server.http_url, IMPATIENT, request)
        assert event["parameters"]["error_type"] == "store_unavailable"
        assert "503" in event["parameters"]["error"]

        with pytest.raises(StreamError) as caught:
            list(GRPCClient(server.grpc_target, timeout=WAIT_S).stream(IMPATIENT, request))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert caught.value.error_type == "store_unavailable"

        response = httpx.post(
            f"{server.http_url}/v2/models/{IMPATIENT}/infer", json=request, timeout=WAIT_S
        )
        assert response.status_code == 502, response.text
        assert response.json()["error"].startswith("store_unavailable: ")
    finally:
        gate.failing = False
    *tokens, final = SSEClient(server.http_url, timeout=WAIT_S).stream(IMPATIENT, request)
    expected = ref.greedy(ref.encode(PROMPT), 2)
    assert [t.token_id for t in tokens] == expected  # the store is back: exact again
    assert final.finish_reason == ref.finish_reason(expected, 2)


# -- a client that leaves --------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["sse", "grpc"])
def test_a_client_that_leaves_stops_the_engine_at_the_next_block(gated, transport):
    """The client reads one token and goes (closes the SSE connection, cancels the gRPC
    call) while the engine is held in a read for the second: once the read is let go, the
    engine stops at the next block instead of generating the 32 tokens asked for."""
    server, gate, ref = gated
    sse_ids(server, greedy_request(1))  # warm: reads of a first request may differ
    before = gate.passed
    sse_ids(server, greedy_request(1))
    reads_per_token = gate.passed - before
    assert reads_per_token > 0  # at 25%, every token reads the streamed blocks

    leaver = f"leaver-{transport}"
    if transport == "sse":
        client = SSEClient(server.http_url, timeout=WAIT_S)
    else:
        client = GRPCClient(server.grpc_target, timeout=WAIT_S)
    gate.close(allow=reads_per_token)  # the first token's reads pass, the next one is held
    try:
        stream = client.stream(GATED, {**greedy_request(32), "id": leaver})
        first = next(stream)
        assert isinstance(first, Token) and first.token_id == ref.greedy(ref.encode(PROMPT), 1)[0]
        gate.wait_held()  # generating the second token, blocked in a read
        stream.close()  # the client leaves
        wait_until(lambda: log_lines(server, rf"request {leaver}: the client left"), "the leave")
    finally:
        gate.open()
    assert sse_ids(server, greedy_request(3)) == ref.greedy(ref.encode(PROMPT), 3)
    # After the next request: the abandoned one ended first, after its one token.
    assert log_lines(server, rf"request {leaver} cancelled by the client; stopped after 1 events")


# -- huge prompts ----------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_huge_prompts_are_refused_without_growing_the_server(gated):
    """Twenty 1 MB prompts, each too long for the model's 128-token context, are refused
    before anything tokenizes them: the server's RSS stays within 5% of where it was."""
    server, _, ref = gated
    assert sse_ids(server, greedy_request(4)) == ref.greedy(ref.encode(PROMPT), 4)  # warm
    huge = "streaming layers " * (2**20 // 17)
    assert len(huge.encode()) > 10**6 - 20
    before = rss_bytes(server.proc.pid)
    with httpx.Client(timeout=WAIT_S) as client:
        for _ in range(20):
            response = client.post(
                f"{server.http_url}/v2/models/{GATED}/infer",
                json={"inputs": [prompt_input(huge)]},
            )
            assert response.status_code == 400, response.text[:300]
            error = response.json()["error"]
            assert "over this model's limit" in error and "context of 128 tokens" in error
    after = rss_bytes(server.proc.pid)
    assert after <= before * 1.05, f"RSS grew from {before / 2**20:.0f} to {after / 2**20:.0f} MiB"
    assert sse_ids(server, greedy_request(4)) == ref.greedy(ref.encode(PROMPT), 4)


def test_a_prompt_is_measured_in_utf8_bytes(gated):
    """Just over the limit in bytes, though not in characters: refused over SSE as an
    invalid_request event that gives both numbers."""
    server, _, _ = gated
    limit = int(re.findall(r"prompts over (\d+) bytes are refused", server.log_text())[-1])
    text = "✓" * (limit // 3 + 1)  # three bytes each
    assert len(text) <= limit < len(text.encode())
    (event,) = raw_sse(server.http_url, GATED, {"inputs": [prompt_input(text)]})
    assert event["parameters"]["error_type"] == "invalid_request"
    error = event["parameters"]["error"]
    assert f"is {len(text.encode())} bytes, over this model's limit of {limit} bytes" in error
