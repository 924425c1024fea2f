"""The local store's zero-copy reader: page-cache probes, populated mappings, and read-ahead
only for what is not already in memory."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch

import layerstream.stores.mapping as mapping
from layerstream.engine.engine import Engine, EngineOptions
from layerstream.errors import ChunkIntegrityError
from layerstream.stores import LocalStore, open_store

PROMPT = torch.tensor([[5, 17, 99, 3, 250, 7, 42, 130]])

needs_nowait = pytest.mark.skipif(
    not hasattr(os, "RWF_NOWAIT"), reason="no RWF_NOWAIT: every chunk counts as not cached"
)


# the advice is retried: a page something holds just then is not dropped (with two test
# workers, a chunk stayed cached after one advice in two of four suite runs; never alone)
EVICT_TRIES = 10


def evict(directory: Path, probe: str) -> None:
    """Drop the files' pages from the page cache (clean pages only, hence the fsync); skip
    the test where chunk ``probe`` stays cached: some file systems (CI's among them) keep
    the pages whatever the advice."""
    for attempt in range(EVICT_TRIES):
        for path in directory.iterdir():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        if not LocalStore(directory).in_memory(probe):
            return
        time.sleep(0.05 * (attempt + 1))
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
    monkeypatch.setattr(mapping, "MADV_POPULATE_READ", 0x7FFF)  # an advice no kernel knows
    monkeypatch.setattr(mapping, "_populate_read", True)
    mapped = LocalStore(store_copy).map("rest.safetensors")
    try:
        assert mapped.size == (store_copy / "rest.safetensors").stat().st_size
        assert mapped.data[:8] == (store_copy / "rest.safetensors").read_bytes()[:8]
    finally:
        mapped.data.close()
    assert mapping._populate_read is False  # asked once, then MAP_POPULATE from then on


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
        assert warm.stats.streamed_runs == len(engine.plan.streamed)
    finally:
        engine.close()


@needs_nowait
def test_evict_drops_a_chunk_from_the_page_cache(store_copy):
    """On one CPU: pages just read sit in that CPU's batch of pages to add to the LRU lists
    until it is drained, and POSIX_FADV_DONTNEED drains only the calling CPU's, so pages
    read on another CPU could stay (this failed on a loaded 2-core CI machine)."""
    store = LocalStore(store_copy)
    evict(store_copy, "block_0005.safetensors")
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        store.map("block_0005.safetensors").data.close()
        assert store.in_memory("block_0005.safetensors")
        store.evict("block_0005.safetensors")
        assert not store.in_memory("block_0005.safetensors")
    finally:
        os.sched_setaffinity(0, cpus)
    store.evict("no-such-chunk.safetensors")  # advisory: never an error


def test_populate_runs_through_libc_with_the_gil_released(store_copy, monkeypatch):
    """mmap.madvise keeps the GIL while the disk works (~35 ms per cold chunk), which froze
    the compute thread between torch ops; the populate goes through ctypes, which releases
    the GIL for the call (benchmarks/overlap.py measures the effect)."""
    import ctypes

    # a function of a CDLL (not a PyDLL): ctypes releases the GIL while it runs
    assert mapping._madvise is not None
    assert not mapping._madvise._flags_ & ctypes._FUNCFLAG_PYTHONAPI
    calls = []
    real = mapping._madvise

    def spy(address, size, advice):
        calls.append((size, advice))
        return real(address, size, advice)

    monkeypatch.setattr(mapping, "_madvise", spy)
    mapped = LocalStore(store_copy).map("rest.safetensors")
    try:
        assert calls == [(mapped.size, mapping.MADV_POPULATE_READ)]
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
            assert scope.stats.streamed_runs == len(engine.plan.streamed)
        engine.streamer.settle()  # the page drops have run
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
    # no background verification: it could hash the replaced file before the request does
    options = EngineOptions(memory_budget="25%", read_ahead=0, verify_in_background=False)
    engine = Engine(open_store(str(store_copy)), options)
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
    monkeypatch.setattr(mapping, "_populate_read", False)
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


@pytest.mark.parametrize("read_ahead", [1, 2])
def test_every_streamed_block_is_read_once_and_ahead_with_the_read_reader(
    model_factory, read_ahead
):
    """With the read reader, every streamed block crosses from the store on every token: each
    must be read once, by a read-ahead (all but the request's first), and never a second
    time on the compute thread. A read-ahead aimed at the wrong block doubles the reads."""
    options = EngineOptions(
        memory_budget="40%", read_ahead=read_ahead, reader="read", verify_in_background=False
    )
    engine = Engine(open_store(str(model_factory("llama").store)), options)
    engine.wait_pinned()  # the steady state (fill.py)
    tokens = 6
    try:
        assert engine.plan.read_ahead == read_ahead and len(engine.plan.streamed) > read_ahead
        with engine.request() as scope:
            engine.model.generate(PROMPT, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
        misses = scope.stats.streamed_runs
        assert misses == tokens * len(engine.plan.streamed)
        # the read-aheads past the request's last block serve the next request
        assert misses <= scope.stats.chunks_read <= misses + read_ahead
        assert scope.stats.read_aheads >= misses - 1
    finally:
        engine.close()


def test_block_order_predicts_the_next_blocks_and_learns_jumps():
    from types import SimpleNamespace

    from layerstream.engine.streamer import BlockOrder

    prefixes = ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]
    order = BlockOrder(SimpleNamespace(blocks=[SimpleNamespace(prefix=p) for p in prefixes]))
    assert order.upcoming(0, frozenset(), 1) == [1]
    assert order.upcoming(1, frozenset(), 1) == [0]  # a list wraps to its own first block
    assert order.upcoming(2, frozenset(), 2) == [3]  # never past the block itself
    assert order.upcoming(0, frozenset({1}), 1) == []  # skipped (pinned) blocks are not read
    for j in (0, 1, 2, 3, 2, 3):  # an encoder pass, then the decoder loop
        order.observe(j)
    assert order.upcoming(1, frozenset(), 1) == [2]  # learned: the encoder hands over
    assert order.upcoming(3, frozenset(), 1) == [2]
    assert order.upcoming(1, frozenset(), 3) == [2, 3]


def _aligned(size: int) -> memoryview:
    """A page-aligned buffer, as the streaming pool's are."""
    import mmap

    return memoryview(mmap.mmap(-1, size))


@pytest.mark.parametrize("direct", [False, True])
def test_read_ranges_land_at_their_offsets_whether_or_not_past_the_page_cache(store_copy, direct):
    """Ranges that start and end mid-page, one at the file's last byte: each lands at its
    offset; a direct read also brings the file's own bytes around it, never anything else."""
    store = LocalStore(store_copy)
    name = next(p.name for p in sorted(store_copy.iterdir()) if p.name.startswith("block"))
    data = (store_copy / name).read_bytes()
    size = len(data)
    ranges = [(5, 100), (4096 + 7, 9000), (size - 33, 33)]
    buffer = _aligned(size)
    buffer[:] = b"\xff" * size
    got = store.read_ranges(name, buffer, ranges, size, direct=direct)
    assert got.size == sum(n for _, n in ranges)
    for offset, n in ranges:
        assert bytes(buffer[offset : offset + n]) == data[offset : offset + n]
    for i, byte in enumerate(bytes(buffer)):  # every other byte: untouched, or the file's
        if byte != 0xFF:
            assert byte == data[i], i
    if direct and not store._direct_ok:
        pytest.skip("this file system refuses O_DIRECT (tmpfs): read through the page cache")


def test_a_buffer_that_cannot_take_direct_reads_is_read_through_the_page_cache(store_copy, caplog):
    store = LocalStore(store_copy)
    name = next(p.name for p in sorted(store_copy.iterdir()) if p.name.startswith("block"))
    data = (store_copy / name).read_bytes()
    buffer = _aligned(len(data) + 8)[8:]  # 8 bytes past a page boundary
    with caplog.at_level("INFO", logger="layerstream.stores.local"):
        store.read_ranges(name, buffer, [(4096, 4096)], len(data), direct=True)
    assert bytes(buffer[4096:8192]) == data[4096:8192]
    assert "reads go through the page cache" in caplog.text and not store._direct_ok
