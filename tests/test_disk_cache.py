"""The local disk cache in front of remote stores: verified, atomic, shared, bounded."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
from remote_servers import FaultProxy, StaticServer
from test_remote_stores import FAST, generate, reference_ids  # noqa: F401 (fixtures)

from layerstream.engine.engine import Engine, EngineOptions
from layerstream.stores import CachedStore, DiskCache, StoreOptions, open_store


@pytest.fixture(scope="module")
def llama(model_factory):
    return model_factory("llama")


@pytest.fixture
def proxy(llama):
    server = StaticServer(llama.store).start()
    fault = FaultProxy(server.port).up()
    yield fault
    fault.stop()
    server.stop()


def cached_engine(url: str, cache_dir, budget: str = "25%", cache_bytes: int = 1 << 30) -> Engine:
    options = StoreOptions(**FAST, cache_dir=str(cache_dir), cache_bytes=cache_bytes)
    return Engine(open_store(url, options=options), EngineOptions(memory_budget=budget))


def cache_files(cache_dir) -> dict[str, bytes]:
    root = cache_dir / "sha256"
    return {p.name: p.read_bytes() for p in root.glob("*/*") if not p.name.startswith(".tmp")}


def test_warm_restart_reads_no_bytes_from_the_remote(
    proxy,
    tmp_path,
    llama,
    reference_ids,  # noqa: F811
):
    first = cached_engine(proxy.url, tmp_path)
    try:
        assert generate(first) == reference_ids
    finally:
        first.close()
    assert proxy.chunk_gets(), "the first server fetched its chunks"
    files = cache_files(tmp_path)
    assert all(hashlib.sha256(data).hexdigest() == name for name, data in files.items())
    before, bytes_before = len(proxy.requests), proxy.body_bytes

    restarted = cached_engine(proxy.url, tmp_path)
    try:
        assert generate(restarted) == reference_ids
        assert isinstance(restarted.store, CachedStore)
        assert restarted.store.cache.stats.bytes_from_origin == 0
    finally:
        restarted.close()
    # One request went to the remote: is the manifest still current? (304, no body)
    assert proxy.requests[before:] == [("GET", "/manifest.json")]
    assert proxy.body_bytes == bytes_before


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap"])
def test_damaged_cache_entry_is_discarded_and_fetched_again(
    proxy,
    tmp_path,
    reference_ids,  # noqa: F811
    damage,
):
    engine = cached_engine(proxy.url, tmp_path, budget="100%")  # every chunk read once
    engine.wait_pinned()  # read in the background (engine/fill.py): all of them, then close
    engine.close()
    entries = sorted((tmp_path / "sha256").glob("*/*"), key=lambda p: (p.stat().st_size, p.name))
    victim = next(p for p in entries if "model.layers." in _tensor_names(p))
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:  # a whole, valid chunk file of the same size, but another block's
        twin = next(p for p in entries if p != victim and p.stat().st_size == len(data))
        data = bytearray(twin.read_bytes())
    victim.write_bytes(bytes(data))
    gets = len(proxy.chunk_gets())

    engine = cached_engine(proxy.url, tmp_path)
    try:
        assert generate(engine) == reference_ids
        assert engine.store.cache.stats.discarded == 1
    finally:
        engine.close()
    assert len(proxy.chunk_gets()) > gets  # the damaged one came from the origin again
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == victim.name  # and was rewritten


def test_bytes_corrupted_in_transit_are_never_cached(proxy, tmp_path, reference_ids):  # noqa: F811
    engine = cached_engine(proxy.url, tmp_path)
    try:
        proxy.corrupt = 1
        assert generate(engine) == reference_ids
        assert proxy.corrupt == 0 and engine.streamer.stats.refetches == 1
    finally:
        engine.close()
    files = cache_files(tmp_path)
    assert files and all(hashlib.sha256(d).hexdigest() == n for n, d in files.items())


def test_budget_keeps_the_most_recently_used(tmp_path):
    cache = DiskCache(tmp_path, budget=3000)
    blobs = [bytes([i]) * 1000 for i in range(4)]
    digests = [hashlib.sha256(b).hexdigest() for b in blobs]
    for digest, blob in zip(digests[:3], blobs[:3], strict=True):
        cache.put(digest, memoryview(blob))
        time.sleep(0.01)  # distinct mtimes: the eviction order is by last use
    buffer = memoryview(bytearray(1000))
    assert cache.read_into(digests[0], 1000, buffer)  # a hit makes it the most recent
    time.sleep(0.01)
    cache.put(digests[3], memoryview(blobs[3]))
    kept = set(cache_files(tmp_path))
    assert kept == {digests[0], digests[2], digests[3]}  # the least recently used went
    cache.put(hashlib.sha256(b"x" * 4000).hexdigest(), memoryview(b"x" * 4000))
    assert set(cache_files(tmp_path)) == kept  # larger than the whole budget: not cached


def test_leftover_temp_files_of_a_crashed_writer_are_removed(tmp_path):
    cache = DiskCache(tmp_path, budget=1 << 20)
    folder = tmp_path / "sha256" / "ab"
    folder.mkdir()
    old, new = folder / ".tmp-1-old", folder / ".tmp-2-new"
    old.write_bytes(b"half")
    new.write_bytes(b"being written")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    cache.evict_to_budget()
    assert not old.exists() and new.exists()


def test_unusable_cache_dir_fails_at_open(tmp_path):
    from layerstream.errors import ChunkStoreError

    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(ChunkStoreError, match="cannot create the disk cache"):
        open_store(
            "http://127.0.0.1:9/x", options=StoreOptions(cache_dir=str(tmp_path / "a-file" / "c"))
        )


WORKER = textwrap.dedent(
    """
    import sys
    from layerstream.format.manifest import Manifest
    from layerstream.stores import StoreOptions, open_store

    url, cache_dir = sys.argv[1:3]
    store = open_store(url, options=StoreOptions(cache_dir=cache_dir, cache_bytes=1 << 30))
    manifest = Manifest.from_json(store.read("manifest.json"))
    store.expect(manifest)
    for _ in range(3):
        for info in manifest.chunks.values():
            buffer = bytearray(info.bytes)
            got = store.read_into(info.file, memoryview(buffer))
            assert got.verified and got.size == info.bytes
    store.close()
    """
)


def test_two_processes_share_one_cache_dir(proxy, tmp_path, llama):
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, proxy.url, str(tmp_path)]) for _ in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    files = cache_files(tmp_path)
    expected = {c["sha256"] for c in llama.manifest["chunks"].values()}
    assert expected <= set(files)
    assert all(hashlib.sha256(d).hexdigest() == n for n, d in files.items())
    assert not list((tmp_path / "sha256").glob("*/.tmp-*"))  # no temporary file left behind


def test_manifest_is_revalidated_not_refetched(llama, tmp_path):
    """The manifest has no digest to be found by: the cache keeps it with its ETag and asks
    the origin whether it changed (304: no body); a changed or damaged copy is read whole."""
    from layerstream.stores.http import HTTPStore

    served = tmp_path / "served"
    shutil.copytree(llama.store, served)
    server = StaticServer(served).start()
    fault = FaultProxy(server.port).up()
    cache = DiskCache(tmp_path / "cache", 1 << 30)
    store = CachedStore(HTTPStore(fault.url, StoreOptions(**FAST)), cache)
    try:
        original = (served / "manifest.json").read_bytes()
        assert store.read("manifest.json") == original
        sent = fault.body_bytes
        assert store.read("manifest.json") == original
        assert fault.body_bytes == sent and cache.stats.hits == 1  # a 304

        (served / "manifest.json").write_bytes(original + b" ")  # re-chunked upstream
        assert store.read("manifest.json") == original + b" "

        copy = next((tmp_path / "cache" / "revalidated").iterdir())
        copy.write_bytes(copy.read_bytes()[:-5])  # damaged on disk: not trusted
        assert store.read("manifest.json") == original + b" "
    finally:
        store.close()
        fault.stop()
        server.stop()


def _tensor_names(path) -> str:
    """The header of a cached chunk (enough to tell a block's chunk from the rest)."""
    data = path.read_bytes()
    return data[8 : 8 + int.from_bytes(data[:8], "little")].decode(errors="replace")


def test_stores_declare_their_capabilities(tmp_path):
    """Callers test what a store can do by type: local files map, remote origins answer
    conditional reads, the disk cache learns digests; none claims what it cannot do."""
    from layerstream.stores import (
        CachingStore,
        ChunkStore,
        ConditionalStore,
        LocalStore,
        MappableStore,
    )
    from layerstream.stores.http import HTTPStore
    from layerstream.stores.s3 import S3Store

    options = StoreOptions(endpoint_url="http://127.0.0.1:9", region="us-east-1")
    s3 = S3Store("s3://bucket/prefix", options)
    http = HTTPStore("http://127.0.0.1:9/chunks", StoreOptions())
    cached = CachedStore(HTTPStore("http://127.0.0.1:9/x"), DiskCache(tmp_path / "c", 1 << 20))
    local = LocalStore(tmp_path)
    try:
        for store in (s3, http, cached, local):
            assert isinstance(store, ChunkStore)
        assert isinstance(s3, ConditionalStore) and isinstance(http, ConditionalStore)
        assert isinstance(local, MappableStore) and isinstance(cached, CachingStore)
        for remote in (s3, http, cached):
            assert not isinstance(remote, MappableStore)
        assert not isinstance(local, ConditionalStore) and not isinstance(local, CachingStore)
        assert not isinstance(s3, CachingStore) and not isinstance(cached, ConditionalStore)
    finally:
        for store in (s3, http, cached, local):
            store.close()


def test_many_small_entries_scan_the_directory_once_per_share_of_the_budget(tmp_path):
    """An entry per expert (thousands) must not stat the whole directory on every put: the
    eviction scan runs once per 1/SCAN_SHARE of the budget written, and the budget holds
    within that share."""
    from layerstream.stores import cache as cache_module

    budget = 64 * 1000
    cache = DiskCache(tmp_path, budget=budget)
    scans = []
    real = cache.evict_to_budget
    cache.evict_to_budget = lambda: scans.append(1) or real()  # type: ignore[method-assign]
    for i in range(1000):  # 100-byte entries: 100 KB, more than the budget
        data = i.to_bytes(2, "little") * 50
        cache.put(hashlib.sha256(data).hexdigest(), memoryview(data))
    assert len(scans) == 1000 * 100 // (budget // cache_module.SCAN_SHARE)  # 100, not 1000
    held = sum(p.stat().st_size for p in (tmp_path / "sha256").rglob("*") if p.is_file())
    assert held <= budget + budget // cache_module.SCAN_SHARE
