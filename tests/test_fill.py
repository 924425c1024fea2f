"""Ready before the pinned blocks are read (engine/fill.py): the engine is ready once its
non-block weights are in, the blocks the plan pins arrive in the background and are
installed at a block boundary, and every request is exact at every moment of the fill: one
that starts before a block is pinned and ends after it, several at once, one whose block's
background read failed."""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from pathlib import Path

import pytest
import torch

from layerstream.engine.engine import Engine, EngineOptions
from layerstream.errors import ChunkStoreError
from layerstream.stores import LocalStore

PROMPT = torch.tensor([[5, 17, 99, 3, 250, 7, 42, 130]])
TOKENS = 6
WAIT_S = 60  # a bound on every wait below: a hang fails, it does not stall CI


class GatedStore(LocalStore):
    """A local store whose reads of ``gated`` chunk files (whole chunks: the reads a pinned
    block's fill makes) wait until ``go`` is set, and set ``reading`` as they begin; reads
    of ``failing`` files fail once each."""

    def __init__(self, root: Path, gated: set[str] = frozenset(), failing: set[str] = frozenset()):
        super().__init__(root)
        self.gated, self.failing = set(gated), set(failing)
        self.reading, self.go = threading.Event(), threading.Event()

    def _gate(self, name: str) -> None:
        if name in self.failing:
            self.failing.discard(name)
            raise ChunkStoreError(f"{name}: the store went away for a moment (a test's fault)")
        if name in self.gated:
            self.reading.set()
            assert self.go.wait(WAIT_S), "the test never let the gated read go on"

    def map(self, name: str):
        self._gate(name)
        return super().map(name)

    def read_into(self, name: str, buffer: memoryview, size: int | None = None):
        self._gate(name)
        return super().read_into(name, buffer, size)


def block_file(j: int) -> str:
    return f"block_{j:04d}.safetensors"


def generate(model: torch.nn.Module) -> torch.Tensor:
    return model.generate(
        PROMPT,
        attention_mask=torch.ones_like(PROMPT),
        max_new_tokens=TOKENS,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )


def same(got, expected) -> None:
    assert got.sequences.tolist() == expected.sequences.tolist()
    for a, b in zip(got.scores, expected.scores, strict=True):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def llama(model_factory):
    chunked = model_factory("llama")
    with torch.inference_mode():
        return chunked, generate(chunked.resident())


def test_ready_before_the_pinned_blocks_are_read_and_exact_across_the_swap(llama):
    """Block 1's read is held: the engine is built all the same (ready), a request runs
    block 0 pinned and waits at block 1; once block 1 arrives the request goes on through
    the swap and ends exactly as from_pretrained's; after the fill every pinned block runs
    as one, as when pinned at load."""
    chunked, expected = llama
    store = GatedStore(chunked.store, gated={block_file(1)})
    engine = Engine(store, EngineOptions(memory_budget="60%", verify_in_background=False))
    try:
        plan = engine.plan
        assert {0, 1} <= plan.resident and plan.streamed
        assert store.reading.wait(WAIT_S)
        pinned, target = engine.pinned_bytes
        assert pinned < target
        results: dict[str, object] = {}

        def run() -> None:
            with torch.inference_mode(), engine.request() as scope:
                results["out"] = generate(engine.model)
            results["stats"] = scope.stats

        thread = threading.Thread(target=run)
        thread.start()
        thread.join(0.5)  # it cannot finish: block 1 is not in memory yet
        assert thread.is_alive()
        store.go.set()
        thread.join(WAIT_S)
        assert not thread.is_alive()
        same(results["out"], expected)

        engine.wait_pinned()
        assert engine.pinned_bytes == (target, target)
        with torch.inference_mode(), engine.request() as scope:
            same(generate(engine.model), expected)
        # every block the plan pins ran as a pinned block on every step
        assert scope.stats.resident_runs == len(plan.resident) * TOKENS
        assert scope.stats.streamed_runs == len(plan.streamed) * TOKENS
    finally:
        store.go.set()
        engine.close()


def test_requests_from_threads_during_the_fill_are_each_exact(llama):
    chunked, expected = llama
    store = GatedStore(chunked.store, gated={block_file(0), block_file(2)})
    engine = Engine(store, EngineOptions(memory_budget="60%", verify_in_background=False))
    outputs: list[object] = []
    try:

        def run() -> None:
            with torch.inference_mode(), engine.request():
                outputs.append(generate(engine.model))

        threads = [threading.Thread(target=run) for _ in range(3)]
        for thread in threads:
            thread.start()
        assert store.reading.wait(WAIT_S)
        store.go.set()
        for thread in threads:
            thread.join(WAIT_S)
        assert len(outputs) == 3
        for out in outputs:
            same(out, expected)
    finally:
        store.go.set()
        engine.close()


def test_a_failed_background_read_is_read_again_for_the_request(llama, caplog):
    chunked, expected = llama
    store = GatedStore(chunked.store, failing={block_file(0)})
    with caplog.at_level(logging.WARNING, "layerstream.engine.fill"):
        engine = Engine(store, EngineOptions(memory_budget="60%", verify_in_background=False))
        try:
            with torch.inference_mode(), engine.request():
                same(generate(engine.model), expected)
            engine.wait_pinned()
            assert engine.pinned_bytes[0] == engine.pinned_bytes[1]
        finally:
            engine.close()
    assert "reading pinned block 0 in the background failed" in caplog.text


def test_the_fill_logs_its_end_and_can_be_turned_off(llama, caplog):
    chunked, expected = llama
    with caplog.at_level(logging.INFO, "layerstream.engine"):
        engine = Engine(LocalStore(chunked.store), EngineOptions(memory_budget="60%"))
        try:
            engine.wait_pinned()
            pinned, target = engine.pinned_bytes
            assert pinned == target > 0
        finally:
            engine.close()
    assert "every pinned block is in memory" in caplog.text
    # pinned at load: nothing left for the background, the blocks bound before it returns
    store = GatedStore(chunked.store, gated={block_file(1)})
    store.go.set()
    engine = Engine(store, EngineOptions(memory_budget="60%", pin_in_background=False))
    try:
        assert engine.fill is None and store.reading.is_set()
        with torch.inference_mode(), engine.request() as scope:
            same(generate(engine.model), expected)
        assert scope.stats.resident_runs == len(engine.plan.resident) * TOKENS
    finally:
        engine.close()


class FillGatedStore(LocalStore):
    """Reads made by the fill's threads of ``gated`` files wait for ``go``: the same file's
    reads for a request go through."""

    def __init__(self, root: Path, gated: set[str]):
        super().__init__(root)
        self.gated = gated
        self.reading, self.go = threading.Event(), threading.Event()

    def read_ranges(self, name: str, *args, **kwargs):
        if name in self.gated and threading.current_thread().name.startswith("layerstream-fill"):
            self.reading.set()
            assert self.go.wait(WAIT_S), "the test never let the gated read go on"
        return super().read_ranges(name, *args, **kwargs)


def test_expert_streamed_bases_arrive_in_the_background_exactly(moe_models):
    """With expert streaming the plan pins the bases of streamed blocks: they are read in
    the background too. While block 1's base is held, its streamed reads read the base with
    the experts; every step is exact (unread experts NaN) before and after it arrives."""
    from architectures import compare_generation, reference_model
    from test_experts import _bases_budget

    source, store = moe_models("olmoe")
    gated = FillGatedStore(store, {block_file(1)})
    options = EngineOptions(
        memory_budget=_bases_budget(store, 3),
        read_ahead=1,
        expert_streaming="on",
        poison_unread_experts=True,
        verify_in_background=False,
    )
    engine = Engine(gated, options)
    try:
        reference = reference_model(source)
        assert sorted(engine.plan.pinned_bases) == [0, 1, 2]
        assert gated.reading.wait(WAIT_S)
        pinned, target = engine.pinned_bytes
        assert pinned < target
        during = compare_generation(engine, reference, 4)
        assert during.ids_equal and during.step_diffs == [0.0] * 4
        gated.go.set()
        engine.wait_pinned()
        assert engine.pinned_bytes == (target, target)
        after = compare_generation(engine, reference, 4)
        assert after.ids_equal and after.step_diffs == [0.0] * 4
    finally:
        gated.go.set()
        engine.close()


def test_wait_pinned_inside_a_request_is_refused(llama):
    chunked, _ = llama
    engine = Engine(LocalStore(chunked.store), EngineOptions(memory_budget="60%"))
    try:
        with engine.request(), pytest.raises(RuntimeError, match="inside a request"):
            engine.wait_pinned()
    finally:
        engine.close()


class FailingBaseStore(LocalStore):
    """The fill's reads of ``name`` fail until ``healthy`` is set (a store gone for a while)."""

    def __init__(self, root: Path, name: str):
        super().__init__(root)
        self.name, self.healthy = name, threading.Event()

    def read_ranges(self, name: str, *args, **kwargs):
        fill = threading.current_thread().name.startswith("layerstream-fill")
        if name == self.name and fill and not self.healthy.is_set():
            raise ChunkStoreError(f"{name}: the store went away for a while (a test's fault)")
        return super().read_ranges(name, *args, **kwargs)


def settle(fill) -> None:
    """Until every base read the fill has started is done and no other has started."""
    for _ in range(20):
        started = list(fill._base_futures.values())
        futures.wait(started, timeout=WAIT_S)
        if list(fill._base_futures.values()) == started:
            return
    raise AssertionError("the fill kept starting base reads")


def test_a_base_whose_background_read_failed_is_read_again_and_counted_apart(
    moe_models, monkeypatch
):
    """A server never calls wait_pinned: a base whose background read failed is read again
    from a later block boundary once the store is back. The fill's reads are never counted
    as a request's."""
    from architectures import compare_generation, reference_model
    from test_experts import _bases_budget

    from layerstream.engine import fill as fill_module

    monkeypatch.setattr(fill_module, "RETRY_AFTER_S", 0.0)  # no wait between tries
    source, store = moe_models("olmoe")
    failing = FailingBaseStore(store, block_file(1))
    options = EngineOptions(
        memory_budget=_bases_budget(store, 3),
        expert_streaming="on",
        poison_unread_experts=True,
        verify_in_background=False,
    )
    engine = Engine(failing, options)
    try:
        settle(engine.fill)
        assert engine.pinned_bytes[0] < engine.pinned_bytes[1]  # block 1's base failed
        stats = engine.streamer.stats
        assert stats.bytes_read == engine.manifest.rest_bytes  # the fill's are apart
        assert stats.pinned_bytes_read > 0
        failing.healthy.set()
        generation = compare_generation(engine, reference_model(source), 2)  # boundaries
        assert generation.ids_equal and generation.step_diffs == [0.0] * 2
        settle(engine.fill)
        assert engine.pinned_bytes[0] == engine.pinned_bytes[1]
    finally:
        engine.close()
