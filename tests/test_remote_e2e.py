"""Remote stores behind a real ``mlserver start``: S3 (moto) and HTTP through a fault proxy.

The fault matrix over the wire: the store going down in the middle of a streamed generation
ends the SSE stream with a ``finish_reason: "error"`` event (gRPC: an error status) that
names the cause; the server stays up, and once the store is back the next request is exact.
Failed requests leak no memory.
"""

from __future__ import annotations

import grpc
import httpx
import pytest
from mlserver_proc import MLServerProcess, ModelSpec, serve
from reference import Reference
from remote_servers import FaultProxy, S3Server, StaticServer
from test_e2e import split

from layerstream_client import GRPCClient, SSEClient, StreamError, Token

pytest_plugins = ["mlserver_proc"]
pytestmark = pytest.mark.e2e

S3_MODEL, HTTP_MODEL = "s3-llama", "http-llama"
PATIENT_MODEL = "http-llama-patient"  # the same store, with room to retry under a slow CI box
IDS = [7, 42, 99, 150, 200, 11, 11, 300, 5]
N = 8
DEADLINE_S = 0.5
RETRYING = {"store_deadline_s": DEADLINE_S, "store_connect_timeout_s": 0.5}


@pytest.fixture(scope="module")
def remote(model_factory, tmp_path_factory):
    """One server: the llama fixture model chunked into moto's S3, and the same store served
    over HTTP through a fault proxy (25% budget: most blocks are fetched on every token)."""
    llama = model_factory("llama")
    root = tmp_path_factory.mktemp("remote-e2e")
    s3 = S3Server(root).start()
    static = StaticServer(llama.store).start()
    proxy = FaultProxy(static.port).up()
    try:
        s3.chunk(llama.source, "s3://models/llama", "llama")
        common = {"memory_budget": "25%", "read_ahead": 1, "torch_threads": 1}
        specs = [
            ModelSpec(
                S3_MODEL,
                "s3://models/llama",
                common | {"s3_endpoint_url": s3.endpoint},
                store_mode="raw",
            ),
            ModelSpec(HTTP_MODEL, proxy.url, common | RETRYING, store_mode="raw"),
            ModelSpec(
                PATIENT_MODEL, proxy.url, common | {"store_deadline_s": 30}, store_mode="raw"
            ),
        ]
        with serve(root / "server", specs, env=s3.env()) as server:
            yield server, proxy, s3, Reference(llama)
    finally:
        proxy.stop()
        static.stop()
        s3.stop()


def client(server, transport: str):
    if transport == "sse":
        return SSEClient(server.http_url, timeout=60)
    return GRPCClient(server.grpc_target, timeout=60)


@pytest.mark.parametrize("transport", ["sse", "grpc"])
@pytest.mark.parametrize("model", [S3_MODEL, HTTP_MODEL])
def test_remote_stores_serve_exact_tokens(remote, model, transport):
    server, _, _, reference = remote
    tokens, _, final = split(
        list(client(server, transport).generate(model, input_ids=IDS, max_new_tokens=N))
    )
    assert [t.token_id for t in tokens] == reference.greedy(IDS, N)
    assert final.stats["bytes_streamed"] > 0


@pytest.mark.parametrize("transport", ["sse", "grpc"])
def test_store_down_mid_stream_is_an_error_event_then_recovers(remote, transport):
    server, proxy, _, reference = remote
    received = []
    try:
        with pytest.raises((StreamError, grpc.RpcError)) as caught:
            for event in client(server, transport).generate(
                HTTP_MODEL, input_ids=IDS, max_new_tokens=N
            ):
                received.append(event)
                if len(received) == 2:
                    proxy.down()  # the store goes away with the stream half done
    finally:
        proxy.up()
    message = str(caught.value) if transport == "sse" else caught.value.details()
    assert "gave up after" in message and proxy.url in message, message
    assert "ConnectError" in message, message
    assert all(isinstance(e, Token) for e in received) and len(received) >= 2
    if transport == "grpc":
        assert caught.value.code() != grpc.StatusCode.OK

    assert server.alive()
    assert httpx.get(f"{server.http_url}/v2/health/ready", timeout=10).status_code == 200
    tokens, _, _ = split(
        list(client(server, transport).generate(HTTP_MODEL, input_ids=IDS, max_new_tokens=N))
    )
    assert [t.token_id for t in tokens] == reference.greedy(IDS, N)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_failed_requests_leak_no_memory(remote):
    server, proxy, _, reference = remote
    sse = SSEClient(server.http_url, timeout=60)

    def fail_once() -> None:
        with pytest.raises(StreamError, match="gave up after"):
            list(sse.generate(HTTP_MODEL, input_ids=IDS, max_new_tokens=N))

    proxy.down()
    try:
        for _ in range(5):  # allocator and caches reach their steady state
            fail_once()
        before = rss(server.proc.pid)
        for _ in range(50):
            fail_once()
        after = rss(server.proc.pid)
    finally:
        proxy.up()
    assert abs(after - before) <= 0.05 * before, (before, after)
    tokens, _, _ = split(list(sse.generate(HTTP_MODEL, input_ids=IDS, max_new_tokens=N)))
    assert [t.token_id for t in tokens] == reference.greedy(IDS, N)


def test_wrong_s3_credentials_stop_mlserver_with_a_clear_log(remote, tmp_path):
    _, _, s3, _ = remote
    spec = ModelSpec(
        "bad-keys", "s3://models/llama", {"s3_endpoint_url": s3.endpoint}, store_mode="raw"
    )
    server = MLServerProcess(tmp_path, [spec], env=s3.env(wrong=True)).start()
    try:
        code = server.wait_exit(timeout=90)
        assert code is not None, server.log_tail()
        log = server.log_text()
        for words in ["s3://models/llama/manifest.json", "access denied", "AWS_ACCESS_KEY_ID"]:
            assert words in log, server.log_tail()
    finally:
        server.stop()


@pytest.mark.parametrize("transport", ["sse", "grpc"])
def test_transient_faults_are_invisible_to_the_client(remote, transport):
    """A cut body, a flipped byte and a throttled request, all during one generation: the
    store retries or refetches, and the client gets exactly the right tokens."""
    server, proxy, _, reference = remote
    proxy.truncate, proxy.corrupt, proxy.throttle = 1, 1, 1
    events = client(server, transport).generate(PATIENT_MODEL, input_ids=IDS, max_new_tokens=N)
    tokens, _, _ = split(list(events))
    assert (proxy.truncate, proxy.corrupt, proxy.throttle) == (0, 0, 0)
    assert [t.token_id for t in tokens] == reference.greedy(IDS, N)


def test_bytes_corrupted_on_every_fetch_end_the_stream_with_an_error(remote):
    server, proxy, _, reference = remote
    proxy.corrupt = 10**6
    try:
        with pytest.raises(StreamError, match="sha256"):
            list(SSEClient(server.http_url).generate(HTTP_MODEL, input_ids=IDS, max_new_tokens=N))
    finally:
        proxy.corrupt = 0
    tokens, _, _ = split(
        list(SSEClient(server.http_url).generate(HTTP_MODEL, input_ids=IDS, max_new_tokens=N))
    )
    assert [t.token_id for t in tokens] == reference.greedy(IDS, N)


def test_restarted_server_with_a_warm_disk_cache_reads_nothing_from_the_remote(
    model_factory, tmp_path
):
    llama = model_factory("llama")
    static = StaticServer(llama.store).start()
    proxy = FaultProxy(static.port).up()
    extra = {"memory_budget": "25%", "torch_threads": 1, "cache_dir": str(tmp_path / "cache")}
    spec = ModelSpec("cached", proxy.url, extra, store_mode="raw")
    reference = Reference(llama)
    try:
        for run in ("cold", "restarted"):
            before, sent = len(proxy.requests), proxy.body_bytes
            with serve(tmp_path / run, [spec]) as server:
                events = SSEClient(server.http_url).generate(
                    "cached", input_ids=IDS, max_new_tokens=N
                )
                tokens, _, _ = split(list(events))
                assert [t.token_id for t in tokens] == reference.greedy(IDS, N)
        assert proxy.requests[before:] == [("GET", "/manifest.json")]  # answered 304
        assert proxy.body_bytes == sent
    finally:
        proxy.stop()
        static.stop()
