"""S3 and HTTP(S) chunk stores against real servers on 127.0.0.1, and how the engine
behaves when the store misbehaves (a TCP proxy between them injects the faults)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading

import pytest
import torch
from conftest import SCALED
from remote_servers import FaultProxy, S3Server, StaticServer

from layerstream.chunker.convert import chunk_checkpoint
from layerstream.chunker.sinks import ChunkerError
from layerstream.engine.engine import Engine, EngineOptions
from layerstream.errors import ChunkIntegrityError, ChunkStoreError
from layerstream.stores import StoreOptions, open_store
from layerstream.stores.http import HTTPStore
from layerstream.stores.s3 import S3Store

PROMPT = torch.arange(5, 21).unsqueeze(0)
NEW_TOKENS = 8
FAST = dict(connect_timeout_s=1.0, read_timeout_s=1.0, deadline_s=3.0, part_bytes=64 << 10)


@pytest.fixture(scope="module")
def llama(model_factory):
    return model_factory("llama")


@pytest.fixture(scope="module")
def reference_ids(llama) -> list[int]:
    model = llama.resident()
    with torch.inference_mode():
        out = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0].tolist()


def generate(engine: Engine, streamer=None) -> list[int]:
    with engine.request():
        out = engine.model.generate(
            PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, streamer=streamer
        )
    return out[0].tolist()


def remote_engine(uri: str, budget: str = "25%", **options) -> Engine:
    store = open_store(uri, options=StoreOptions(**(FAST | options)))
    try:
        return Engine(store, EngineOptions(memory_budget=budget, read_ahead=1))
    except BaseException:
        store.close()
        raise


@pytest.fixture
def static(llama):
    server = StaticServer(llama.store).start()
    yield server
    server.stop()


@pytest.fixture
def proxy(static):
    fault = FaultProxy(static.port).up()
    yield fault
    fault.stop()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return s3


# -- HTTP ------------------------------------------------------------------------------------


def test_http_store_reads_every_file_exactly_in_ranged_parts(llama, static):
    store = HTTPStore(static.url, StoreOptions(**FAST))
    try:
        for path in sorted(llama.store.iterdir()):
            expected = path.read_bytes()
            assert store.read(path.name) == expected
            buffer = bytearray(len(expected) + 100)
            got = store.read_into(path.name, memoryview(buffer))
            assert got.size == len(expected) and bytes(buffer[: got.size]) == expected
            assert got.version is None  # bytes that crossed a network are hashed every time
        assert store.exists("manifest.json") and not store.exists("nope.json")
    finally:
        store.close()


def test_http_store_without_range_support_still_reads_whole_files(llama):
    server = StaticServer(llama.store, ranges=False).start()
    store = HTTPStore(server.url, StoreOptions(**FAST))
    try:
        path = llama.store / "block_0000.safetensors"
        assert path.stat().st_size > FAST["part_bytes"]  # more than one part
        buffer = bytearray(path.stat().st_size)
        assert store.read_into(path.name, memoryview(buffer)).size == len(buffer)
        assert bytes(buffer) == path.read_bytes()
    finally:
        store.close()
        server.stop()


def test_http_store_names_the_missing_file(static):
    store = HTTPStore(static.url, StoreOptions(**FAST))
    with pytest.raises(ChunkStoreError, match=r"block_9999.safetensors is missing \(HTTP 404\)"):
        store.read_into("block_9999.safetensors", memoryview(bytearray(10)))
    store.close()


def test_http_store_refuses_a_file_larger_than_the_manifest_allows(llama, static):
    store = HTTPStore(static.url, StoreOptions(**FAST))
    with pytest.raises(ChunkStoreError, match="more than the manifest allows"):
        store.read_into("block_0000.safetensors", memoryview(bytearray(64)))
    store.close()


def test_http_bearer_token(llama, reference_ids):
    server = StaticServer(llama.store, token="s3cret").start()
    try:
        with pytest.raises(ChunkStoreError, match="access denied; set http_bearer_token"):
            remote_engine(server.url)
        engine = remote_engine(server.url, bearer_token="s3cret")
        try:
            assert generate(engine) == reference_ids
        finally:
            engine.close()
    finally:
        server.stop()


def test_engine_over_http_is_exact(static, reference_ids):
    engine = remote_engine(static.url)
    try:
        assert engine.streamer.reader == "read"
        assert generate(engine) == reference_ids
        assert engine.streamer.stats.chunks_verified == engine.streamer.stats.chunks_read
    finally:
        engine.close()


# -- S3 --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_model(s3, llama):
    """The llama fixture model chunked straight into the S3 server."""
    return s3.chunk(llama.source, "s3://models/llama", "llama")


def test_chunker_uploads_the_same_files_to_s3(s3, s3_env, s3_model, llama):
    store = S3Store(s3_model, StoreOptions(endpoint_url=s3.endpoint, **FAST))
    try:
        local = sorted(p.name for p in llama.store.iterdir())
        assert store.list() == local
        for name in local:
            assert store.read(name) == (llama.store / name).read_bytes(), name
    finally:
        store.close()


def test_engine_over_s3_is_exact(s3, s3_env, s3_model, reference_ids):
    engine = remote_engine(s3_model, endpoint_url=s3.endpoint)
    try:
        assert generate(engine) == reference_ids
    finally:
        engine.close()


def test_s3_wrong_credentials_say_so(s3, s3_model, monkeypatch, caplog):
    """Access denied is permanent: it fails at the first answer, never retried until the
    deadline (which would only delay the same error)."""
    for key, value in s3.env(wrong=True).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ChunkStoreError) as info:
        remote_engine(s3_model, endpoint_url=s3.endpoint)
    message = str(info.value)
    assert "s3://models/llama/manifest.json" in message
    assert "access denied (SignatureDoesNotMatch)" in message
    assert "AWS_ACCESS_KEY_ID" in message
    assert "gave up after" not in message
    assert not [r for r in caplog.records if "retry" in r.getMessage()]


def test_s3_missing_bucket_and_key_say_so(s3, s3_env):
    with pytest.raises(ChunkStoreError, match="the bucket does not exist"):
        remote_engine("s3://no-such-bucket/x", endpoint_url=s3.endpoint)
    with pytest.raises(ChunkStoreError, match=r"s3://models/nothing-here/manifest.json does not"):
        remote_engine("s3://models/nothing-here", endpoint_url=s3.endpoint)


def test_s3_chunker_refuses_to_overwrite_without_force(s3, s3_env, s3_model, llama):
    options = StoreOptions(endpoint_url=s3.endpoint)
    with pytest.raises(ChunkerError, match="already holds"):
        chunk_checkpoint(llama.source, s3_model, "llama", progress=False, store_options=options)


def test_interrupted_s3_chunking_leaves_no_manifest(s3, s3_env, llama, monkeypatch):
    """The manifest goes up last: a chunker that dies half-way leaves a store that no server
    mistakes for a complete one."""
    from layerstream.chunker.sinks import S3Sink

    uploaded = []
    real = S3Sink.file_done

    def failing(self, name):
        if len(uploaded) == 3:
            raise OSError("disk on fire")
        uploaded.append(name)
        real(self, name)

    monkeypatch.setattr(S3Sink, "file_done", failing)
    options = StoreOptions(endpoint_url=s3.endpoint)
    with pytest.raises(OSError, match="disk on fire"):
        chunk_checkpoint(
            llama.source, "s3://models/partial", "x", progress=False, store_options=options
        )
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket="models")["Contents"]}
    assert {f"partial/{n}" for n in uploaded} <= keys
    assert "partial/manifest.json" not in keys
    with pytest.raises(ChunkStoreError, match=r"manifest\.json does not exist"):
        remote_engine("s3://models/partial", endpoint_url=s3.endpoint)


def _keys(s3, prefix: str) -> set[str]:
    listed = s3.client().list_objects_v2(Bucket="models", Prefix=prefix)
    return {o["Key"].removeprefix(prefix) for o in listed.get("Contents", [])}


def test_a_store_replaced_on_s3_stays_whole_and_served_until_the_new_one_is(
    s3, s3_env, llama, model_factory, reference_ids, monkeypatch
):
    """``--force`` over an S3 store deleted its manifest first, then overwrote its chunks in
    place: a chunker killed half-way left neither store, and a server's streams failed. The
    new store is written beside the old one (a folder the new manifest names); the old one
    is served, whole, until the new manifest replaces it in one PUT, then goes."""
    from layerstream.chunker.sinks import S3Sink

    uri, options = "s3://models/replaced", StoreOptions(endpoint_url=s3.endpoint)
    s3.chunk(llama.source, uri, "llama")
    first = _keys(s3, "replaced/")
    scaled = model_factory("llama", weight_scale=SCALED)
    with torch.inference_mode():
        out = scaled.resident().generate(
            PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )
    scaled_ids = out[0].tolist()
    assert scaled_ids != reference_ids

    engine = remote_engine(uri, endpoint_url=s3.endpoint)  # serving the old store throughout
    try:
        uploads = []
        real = S3Sink.file_done

        def dies_half_way(self, name):
            if len(uploads) == 3:
                raise OSError("killed")
            uploads.append(name)
            real(self, name)

        monkeypatch.setattr(S3Sink, "file_done", dies_half_way)
        with pytest.raises(OSError, match="killed"):
            chunk_checkpoint(
                scaled.source, uri, "llama", force=True, progress=False, store_options=options
            )
        monkeypatch.setattr(S3Sink, "file_done", real)
        assert first <= _keys(s3, "replaced/")  # the old store is whole
        assert generate(engine) == reference_ids
        again = remote_engine(uri, endpoint_url=s3.endpoint)  # and loads as it was
        try:
            assert generate(again) == reference_ids
        finally:
            again.close()

        # the next run completes: the new store is served, the old one's objects are gone,
        # and so are the dead run's
        manifest = chunk_checkpoint(
            scaled.source, uri, "llama", force=True, progress=False, store_options=options
        )
        folders = {info.file.split("/")[0] for info in manifest.chunks.values()}
        assert len(folders) == 1 and folders.pop().startswith("r-")
        keys = _keys(s3, "replaced/")
        assert keys == {
            "manifest.json",
            *(i.file for i in manifest.chunks.values()),
            *manifest.files,
        }
        assert not keys & (first - {"manifest.json"})
    finally:
        engine.close()
    replaced = remote_engine(uri, endpoint_url=s3.endpoint)
    try:
        assert generate(replaced) == scaled_ids
    finally:
        replaced.close()


# -- faults ----------------------------------------------------------------------------------


def run_with_bound(fn, bound_s: float):
    """fn() in a thread; fails the test if it has not returned after bound_s (a hang)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(bound_s)
    assert not thread.is_alive(), f"still running after {bound_s}s: the deadline did not fire"
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_store_down_at_load_fails_within_the_deadline(proxy):
    proxy.down()
    with pytest.raises(ChunkStoreError) as info:
        run_with_bound(lambda: remote_engine(proxy.url, deadline_s=1.0), 30)
    assert f"{proxy.url}/manifest.json" in str(info.value)
    assert "gave up after" in str(info.value) and "ConnectError" in str(info.value)


def test_slow_store_times_out(proxy):
    proxy.delay_s = 2.0
    with pytest.raises(ChunkStoreError, match="timed out"):
        run_with_bound(lambda: remote_engine(proxy.url, read_timeout_s=0.3, deadline_s=1.0), 30)


def test_truncated_bodies_are_retried_and_output_stays_exact(proxy, reference_ids):
    engine = remote_engine(proxy.url, deadline_s=20.0)  # room for the backoff on a slow box
    try:
        proxy.truncate = 3
        assert generate(engine) == reference_ids
        assert proxy.truncate == 0  # all three faults happened
    finally:
        engine.close()


def test_corrupted_chunk_is_fetched_again_then_exact(proxy, reference_ids):
    engine = remote_engine(proxy.url)
    try:
        proxy.corrupt = 1
        assert generate(engine) == reference_ids
        assert proxy.corrupt == 0
        assert engine.streamer.stats.refetches == 1
    finally:
        engine.close()


def test_chunk_corrupted_on_every_fetch_fails_the_request(proxy, reference_ids):
    engine = remote_engine(proxy.url)
    try:
        proxy.corrupt = 10**6
        with pytest.raises(ChunkIntegrityError, match="failed its sha256 check"):
            generate(engine)
        proxy.corrupt = 0
        assert generate(engine) == reference_ids
    finally:
        engine.close()


def test_store_down_mid_generation_fails_then_recovers_exactly(proxy, reference_ids):
    from transformers.generation.streamers import BaseStreamer

    class StopStoreAfter(BaseStreamer):
        def __init__(self, tokens: int):
            self.seen = 0
            self.tokens = tokens

        def put(self, value):
            self.seen += 1
            if self.seen == self.tokens:
                proxy.down()

        def end(self):
            pass

    engine = remote_engine(proxy.url, deadline_s=1.0)
    try:
        stopper = StopStoreAfter(3)
        with pytest.raises(ChunkStoreError, match="gave up after"):
            run_with_bound(lambda: generate(engine, stopper), 60)
        assert stopper.seen == 3  # it failed mid-way, after streaming tokens
        proxy.up()
        assert generate(engine) == reference_ids
    finally:
        engine.close()


def test_throttled_http_requests_are_retried(proxy, reference_ids):
    engine = remote_engine(proxy.url, deadline_s=20.0)  # room for the backoff
    try:
        proxy.throttle = 3
        assert generate(engine) == reference_ids
        assert proxy.throttle == 0
    finally:
        engine.close()


def test_s3_slow_down_and_cut_bodies_are_retried(s3, s3_env, s3_model, reference_ids):
    fault = FaultProxy(s3.port).up()
    try:
        engine = remote_engine(
            s3_model, endpoint_url=fault.url, addressing_style="path", deadline_s=20.0
        )
        try:
            fault.throttle, fault.truncate = 3, 2
            assert generate(engine) == reference_ids
            assert (fault.throttle, fault.truncate) == (0, 0)
        finally:
            engine.close()
    finally:
        fault.stop()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_https_verifies_the_certificate_and_takes_a_ca_bundle(llama, certificate, reference_ids):
    server = StaticServer(llama.store, tls=certificate).start()
    try:
        with pytest.raises(ChunkStoreError, match=r"TLS verification failed.*http_ca_bundle"):
            remote_engine(server.url)
        engine = remote_engine(server.url, ca_bundle=str(certificate[0]))
        try:
            assert generate(engine) == reference_ids
        finally:
            engine.close()
    finally:
        server.stop()


def test_side_files_are_checked_against_the_manifest(llama, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(llama.store, store)
    manifest = json.loads((store / "manifest.json").read_text())
    assert set(manifest["file_sha256"]) == set(manifest["files"]) >= {"config.json"}
    config = store / "config.json"
    config.write_text(config.read_text().replace('"hidden_size": 64', '"hidden_size":  64'))
    server = StaticServer(store).start()
    try:
        with pytest.raises(ChunkIntegrityError, match=r"config\.json does not match .* twice"):
            remote_engine(server.url)
        # a store chunked before file checksums existed still loads
        del manifest["file_sha256"]
        (store / "manifest.json").write_text(json.dumps(manifest))
        remote_engine(server.url).close()
    finally:
        server.stop()


def test_known_size_fetches_every_part_at_once(llama, proxy, monkeypatch):
    """With the manifest's size, a chunk is split across max_concurrency connections (a
    store that caps each connection's rate is read that many times faster); a size that
    differs from the manifest's is an error, never a short or padded chunk."""
    from layerstream.stores import ranged

    monkeypatch.setattr(ranged, "MIN_PART", 1024)
    store = HTTPStore(proxy.url, StoreOptions(**(FAST | {"max_concurrency": 4})))
    try:
        path = llama.store / "block_0001.safetensors"
        expected = path.read_bytes()
        buffer = bytearray(len(expected))
        store.read_into("block_0000.safetensors", memoryview(bytearray(1 << 20)))  # learns ranges
        before = len(proxy.requests)
        got = store.read_into(path.name, memoryview(buffer), len(expected))
        assert got.size == len(expected) and bytes(buffer) == expected
        assert proxy.requests[before:] == [("GET", "/block_0001.safetensors")] * 4
        with pytest.raises(ChunkStoreError, match=r"the manifest says|HTTP 416"):
            store.read_into(path.name, memoryview(bytearray(len(expected) + 8)), len(expected) + 8)
    finally:
        store.close()


def test_cli_chunks_to_s3_and_points_the_model_repo_at_it(s3, s3_env, llama, tmp_path):
    from layerstream.chunker.cli import main

    code = main(
        [
            "chunk",
            str(llama.source),
            "s3://models/cli-llama",
            "--name",
            "cli-llama",
            "--model-repo",
            str(tmp_path / "repo"),
            "--s3-endpoint-url",
            s3.endpoint,
            "--quiet",
        ]
    )
    assert code == 0
    settings = json.loads((tmp_path / "repo" / "cli-llama" / "model-settings.json").read_text())
    assert settings["parameters"]["extra"] == {
        "chunk_store": "s3://models/cli-llama",
        "s3_endpoint_url": s3.endpoint,
    }
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket="models")["Contents"]}
    assert "cli-llama/manifest.json" in keys and "cli-llama/block_0000.safetensors" in keys


# -- ranged reads (expert streaming) ---------------------------------------------------------


def _ranged_stores(kind: str, llama, s3, s3_model, tmp_path):
    if kind == "local":
        return open_store(str(llama.store)), None
    if kind == "http":
        server = StaticServer(llama.store).start()
        return HTTPStore(server.url, StoreOptions(**FAST)), server
    if kind == "s3":
        return S3Store(s3_model, StoreOptions(endpoint_url=s3.endpoint, **FAST)), None
    server = StaticServer(llama.store).start()  # the disk cache in front of HTTP
    options = StoreOptions(**FAST, cache_dir=str(tmp_path / "cache"), cache_bytes=1 << 30)
    return open_store(server.url, options=options), server


@pytest.mark.parametrize("kind", ["local", "http", "s3", "cached-http"])
def test_read_ranges_fills_exactly_the_ranges_asked(kind, llama, s3, s3_env, s3_model, tmp_path):
    """Each range lands at its file offset in a file-sized buffer; every other byte stays
    as it was; parts larger than part_bytes arrive whole; a wrong size is an error."""
    store, server = _ranged_stores(kind, llama, s3, s3_model, tmp_path)
    try:
        name = "block_0001.safetensors"
        data = (llama.store / name).read_bytes()
        size = len(data)
        ranges = [(8, 100), (1000, FAST["part_bytes"] * 2 + 3), (size - 17, 17)]
        buffer = bytearray(b"\xee" * size)
        got = store.read_ranges(name, memoryview(buffer), ranges, size)
        assert got.size == sum(n for _, n in ranges)
        expected = bytearray(b"\xee" * size)
        for offset, length in ranges:
            expected[offset : offset + length] = data[offset : offset + length]
        assert buffer == expected
        with pytest.raises((ChunkStoreError, ChunkIntegrityError), match="bytes"):
            store.read_ranges(name, memoryview(bytearray(size + 5)), [(0, 8)], size + 5)
    finally:
        store.close()
        if server is not None:
            server.stop()


def test_a_few_routed_experts_are_read_in_parts_over_the_connections(tmp_path):
    """A ranged read (routed experts) is split into parts of its total / max_concurrency,
    down to MIN_RANGE_PART, so a store that limits each connection's rate serves a few
    experts at the rate of several connections; a small read stays one request."""
    import os

    from remote_servers import _RangeHandler

    from layerstream.stores.ranged import MIN_RANGE_PART

    asked: list[str] = []

    class Recording(_RangeHandler):
        def do_GET(self) -> None:
            asked.append(self.headers.get("Range", ""))
            super().do_GET()

    data = os.urandom(4 << 20)
    (tmp_path / "chunk.safetensors").write_bytes(data)
    server = StaticServer(tmp_path, base=Recording).start()
    store = HTTPStore(server.url, StoreOptions(max_concurrency=4))
    try:
        buffer = bytearray(len(data))
        ranges = [(0, 3 * MIN_RANGE_PART), (2 << 20, MIN_RANGE_PART)]  # two experts
        store.read_ranges("chunk.safetensors", memoryview(buffer), ranges, len(data))
        assert len(asked) == 4  # 1 MiB over 4 connections: four parts
        for offset, length in ranges:
            assert buffer[offset : offset + length] == data[offset : offset + length]
        asked.clear()
        store.read_ranges("chunk.safetensors", memoryview(buffer), [(64, 1000)], len(data))
        assert asked == ["bytes=64-1063"]
    finally:
        store.close()
        server.stop()


def test_a_server_that_ignores_ranges_is_named_at_once_for_a_ranged_read(llama):
    server = StaticServer(llama.store, ranges=False).start()
    store = HTTPStore(server.url, StoreOptions(**FAST))
    try:
        name = "block_0001.safetensors"
        size = (llama.store / name).stat().st_size
        with pytest.raises(ChunkStoreError, match="ignores byte ranges"):
            store.read_ranges(name, memoryview(bytearray(size)), [(64, 64)], size)
    finally:
        store.close()
        server.stop()


def test_a_moe_model_chunked_into_s3_streams_its_routed_experts_exactly(s3, s3_env, tmp_path):
    """Chunked straight into S3 (the expert digests computed on the way), served from it
    with expert streaming: exact against from_pretrained with unread experts NaN, the
    experts fetched as ranged GETs."""
    from architectures import build, compare_generation, reference_model
    from test_architectures import streaming_budget

    source, store = build("qwen2_moe", tmp_path)
    uri = s3.chunk(source, "s3://models/qwen2-moe", "qwen2_moe")
    s3_store = open_store(uri, options=StoreOptions(endpoint_url=s3.endpoint, **FAST))
    engine = Engine(
        s3_store,
        EngineOptions(
            memory_budget=streaming_budget(store),
            read_ahead=1,
            expert_streaming="on",
            poison_unread_experts=True,
        ),
    )
    try:
        assert engine.parts
        generation = compare_generation(engine, reference_model(source), 4)
        assert generation.ids_equal and generation.step_diffs == [0.0] * 4
        assert 0 < engine.streamer.stats.expert_bytes < engine.streamer.stats.bytes_read
    finally:
        engine.close()
