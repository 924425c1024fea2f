"""The expert cache: the most routed experts kept between installs, in the budget left once
every streamed block's non-expert part is pinned."""

from __future__ import annotations

import pytest
import torch
from architectures import PROMPT, compare_generation, reference_model
from test_experts import STEPS, _bases_budget, expert_engine

from layerstream.engine.expert_cache import HALF_LIFE, ExpertCache

SLOT = 16


def _data(fill: int) -> torch.Tensor:
    return torch.full((64,), fill, dtype=torch.uint8)


def _route(cache: ExpertCache, expert: int, times: int) -> None:
    for _ in range(times):
        cache.routed("block_0001", 0, [expert])


def test_a_kept_expert_is_copied_back_to_its_ranges():
    cache = ExpertCache(4 * SLOT, SLOT)
    source = torch.arange(64, dtype=torch.uint8)
    ranges = [(3, 5), (40, 11)]  # two slices, 16 bytes in all
    cache.offer(("block_0001", 0, 2), "v1", _at(source, ranges))
    target = torch.zeros(64, dtype=torch.uint8)
    assert cache.copy_into(("block_0001", 0, 2), "v1", _at(target, ranges))
    for offset, length in ranges:
        assert torch.equal(target[offset : offset + length], source[offset : offset + length])
    assert int(target.sum()) == sum(int(source[o : o + n].sum()) for o, n in ranges)
    # another version of the chunk, another expert: not kept
    assert not cache.copy_into(("block_0001", 0, 2), "v2", _at(target, ranges))
    assert not cache.copy_into(("block_0001", 0, 3), "v1", _at(target, ranges))
    assert cache.stats.hits == 1


def test_the_most_routed_experts_stay():
    """Two slots: the two most routed experts are kept; a less routed one is not admitted,
    nor one routed a little more (by less than ADMIT); one routed ADMIT times more replaces
    the least routed kept one."""
    cache = ExpertCache(2 * SLOT, SLOT)
    ranges = [(0, SLOT)]
    for expert, times in [(0, 5), (1, 3), (2, 1)]:
        _route(cache, expert, times)
        cache.offer(("block_0001", 0, expert), None, _at(_data(expert), ranges))
    assert cache.kept() == [("block_0001", 0, 0), ("block_0001", 0, 1)]
    _route(cache, 3, 4)  # 4 <= 1.5 x 3
    cache.offer(("block_0001", 0, 3), None, _at(_data(3), ranges))
    assert cache.kept() == [("block_0001", 0, 0), ("block_0001", 0, 1)]
    _route(cache, 3, 1)  # 5 > 1.5 x 3
    cache.offer(("block_0001", 0, 3), None, _at(_data(3), ranges))
    assert cache.kept() == [("block_0001", 0, 0), ("block_0001", 0, 3)]
    target = torch.zeros(64, dtype=torch.uint8)
    assert cache.copy_into(("block_0001", 0, 3), None, _at(target, ranges))
    assert torch.equal(target[:SLOT], _data(3)[:SLOT])  # expert 1's slot holds expert 3 now


def test_a_pass_over_the_blocks_does_not_churn_the_cache():
    """Experts routed once each, in order, pass after pass (a cache smaller than a pass):
    the ones kept first stay and serve the next pass; a least-recently-used cache would
    replace each by the next and never hit."""
    cache = ExpertCache(4 * SLOT, SLOT)
    ranges = [(0, SLOT)]
    target = torch.zeros(64, dtype=torch.uint8)
    hits = 0
    for _ in range(3):
        for expert in range(8):
            cache.tick()
            key = ("block_0001", 0, expert)
            cache.routed(*key[:2], [expert])
            if cache.copy_into(key, None, _at(target, ranges)):
                hits += 1
            else:
                cache.offer(key, None, _at(_data(expert), ranges))
    assert hits == 2 * 4  # passes 2 and 3 find the first four


def test_old_routing_decays():
    """An expert routed often long ago loses its slot to one routed a little lately."""
    cache = ExpertCache(SLOT, SLOT)
    ranges = [(0, SLOT)]
    _route(cache, 0, 8)
    cache.offer(("block_0001", 0, 0), None, _at(_data(0), ranges))
    for _ in range(4 * HALF_LIFE):  # eight routings decay to half of one
        cache.tick()
    _route(cache, 1, 1)
    cache.offer(("block_0001", 0, 1), None, _at(_data(1), ranges))
    assert cache.kept() == [("block_0001", 0, 1)]


def test_scores_survive_their_rescaling():
    """Normalised scores are brought back before they overflow, in order."""
    cache = ExpertCache(SLOT, SLOT)
    ranges = [(0, SLOT)]
    _route(cache, 0, 3)
    cache.offer(("block_0001", 0, 0), None, _at(_data(0), ranges))
    for _ in range(600 * HALF_LIFE):  # past the rescaling threshold (2**500)
        cache.tick()
    assert 1.0 <= cache._unit < 1e150
    _route(cache, 0, 1)  # 1 + what is left of 3 (nothing, after 600 half-lives)
    _route(cache, 1, 2)
    cache.offer(("block_0001", 0, 1), None, _at(_data(1), ranges))
    assert cache.kept() == [("block_0001", 0, 1)]


def test_an_expert_larger_than_a_slot_or_a_cache_without_slots_keeps_nothing():
    empty = ExpertCache(SLOT - 1, SLOT)
    assert empty.slots == 0
    empty.offer(("block_0001", 0, 0), None, [_data(0)[:SLOT]])
    assert empty.kept() == []
    cache = ExpertCache(2 * SLOT, SLOT)
    cache.offer(("block_0001", 0, 0), None, [torch.zeros(SLOT + 1, dtype=torch.uint8)])
    assert cache.kept() == []


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_a_second_request_finds_what_the_first_routed_to(moe_models, name):
    """Every base pinned and room for half the experts: the same prompt again copies kept
    experts instead of reading them, exactly, with unread slices NaN."""
    source, store = moe_models(name)
    room = sum(p.info.bytes - p.base_bytes for p in _parts(store)) // 2
    engine = expert_engine(store, _bases_budget(store, 8) + room, expert_prefetch=False)
    try:
        assert engine.plan.expert_cache >= room and not engine.plan.resident
        reference = reference_model(source)
        first = compare_generation(engine, reference, STEPS)
        before = engine.streamer.stats.snapshot()
        second = compare_generation(engine, reference, STEPS)
        stats = engine.streamer.stats.since(before)
        for generation in (first, second):
            assert generation.ids_equal and generation.step_diffs == [0.0] * STEPS
        read_first = before.experts_read
        assert read_first > 0
        # what the first request read is kept: the second reads only experts it routes to
        # for the first time
        assert stats.expert_cache_hits > 0
        assert stats.experts_read < read_first
    finally:
        engine.close()


def test_the_cache_is_in_the_budget_and_reported(moe_models):
    _, store = moe_models("olmoe")
    budget = _bases_budget(store, 8) + 5 * 2**16
    engine = expert_engine(store, budget)
    try:
        plan = engine.plan
        assert plan.expert_cache > 0 and plan.weight_bytes() <= budget
        cache = engine.streamer._reader.cache
        assert cache is not None and cache.nbytes <= plan.expert_cache
        assert "expert cache" in plan.describe()
        hits = []
        for _ in range(2):
            with engine.request() as ctx:
                engine.model.generate(
                    torch.tensor([PROMPT]), max_new_tokens=4, do_sample=False, pad_token_id=0
                )
            hits.append(ctx.stats.expert_cache_hits)
        assert 0 < len(cache.kept()) <= cache.slots
        assert hits[1] > 0  # the same prompt routes to what the first request kept
    finally:
        engine.close()


def _parts(store):
    engine = expert_engine(store, _bases_budget(store, 8))
    try:
        return list(engine.parts.values())
    finally:
        engine.close()


def _at(data: torch.Tensor, ranges: list[tuple[int, int]]) -> list[torch.Tensor]:
    return [data[offset : offset + length] for offset, length in ranges]
