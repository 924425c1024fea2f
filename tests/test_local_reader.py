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
