"""The local store's zero-copy reader: page-cache probes, populated mappings, and read-ahead
only for what is not already in memory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import layerstream.stores.local as local
from layerstream.engine import Engine, EngineOptions
from layerstream.errors import ChunkIntegrityError
from layerstream.stores import LocalStore, open_store

PROMPT = torch.tensor([[5, 17, 99, 3, 250, 7, 42, 130]])

needs_nowait = pytest.mark.skipif(
    not hasattr(os, "RWF_NOWAIT"), reason="no RWF_NOWAIT: every chunk counts as not cached"
)


def evict(directory: Path, probe: str) -> None:
    """Drop the files' pages from the page cache (clean pages only, hence the fsync); skip
    the test where chunk ``probe`` stays cached: some file systems (CI's among them) keep
    the pages whatever the advice."""
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if LocalStore(directory).in_memory(probe):
        pytest.skip("this file system ignores POSIX_FADV_DONTNEED")


@pytest.fixture
def store_copy(model_factory, tmp_path):
    path = tmp_path / "chunks"
    shutil.copytree(model_factory("llama").store, path)
    return path


@needs_nowait
def test_in_memory_tells_cached_chunks_from_evicted_ones(store_copy):
    store = LocalStore(store_copy)
    store.map("block_0003.safetensors").data.close()
    assert store.in_memory("block_0003.safetensors")
    evict(store_copy, "block_0003.safetensors")  # skips unless it is then out of memory
    assert not store.in_memory("missing.safetensors")  # unsure means "read it"


def test_mapping_falls_back_to_map_populate_on_old_kernels(store_copy, monkeypatch):
    monkeypatch.setattr(local, "MADV_POPULATE_READ", 0x7FFF)  # an advice no kernel knows
    monkeypatch.setattr(local, "_populate_read", True)
    mapped = LocalStore(store_copy).map("rest.safetensors")
    try:
        assert mapped.size == (store_copy / "rest.safetensors").stat().st_size
        assert mapped.data[:8] == (store_copy / "rest.safetensors").read_bytes()[:8]
    finally:
        mapped.data.close()
    assert local._populate_read is False  # asked once, then MAP_POPULATE from then on


@needs_nowait
def test_read_ahead_skips_blocks_already_in_the_page_cache(model_factory, store_copy):
    """Cold chunks are read ahead on the I/O threads; once they are in the page cache they
    are mapped on the compute thread. The outputs are the same either way."""
    reference = model_factory("llama").resident()
    with torch.inference_mode():
        expected = reference(PROMPT).logits
    engine = Engine(open_store(str(store_copy)), EngineOptions(memory_budget="25%", read_ahead=2))
    try:
        assert len(engine.plan.streamed) > 3
        evict(store_copy, engine.manifest.chunks["block_0011"].file)
        with engine.request() as cold:
            assert torch.equal(engine.model(PROMPT).logits, expected)
        assert cold.stats.read_aheads > 0
        with engine.request() as warm:
            assert torch.equal(engine.model(PROMPT).logits, expected)
        assert warm.stats.read_aheads == 0
        assert warm.stats.cache_misses == len(engine.plan.streamed)
    finally:
        engine.close()


@needs_nowait
def test_evict_drops_a_chunk_from_the_page_cache(store_copy):
    store = LocalStore(store_copy)
    evict(store_copy, "block_0005.safetensors")
    store.map("block_0005.safetensors").data.close()
    assert store.in_memory("block_0005.safetensors")
    store.evict("block_0005.safetensors")
    assert not store.in_memory("block_0005.safetensors")
    store.evict("no-such-chunk.safetensors")  # advisory: never an error


def test_populate_runs_through_libc_with_the_gil_released(store_copy, monkeypatch):
    """mmap.madvise keeps the GIL while the disk works (~35 ms per cold chunk), which froze
    the compute thread between torch ops; the populate goes through ctypes, which releases
    the GIL for the call (benchmarks/overlap.py measures the effect)."""
    import ctypes

    # a function of a CDLL (not a PyDLL): ctypes releases the GIL while it runs
    assert local._madvise is not None
    assert not local._madvise._flags_ & ctypes._FUNCFLAG_PYTHONAPI
    calls = []
    real = local._madvise

    def spy(address, size, advice):
        calls.append((size, advice))
        return real(address, size, advice)

    monkeypatch.setattr(local, "_madvise", spy)
    mapped = LocalStore(store_copy).map("rest.safetensors")
    try:
        assert calls == [(mapped.size, local.MADV_POPULATE_READ)]
        assert bytes(mapped.data[:64]) == (store_copy / "rest.safetensors").read_bytes()[:64]
    finally:
        mapped.data.close()  # no buffer export left behind by the address lookup


def test_auto_read_ahead_is_one_block(model_factory):
    engine = Engine(open_store(str(model_factory("llama").store)), EngineOptions("25%"))
    try:
        assert engine.plan.read_ahead == 1 and engine.io_threads == 1
    finally:
        engine.close()


def _mapped_chunk_files(store: Path) -> set[str]:
    """Which of ``store``'s files this process has mapped (from /proc/self/maps)."""
    root = str(store.resolve())
    with open("/proc/self/maps") as f:
        return {line.split()[-1] for line in f if line.rstrip().endswith(".safetensors")} & {
            str(p) for p in Path(root).iterdir()
        }


def _rss_file_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_streamed_chunks_are_mapped_once_and_their_pages_dropped_after_use(
    model_factory, store_copy, monkeypatch
):
    """A streamed block's mapping, header and tensor views are made on its first use and
    kept; each later use only populates its pages, and they leave the RSS after the block
    has run. Outputs stay exact across requests."""
    reference = model_factory("llama").resident()
    with torch.inference_mode():
        expected = reference(PROMPT).logits
    maps = []
    real_map = LocalStore.map
    monkeypatch.setattr(
        LocalStore, "map", lambda self, name: maps.append(name) or real_map(self, name)
    )
    engine = Engine(open_store(str(store_copy)), EngineOptions(memory_budget="25%", read_ahead=1))
    try:
        streamed = {
            engine.manifest.chunks[engine.manifest.blocks[j].chunk].file
            for j in engine.plan.streamed
        }
        maps.clear()  # the rest and the pinned blocks were mapped to be copied
        rss_before = _rss_file_bytes()
        for _ in range(3):
            with engine.request() as scope:
                assert torch.equal(engine.model(PROMPT).logits, expected)
            assert scope.stats.cache_misses == len(engine.plan.streamed)
        engine.streamer._reaper.submit(lambda: None).result()  # the page drops have run
        assert sorted(maps) == sorted(streamed)  # each mapped once, not once per request
        assert _mapped_chunk_files(store_copy) == {str(store_copy.resolve() / f) for f in streamed}
        largest = max(c.bytes for c in engine.manifest.chunks.values())
        # kept, yet not resident: at most the last block's pages may still be mapped
        assert _rss_file_bytes() - rss_before < largest + (4 << 20)
    finally:
        engine.close()
    assert not _mapped_chunk_files(store_copy)  # close unmapped them all


def test_a_chunk_replaced_after_it_was_kept_is_mapped_and_verified_again(store_copy):
    """A kept mapping follows the store: a chunk file replaced by rename (a new inode, the
    old mapping still valid) is mapped again and checked against the manifest."""
    engine = Engine(open_store(str(store_copy)), EngineOptions(memory_budget="25%", read_ahead=0))
    try:
        j = max(engine.plan.streamed)
        path = store_copy / engine.manifest.chunks[engine.manifest.blocks[j].chunk].file
        with engine.request():
            expected = engine.model(PROMPT).logits
        verified = engine.streamer.stats.chunks_verified
        copy = path.with_suffix(".tmp")
        shutil.copyfile(path, copy)
        os.replace(copy, path)  # same bytes, new inode
        with engine.request():
            assert torch.equal(engine.model(PROMPT).logits, expected)
        assert engine.streamer.stats.chunks_verified == verified + 1
        data = bytearray(path.read_bytes())
        data[-100] ^= 0xFF
        copy.write_bytes(bytes(data))
        os.replace(copy, path)
        with pytest.raises(ChunkIntegrityError, match=path.name), engine.request():
            engine.model(PROMPT)
    finally:
        engine.close()


def test_kept_mappings_are_populated_by_touch_on_old_kernels(
    model_factory, store_copy, monkeypatch
):
    """Without MADV_POPULATE_READ, a kept mapping's pages are faulted in by reading a byte of
    each page; outputs are exact on every request."""
    monkeypatch.setattr(local, "_populate_read", False)
    reference = model_factory("llama").resident()
    with torch.inference_mode():
        expected = reference(PROMPT).logits
    engine = Engine(open_store(str(store_copy)), EngineOptions(memory_budget="25%"))
    try:
        for _ in range(2):
            with engine.request():
                assert torch.equal(engine.model(PROMPT).logits, expected)
    finally:
        engine.close()
