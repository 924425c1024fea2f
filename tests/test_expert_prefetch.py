"""Prefetch by prediction: the next block's experts are guessed from the hidden state at hand
and read ahead; a guess decides only which bytes are read early, never what is computed.

As in test_experts.py, expert slices that were not read are NaN, so an exact output proves
no guess (right or wrong) ever stood in for a routed expert.
"""

from __future__ import annotations

import threading

import pytest
import torch
from architectures import PROMPT, compare_generation, reference_model
from test_architectures import streaming_budget
from test_experts import MOE, expert_engine

from layerstream.engine.expert_reader import ExpertLease
from layerstream.engine.guessing import RETRY_EVERY, TRIALS, GuessChoice
from layerstream.engine.prediction import ExpertPredictor, find_router
from layerstream.errors import SettingsError

STEPS = 6


def _generate(engine, steps: int = STEPS) -> None:
    with engine.request():
        engine.model.generate(
            torch.tensor([PROMPT]), max_new_tokens=steps, do_sample=False, pad_token_id=0
        )


@pytest.mark.parametrize("name", MOE)
def test_guesses_are_read_ahead_and_the_output_stays_exact(moe_models, name):
    """Every MoE row: a router is found beside each experts module, guesses are made and
    mostly used, and ids and every step's logits stay from_pretrained's."""
    source, store = moe_models(name)
    engine = expert_engine(store, streaming_budget(store), expert_prefetch=True)
    try:
        predictor = engine.streamer.predictor
        assert predictor is not None and predictor.routers == len(engine.parts)
        generation = compare_generation(engine, reference_model(source), STEPS)
        assert generation.ids_equal and generation.step_diffs == [0.0] * STEPS
        _generate(engine)  # the last install of the request above is released by this one
        stats = engine.streamer.stats
        assert 0 < stats.experts_predicted_used <= stats.experts_predicted
        assert stats.experts_predicted_used <= stats.experts_routed_predicted
    finally:
        engine.close()


def test_the_router_is_the_module_that_chooses(moe_models):
    """The router found is the module whose output holds the indices the experts module
    receives (checked by running the block)."""
    _, store = moe_models("qwen3_moe")
    engine = expert_engine(store, "100%", expert_streaming="off")
    try:
        model = engine.model
        (first, *_) = engine.experts.values()
        router = find_router(model, first)
        assert router is not None
        seen: dict[str, torch.Tensor] = {}

        def chose(module, args, output) -> None:
            seen.setdefault("router", output[-1])

        def received(module, args) -> None:
            seen.setdefault("experts", args[1])

        hooks = [
            model.get_submodule(router.name).register_forward_hook(chose),
            model.get_submodule(first.name).register_forward_pre_hook(received),
        ]
        try:
            with torch.inference_mode():
                model(torch.tensor([PROMPT]))
        finally:
            for hook in hooks:
                hook.remove()
        assert torch.equal(seen["router"], seen["experts"])
    finally:
        engine.close()


def test_wrong_guesses_cost_bytes_never_correctness(moe_models, monkeypatch):
    """Guesses replaced by every expert the router would not choose: nothing guessed is
    used, more is read, and the output is still exact."""
    source, store = moe_models("olmoe")
    right = ExpertPredictor.predict

    def wrong(self, j, group, k, hidden):
        guess = right(self, j, group, k, hidden)
        if guess is None:
            return None
        target, experts = guess
        count = self._routers[k][target].experts.count
        return target, [e for e in range(count) if e not in experts]

    plain = expert_engine(store, streaming_budget(store), expert_prefetch=False)
    try:
        _generate(plain)
        plain_read = plain.streamer.stats.experts_read
    finally:
        plain.close()
    monkeypatch.setattr(ExpertPredictor, "predict", wrong)
    engine = expert_engine(store, streaming_budget(store))
    try:
        generation = compare_generation(engine, reference_model(source), STEPS)
        assert generation.ids_equal and generation.step_diffs == [0.0] * STEPS
        _generate(engine)
        stats = engine.streamer.stats
        assert stats.experts_predicted > 0
        assert stats.experts_read > plain_read
    finally:
        engine.close()


def test_without_prefetch_nothing_is_guessed(moe_models):
    _, store = moe_models("mixtral")
    engine = expert_engine(store, streaming_budget(store), expert_prefetch=False)
    try:
        assert engine.streamer.predictor is None
        _generate(engine)
        _generate(engine)
        assert engine.streamer.stats.experts_predicted == 0
    finally:
        engine.close()


def test_a_lease_is_given_back_only_after_its_prefetch_ends(moe_models, monkeypatch):
    """The buffer a guess is being read into is not handed to another block until that
    read has ended (else the read would write into the next block's weights)."""
    _, store = moe_models("qwen3_moe")
    engine = expert_engine(store, streaming_budget(store), read_ahead=0)
    engine.wait_pinned()  # the fill's own buffer use over before the one watched here
    order: list[str] = []
    given_back = threading.Event()
    reader = engine.streamer._reader
    real_release = reader.pool.release
    real_read = reader.read_experts

    def release(buffer):
        order.append("buffer given back")
        given_back.set()
        real_release(buffer)

    def slow_read(lease, data, group, experts):
        # a bug would give the buffer back meanwhile; the fix makes this wait time out
        given_back.wait(timeout=2)
        real_read(lease, data, group, experts)
        order.append("prefetch read done")

    monkeypatch.setattr(reader.pool, "release", release)
    try:
        j = engine.plan.streamed[0]
        lease = engine.streamer.acquire(j)
        assert isinstance(lease, ExpertLease)
        monkeypatch.setattr(reader, "read_experts", slow_read)
        lease.prefetch(0, [0, 1])
        lease.release()
        assert order == ["prefetch read done", "buffer given back"]
    finally:
        monkeypatch.setattr(reader, "read_experts", real_read)
        engine.close()


def test_a_failed_guess_read_is_read_again_by_the_block_that_needs_it(moe_models, monkeypatch):
    """A prefetch whose read fails leaves its experts unread: the block's own request reads
    them (a fresh read, which succeeds) and the output is exact."""
    source, store = moe_models("mixtral")
    engine = expert_engine(store, streaming_budget(store))
    real = ExpertLease._read
    failed: list[int] = []

    def flaky(self, group, experts, future):
        if threading.current_thread().name.startswith("layerstream-prefetch") and not failed:
            failed.append(self.index)
            self._settle(group, experts, future, OSError("connection reset"))
            raise OSError("connection reset")
        return real(self, group, experts, future)

    monkeypatch.setattr(ExpertLease, "_read", flaky)
    try:
        generation = compare_generation(engine, reference_model(source), STEPS)
        assert failed, "no guess was read ahead"
        assert generation.ids_equal and generation.step_diffs == [0.0] * STEPS
    finally:
        engine.close()


def _passes(choice: GuessChoice, took: dict[bool, float], count: int, rows: int = 1) -> list[bool]:
    """Run ``count`` passes over blocks 0..3, each taking ``took[on]`` seconds with guesses
    on or off (timestamps given, no clock): the way each pass ran."""
    ways, now = [], 1000.0
    for _ in range(count):
        choice.observe(0, rows, now)  # ends the pass before, and picks this one's way
        on = choice.on
        ways.append(on)
        for block in range(1, 4):
            choice.observe(block, rows, now + block * took[on] / 3)
        now += took[on] + 1.0  # the time outside the streamed blocks is not counted
    choice.observe(0, rows, now)  # the next pass starts: the last one ends
    return ways


@pytest.mark.parametrize("faster", [True, False])
def test_auto_keeps_the_faster_way_and_tries_the_other_now_and_then(faster):
    choice = GuessChoice("auto")
    took = {faster: 0.1, not faster: 0.25}
    ways = _passes(choice, took, 2 * TRIALS + 2 * RETRY_EVERY)
    trials, chosen = ways[: 2 * TRIALS], ways[2 * TRIALS :]
    assert sorted(trials) == [False] * TRIALS + [True] * TRIALS  # a few each way first
    # then the faster way, and the other once every RETRY_EVERY passes
    assert chosen.count(not faster) == 2
    assert chosen.count(faster) == 2 * RETRY_EVERY - 2
    assert choice.passes == [ways.count(False), ways.count(True)]


def test_auto_times_passes_of_one_shape_against_each_other():
    """Passes of another shape (more requests on them, or a prompt) are timed apart: a
    slow prompt pass with guesses does not count against guesses on one-token passes."""
    choice = GuessChoice("auto")
    ways = _passes(choice, {True: 0.1, False: 0.2}, 2 * TRIALS)
    assert ways.count(True) == ways.count(False) == TRIALS
    _passes(choice, {True: 5.0, False: 0.1}, 1, rows=64)  # a prompt, slow with guesses
    assert _passes(choice, {True: 0.1, False: 0.2}, 4)[1:] == [True] * 3


@pytest.mark.parametrize("mode", [True, False])
def test_fixed_prefetch_never_changes_its_way(mode):
    choice = GuessChoice(mode)
    assert set(_passes(choice, {mode: 1.0, not mode: 0.01}, 3 * TRIALS)) == {mode}


def test_auto_on_an_engine_tries_both_ways_and_stays_exact(moe_models):
    """The default (auto): passes run with guesses and without, every output exact."""
    source, store = moe_models("qwen3_moe")
    steps = 2 * TRIALS + 2
    engine = expert_engine(store, streaming_budget(store))
    try:
        assert engine.options.expert_prefetch == "auto" and engine.streamer.predictor
        generation = compare_generation(engine, reference_model(source), steps)
        assert generation.ids_equal and generation.step_diffs == [0.0] * steps
        off, on = engine.guessing.passes
        assert off >= TRIALS and on >= TRIALS
    finally:
        engine.close()
    with pytest.raises(SettingsError, match="expert_prefetch must be True, False or 'auto'"):
        expert_engine(store, streaming_budget(store), expert_prefetch="sometimes")


def test_with_every_base_pinned_an_auto_read_ahead_becomes_expert_cache(moe_models, caplog):
    """Once every streamed block's non-expert part is pinned, a block read ahead would hold
    only guessed experts: where every base fits without one, `read_ahead: auto` is 0 and
    its buffer goes to the bases and the expert cache, unless guesses are asked for
    (expert_prefetch true) or a read-ahead is set. `layerstream size` plans the same, and
    the output stays exact."""
    import logging

    from layerstream.chunker.sizing import config_from_json, size_model
    from layerstream.format.manifest import Manifest

    source, store = moe_models("qwen3_moe")
    manifest = Manifest.from_json((store / "manifest.json").read_text())
    config = config_from_json((store / "config.json").read_text())
    bases = sum(manifest.chunks[b.chunk].experts.base_bytes for b in manifest.blocks)
    largest = max(manifest.block_bytes)  # room for two buffers, every base and some experts
    budget = manifest.rest_bytes + 2 * largest + bases + largest // 4
    caches = {}
    for prefetch, ahead, want in [
        ("auto", "auto", 0),
        (False, "auto", 0),
        (True, "auto", 1),
        ("auto", 1, 1),
    ]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="layerstream"):
            engine = expert_engine(store, budget, read_ahead=ahead, expert_prefetch=prefetch)
        try:
            plan = engine.plan
            assert set(plan.streamed) <= set(plan.pinned_bases) and plan.streamed
            assert plan.read_ahead == want and plan.cache_over_read_ahead == (want == 0)
            guessing = want == 1 and prefetch is not False
            assert (engine.streamer.predictor is not None) == guessing
            if want == 0 and prefetch == "auto":
                assert any(
                    "holds the expert cache instead" in r.getMessage() for r in caplog.records
                )
            sizing = size_model(
                manifest,
                config,
                memory_budget=str(budget),
                read_ahead=ahead,
                expert_streaming="on",
                expert_prefetch=prefetch,
            )
            assert (sizing.buffer_count, sizing.expert_cache) == (
                plan.pool_buffers,
                plan.expert_cache,
            )
            caches[want] = plan.expert_cache
            generation = compare_generation(engine, reference_model(source), 3)
            assert generation.ids_equal and generation.step_diffs == [0.0] * 3
        finally:
            engine.close()
    assert caches[0] >= caches[1] + plan.buffer_bytes  # the read-ahead's buffer, and more
    # where a read-ahead's buffer would leave some bases unpinned, going without it pins all
    lean = manifest.rest_bytes + largest + bases + largest // 4
    for ahead, want, every_base in [("auto", 0, True), (1, 1, False)]:
        engine = expert_engine(store, lean, read_ahead=ahead)
        try:
            plan = engine.plan
            assert plan.read_ahead == want
            assert (set(plan.streamed) <= set(plan.pinned_bases)) == every_base
        finally:
            engine.close()


@pytest.mark.parametrize(("mode", "level"), [(True, "WARNING"), ("auto", "INFO")])
def test_without_a_read_ahead_nothing_is_guessed_and_it_says_so(moe_models, caplog, mode, level):
    """A guess is read into the next block's lease, which only a read-ahead makes: at a
    budget with none, no router runs for guesses and the log says why (a warning when
    expert_prefetch asked for them)."""
    import logging

    _, store = moe_models("qwen3_moe")
    with caplog.at_level(logging.INFO, logger="layerstream"):
        engine = expert_engine(store, streaming_budget(store), read_ahead=0, expert_prefetch=mode)
    try:
        assert engine.plan.read_ahead == 0 and engine.streamer.predictor is None
        _generate(engine)
        assert engine.streamer.stats.experts_predicted == 0
    finally:
        engine.close()
    (told,) = [r for r in caplog.records if "no lease to read guessed experts" in r.getMessage()]
    assert told.levelname == level
