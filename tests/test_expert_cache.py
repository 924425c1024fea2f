"""The expert cache: the most routed experts kept between installs, in the budget left once
every streamed block's non-expert part is pinned."""

from __future__ import annotations

import errno
import mmap

import pytest
import torch
from architectures import PROMPT, compare_generation, reference_model
from test_experts import STEPS, _bases_budget, expert_engine

from layerstream.engine import expert_cache
from layerstream.engine.expert_cache import HALF_LIFE, ExpertCache, Home
from layerstream.engine.expert_reader import ExpertReader
from layerstream.engine.readers import BufferPool
from layerstream.errors import ChunkIntegrityError

SLOT = mmap.PAGESIZE  # an expert a page: what leaves its home is given back whole
EXPERTS = 16


def _home(poison: bool = False) -> Home:
    return Home("block_0001", EXPERTS * SLOT, poison)


def _at(home: Home, expert: int) -> list[torch.Tensor]:
    return [home.buffer[expert * SLOT : (expert + 1) * SLOT]]


def _route(cache: ExpertCache, expert: int, times: int) -> None:
    for _ in range(times):
        cache.routed("block_0001", 0, [expert])


def _read(cache: ExpertCache, home: Home, expert: int, version: str | None = None) -> None:
    """An install reads ``expert`` into ``home`` (its bytes: the expert's number), uses it,
    and has run."""
    views = _at(home, expert)
    home.hold(views)
    views[0].fill_(expert + 1)
    key = ("block_0001", 0, expert)
    cache.add(key, version, home, views)
    cache.done([key])


def _holds(home: Home, expert: int) -> bool:
    return bool((_at(home, expert)[0] == expert + 1).all())


def test_a_home_gives_back_the_pages_nothing_holds():
    """Views that share a page: releasing one gives back its own pages but not the shared
    one; releasing the other gives back the rest. A page given back reads as zeros."""
    with torch.inference_mode():  # as a request makes it: still written outside that mode
        home = Home("block_0001", 4 * SLOT)
    left, right = home.buffer[: SLOT + 100], home.buffer[SLOT + 100 : 3 * SLOT]
    home.hold([left, right])
    home.buffer[: 3 * SLOT].fill_(7)
    home.release([left])
    assert int(home.buffer[:SLOT].sum()) == 0  # left's own page
    assert bool((home.buffer[SLOT : 3 * SLOT] == 7).all())  # the shared page stays
    home.release([right])
    assert int(home.buffer.sum()) == 0


class _Costs:
    """What a home says its pages cost: bytes taken and given back."""

    def __init__(self) -> None:
        self.taken = self.given_back = 0

    def taken_(self, nbytes: int, seconds: float) -> None:
        assert seconds >= 0
        self.taken += nbytes

    def given_back_(self, nbytes: int, seconds: float) -> None:
        assert seconds >= 0
        self.given_back += nbytes


@pytest.mark.parametrize("poison", [False, True])
def test_a_home_takes_the_pages_nothing_held_before_a_write_and_measures_it(poison):
    """Holding views takes (and reports) only the pages no view held yet, leaving what they
    read as; giving back reports the pages that went."""
    costs = _Costs()
    placement = type("P", (), {"taken": costs.taken_, "given_back": costs.given_back_})()
    home = Home("block_0001", 4 * SLOT, poison, placement)
    blank = home.buffer.clone()
    left, right = home.buffer[: SLOT + 100], home.buffer[SLOT + 100 : 3 * SLOT]
    home.hold([left])
    assert costs.taken == 2 * SLOT and torch.equal(home.buffer, blank)
    home.hold([right])
    assert costs.taken == 3 * SLOT  # the page it shares with ``left`` was taken already
    home.release([left])
    assert costs.given_back == SLOT
    home.release([right])
    assert costs.given_back == 3 * SLOT and torch.equal(home.buffer, blank)


def test_a_view_around_held_pages_takes_the_runs_either_side():
    """A view over pages another view holds in its middle takes only the two runs of
    pages around them, and giving both back returns every page."""
    costs = _Costs()
    placement = type("P", (), {"taken": costs.taken_, "given_back": costs.given_back_})()
    home = Home("block_0001", 8 * SLOT, costs=placement)
    middle, around = home.buffer[3 * SLOT : 5 * SLOT], home.buffer[SLOT : 7 * SLOT]
    home.hold([middle])
    home.hold([around])
    assert costs.taken == 2 * SLOT + 4 * SLOT
    home.release([middle])
    assert costs.given_back == 0  # ``around`` still holds them
    home.release([around])
    assert costs.given_back == 6 * SLOT


def test_a_kernel_without_populate_write_has_its_pages_faulted_in(monkeypatch):
    """Where madvise refuses MADV_POPULATE_WRITE (Linux before 5.14), pages are taken by a
    write each, from the first refusal on."""
    monkeypatch.setattr(expert_cache, "_POPULATE_WRITE", 0x7FFF)  # an advice no kernel has
    home = Home("block_0001", 4 * SLOT)
    view = home.buffer[SLOT : 3 * SLOT]
    home.hold([view])
    assert expert_cache._POPULATE_WRITE is None
    view.fill_(5)
    assert int(home.buffer.sum()) == 5 * 2 * SLOT


@pytest.mark.skipif(expert_cache._POPULATE_WRITE is None, reason="no MADV_POPULATE_WRITE here")
def test_a_refused_populate_of_a_supported_kernel_takes_those_pages_by_writes(monkeypatch):
    """madvise(MADV_POPULATE_WRITE) failing for want of memory (ENOMEM, a cgroup at its
    limit) takes those pages by a write each, and keeps using the call after."""

    class Refusing:  # the home's mapping, whose populate fails once
        def __init__(self, mapping: mmap.mmap) -> None:
            self.mapping, self.refused = mapping, 0

        def __len__(self) -> int:
            return len(self.mapping)

        def madvise(self, option: int, start: int, length: int) -> None:
            if option == expert_cache._POPULATE_WRITE and not self.refused:
                self.refused += 1
                raise OSError(errno.ENOMEM, "Cannot allocate memory")
            self.mapping.madvise(option, start, length)

    monkeypatch.setattr(expert_cache, "_POPULATE_WRITE", expert_cache._POPULATE_WRITE)
    home = Home("block_0001", 4 * SLOT)
    home._map = refusing = Refusing(home._map)
    home.hold([home.buffer[:SLOT]])
    home.hold([home.buffer[2 * SLOT : 3 * SLOT]])
    assert refusing.refused == 1 and expert_cache._POPULATE_WRITE is not None
    home.buffer[: 3 * SLOT].fill_(1)
    assert int(home.buffer.sum()) == 3 * SLOT


def test_an_expert_read_into_a_buffer_is_copied_home_when_the_cache_keeps_it():
    """A copying install offers what it read: copied into its home where a slot is free or
    it outscores the lowest kept expert, else not written there at all."""
    cache, home = ExpertCache(2 * SLOT, SLOT), _home()

    def offer(expert: int, version: str | None = None) -> bool:
        views = _at(home, expert)
        key = ("block_0001", 0, expert)
        return cache.offer(key, version, home, views, lambda: views[0].fill_(expert + 1))

    _route(cache, 0, 2)
    _route(cache, 1, 3)
    assert offer(0) and offer(1) and _holds(home, 0) and _holds(home, 1)
    assert not offer(0)  # kept already, for this version
    _route(cache, 2, 1)
    assert not offer(2) and int(_at(home, 2)[0].sum()) == 0  # not written
    _route(cache, 2, 9)
    views = cache.use(("block_0001", 0, 1), None)  # the lowest, 0, is replaced
    assert views is not None and bool((views[0] == 2).all())
    assert offer(2)
    assert cache.kept() == [("block_0001", 0, 1), ("block_0001", 0, 2)]
    assert int(_at(home, 0)[0].sum()) == 0  # gone from its home
    cache.done([("block_0001", 0, 1)])
    assert offer(1, version="v2")  # another version replaces the one kept
    assert cache.use(("block_0001", 0, 1), None) is None
    assert cache.use(("block_0001", 0, 1), "v2") is not None


def test_a_kept_expert_stays_where_it_was_read():
    """An install finds a kept expert of its chunk's version in its home, where it was read
    (no copy); another version, or an expert not read, is not found."""
    cache, home = ExpertCache(4 * SLOT, SLOT), _home()
    _read(cache, home, 2, "v1")
    key = ("block_0001", 0, 2)
    assert cache.kept() == [key]
    assert cache.use(key, "v1") and _holds(home, 2)
    cache.done([key])
    assert not cache.use(key, "v2")
    assert not cache.use(("block_0001", 0, 3), "v1")
    assert cache.stats.hits == 1


def test_the_most_routed_experts_stay_and_the_others_leave_their_home():
    """Two slots: the two most routed experts are kept; a less routed one is not admitted,
    nor one routed a little more (by less than ADMIT); one routed ADMIT times more replaces
    the least routed kept one. What is not kept is given back once used: its pages read as
    zeros (a fresh page), or NaN where the home is poisoned."""
    for poison in (False, True):
        gone = 0xFF if poison else 0
        cache, home = ExpertCache(2 * SLOT, SLOT), _home(poison)
        for expert, times in [(0, 5), (1, 3), (2, 1)]:
            _route(cache, expert, times)
            _read(cache, home, expert)
        assert cache.kept() == [("block_0001", 0, 0), ("block_0001", 0, 1)]
        assert _holds(home, 0) and _holds(home, 1)
        assert bool((_at(home, 2)[0] == gone).all())
        _route(cache, 3, 4)  # 4 <= 1.5 x 3
        _read(cache, home, 3)
        assert cache.kept() == [("block_0001", 0, 0), ("block_0001", 0, 1)]
        _route(cache, 3, 1)  # 5 > 1.5 x 3
        _read(cache, home, 3)
        assert cache.kept() == [("block_0001", 0, 0), ("block_0001", 0, 3)]
        assert _holds(home, 3) and bool((_at(home, 1)[0] == gone).all())
        assert (cache.stats.admitted, cache.stats.evicted) == (3, 1)


def test_an_expert_in_use_is_neither_replaced_nor_given_back():
    """An install computing with a kept expert keeps it in its home: one that outscores it
    is not admitted meanwhile (and leaves once used); once the install has run, the next
    one that outscores it replaces it."""
    cache, home = ExpertCache(SLOT, SLOT), _home()
    kept = ("block_0001", 0, 0)
    _route(cache, 0, 1)
    _read(cache, home, 0)
    assert cache.use(kept, None)
    _route(cache, 1, 10)
    _read(cache, home, 1)
    assert cache.kept() == [kept] and _holds(home, 0) and not _holds(home, 1)
    cache.done([kept])
    _read(cache, home, 1)
    assert cache.kept() == [("block_0001", 0, 1)] and not _holds(home, 0)


def _held_pages(home: Home) -> int:
    return int((home._held > 0).sum())


def test_the_buffers_memory_is_lent_while_blocks_compute_in_place():
    """Two slots of its own and two lent: lent, four experts stay; an install about to read
    two more makes room for them first (the lowest-scored leave), so what the home holds
    never passes the four slots, and what it read is kept in the room left; a failed read
    gives its room back; taken back, the kept experts beyond the cache's own two leave."""
    cache, home = ExpertCache(2 * SLOT, SLOT), _home()
    cache.lend(2)
    for expert, times in [(0, 6), (1, 5), (2, 4), (3, 3)]:
        _route(cache, expert, times)
        _read(cache, home, expert)
    assert len(cache.kept()) == 4 and _held_pages(home) == 4
    cache.reserve(2)  # the two lowest leave before the reads are held
    assert [k[2] for k in cache.kept()] == [0, 1] and _held_pages(home) == 2
    for expert in (4, 5):
        _route(cache, expert, expert - 3)
        views = _at(home, expert)
        home.hold(views)
        cache.add(("block_0001", 0, expert), None, home, views)
        assert _held_pages(home) <= 4
    cache.done([("block_0001", 0, 4), ("block_0001", 0, 5)])
    assert [k[2] for k in cache.kept()] == [0, 1, 4, 5] and _held_pages(home) == 4
    cache.reserve(1)
    cache.unreserve(1)  # the read failed: its room is the cache's again
    assert [k[2] for k in cache.kept()] == [0, 1, 5] and _held_pages(home) == 3
    _route(cache, 6, 1)
    _read(cache, home, 6)
    assert len(cache.kept()) == 4
    cache.lend(0)  # a buffer taken whole: its share leaves first
    assert [k[2] for k in cache.kept()] == [0, 1] and _held_pages(home) == 2
    _read(cache, home, 7)  # not lent: two slots only
    assert len(cache.kept()) == 2


def test_without_a_loan_what_is_in_flight_leaves_the_slots_to_the_kept():
    """Where the buffers' memory is not lent (a quantized store), the tickets bound what
    installs hold in flight apart: an expert read while others are in flight still takes a
    free slot (it once found none, and no kept expert to replace: an error)."""
    cache, home = ExpertCache(SLOT, SLOT), _home()

    def add(expert: int) -> tuple[str, int, int]:
        key, views = ("block_0001", 0, expert), _at(home, expert)
        home.hold(views)
        cache.add(key, None, home, views)
        return key

    _route(cache, 0, 2)
    add(0)
    stale = add(1)  # in flight, not kept
    cache.done([("block_0001", 0, 0)])
    cache.forget("block_0001")  # the kept one leaves; the one in flight stays till done
    assert cache.kept() == []
    add(2)
    assert cache.kept() == [("block_0001", 0, 2)]
    cache.done([stale, ("block_0001", 0, 2)])


def test_a_cache_lent_nothing_keeps_its_own_slots():
    cache, home = ExpertCache(SLOT, SLOT), _home()
    cache.lend(0)
    for expert in range(3):
        _read(cache, home, expert)
    assert len(cache.kept()) == 1


def test_a_failed_read_makes_its_home_forget_its_experts():
    """Bytes beside a part whose read failed may not be the chunk's: no expert of that
    chunk is found any more; those no install uses leave their home now, the others once
    done."""
    cache, home = ExpertCache(4 * SLOT, SLOT), _home()
    for expert in range(3):
        _read(cache, home, expert)
    assert cache.use(("block_0001", 0, 1), None)
    cache.forget("block_0001")
    assert cache.kept() == []
    assert not _holds(home, 0) and _holds(home, 1) and not _holds(home, 2)
    assert cache.use(("block_0001", 0, 1), None) is None  # in use, but found by nobody
    cache.done([("block_0001", 0, 1)])
    assert not _holds(home, 1)
    _read(cache, home, 1)  # read again: kept again
    assert cache.kept() == [("block_0001", 0, 1)]


def test_a_pass_over_the_blocks_does_not_churn_the_cache():
    """Experts routed once each, in order, pass after pass (a cache smaller than a pass):
    the ones kept first stay and serve the next pass; a least-recently-used cache would
    replace each by the next and never hit."""
    cache, home = ExpertCache(4 * SLOT, SLOT), _home()
    hits = 0
    for _ in range(3):
        for expert in range(8):
            cache.tick()
            key = ("block_0001", 0, expert)
            cache.routed(*key[:2], [expert])
            if cache.use(key, None):
                hits += 1
                cache.done([key])
            else:
                _read(cache, home, expert)
    assert hits == 2 * 4  # passes 2 and 3 find the first four


def test_old_routing_decays():
    """An expert routed often long ago loses its slot to one routed a little lately."""
    cache, home = ExpertCache(SLOT, SLOT), _home()
    _route(cache, 0, 8)
    _read(cache, home, 0)
    for _ in range(4 * HALF_LIFE):  # eight routings decay to half of one
        cache.tick()
    _route(cache, 1, 1)
    _read(cache, home, 1)
    assert cache.kept() == [("block_0001", 0, 1)]


def test_scores_survive_their_rescaling():
    """Normalised scores are brought back before they overflow, in order."""
    cache, home = ExpertCache(SLOT, SLOT), _home()
    _route(cache, 0, 3)
    _read(cache, home, 0)
    for _ in range(600 * HALF_LIFE):  # past the rescaling threshold (2**500)
        cache.tick()
    assert 1.0 <= cache._unit < 1e150
    _route(cache, 0, 1)  # 1 + what is left of 3 (nothing, after 600 half-lives)
    _route(cache, 1, 2)
    _read(cache, home, 1)
    assert cache.kept() == [("block_0001", 0, 1)]


def test_a_cache_without_slots_keeps_nothing():
    empty, home = ExpertCache(SLOT - 1, SLOT), _home()
    assert empty.slots == 0
    _read(empty, home, 0)
    assert empty.kept() == [] and not _holds(home, 0)


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_a_second_request_finds_what_the_first_routed_to(moe_models, name, in_place):
    """Every base pinned and room for half the experts: the same prompt again computes with
    the experts the first request kept instead of reading them, exactly, with unread slices
    NaN: where they lie in their block's home (in place), or copied into a streaming buffer;
    the first request computed the other way."""
    source, store = moe_models(name)
    room = sum(p.info.bytes - p.base_bytes for p in _parts(store)) // 2
    engine = expert_engine(
        store,
        _bases_budget(store, 8) + room,
        expert_prefetch=False,
        expert_cache_in_place=not in_place,
    )
    try:
        assert engine.plan.expert_cache >= room and not engine.plan.resident
        reference = reference_model(source)
        first = compare_generation(engine, reference, STEPS)
        before = engine.streamer.stats.snapshot()
        homes = engine.streamer._reader._homes
        addresses = [
            (h.buffer.data_ptr(), h.buffer.data_ptr() + h.buffer.numel()) for h in homes.values()
        ]
        computed_on = []
        engine.placement.in_place = engine.placement.fixed = in_place

        def where(module, args):  # after layerstream's own pre-hook has installed the block
            computed_on.append([p.data_ptr() for p in module.parameters(recurse=False)])

        experts = [m for n, m in engine.model.named_modules() if n.endswith("mlp.experts")]
        handles = [m.register_forward_pre_hook(where) for m in experts]
        second = compare_generation(engine, reference, STEPS)
        for handle in handles:
            handle.remove()
        stats = engine.streamer.stats.since(before)
        assert len(homes) == len(engine.plan.streamed) and computed_on
        at_home = [
            all(any(a <= ptr < b for a, b in addresses) for ptr in call) for call in computed_on
        ]
        # the first block's lease was made (read ahead) as the first request ended; copying,
        # an install whose routed experts all lie kept computes in its home too
        assert all(at_home[1:]) if in_place else not all(at_home[1:])
        # computing in place, the buffers' memory was lent to the cache; else taken back
        assert (engine.streamer._reader.cache.spare > 0) == in_place
        # one of the two requests computed in place: its homes' views, made inside a
        # request (inference mode), are normal tensors, which installs bind in any mode
        bound = [h.tensors for h in homes.values() if h.tensors is not None]
        assert bound and not any(t.is_inference() for views in bound for t in views.values())
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


def test_the_cache_is_in_the_budget_and_reported(moe_models, monkeypatch):
    """The cache's slots fit the plan's room; the kept experts may take the memory of the
    buffers whose pages are given back too (in place), but at no moment do the homes and
    the buffers hold more than both: not in a prefill routed to every expert (its install
    makes room first), nor as blocks switch to computing in buffers (a buffer taken whole
    takes its share back before it is written) and back."""
    _, store = moe_models("olmoe")
    # room for the pages the homes keep at boundaries between experts (engine.py), and more
    budget = _bases_budget(store, 8) + 2**20 + 5 * 2**16
    engine = expert_engine(store, budget, expert_cache_in_place=True)
    reader = engine.streamer._reader
    plan = engine.plan
    limit = plan.expert_cache + plan.pool_buffers * plan.buffer_bytes
    peak = [0]

    def held() -> int:
        homes = sum(_held_pages(home) for home in reader._homes.values()) * mmap.PAGESIZE
        pool = reader.pool
        return homes + sum(b.numel() for b in pool.buffers) - pool.unwritten()

    for cls, name in ((Home, "hold"), (BufferPool, "_taken")):
        method = getattr(cls, name)

        def watched(self, *args, _method=method):
            _method(self, *args)
            peak[0] = max(peak[0], held())

        monkeypatch.setattr(cls, name, watched)
    try:
        assert plan.expert_cache > 0 and plan.weight_bytes() <= budget
        cache = reader.cache
        assert cache is not None and cache.nbytes <= plan.expert_cache
        assert "expert cache" in plan.describe()
        hits = []
        for prompt in (PROMPT * 3, PROMPT, PROMPT):
            with engine.request() as ctx:
                engine.model.generate(
                    torch.tensor([prompt]), max_new_tokens=4, do_sample=False, pad_token_id=0
                )
            hits.append(ctx.stats.expert_cache_hits)
        assert cache.spare > 0 and cache.slots < len(cache.kept()) <= cache.slots + cache.spare
        assert hits[2] > 0  # the same prompt routes to what the request before kept
        for in_place in (False, True):  # in buffers, the loan taken back; then lent again
            engine.placement.in_place = engine.placement.fixed = in_place
            with engine.request():
                engine.model.generate(
                    torch.tensor([PROMPT * 2]), max_new_tokens=3, do_sample=False, pad_token_id=0
                )
            assert (cache.spare > 0) == in_place
            assert len(cache.kept()) <= cache.slots + cache.spare
        assert 0 < peak[0] <= limit
    finally:
        engine.close()


def _parts(store):
    engine = expert_engine(store, _bases_budget(store, 8))
    try:
        return list(engine.parts.values())
    finally:
        engine.close()


def test_a_failed_read_past_the_page_cache_into_a_home_spoils_its_kept_experts(
    moe_models, monkeypatch
):
    """A read past the page cache writes the file's bytes beside its parts, on pages kept
    neighbours lie on: where one into a home fails, its chunk's kept experts are forgotten
    and the request fails; the next request reads them again and is exact."""
    source, store = moe_models("qwen3_moe")
    room = sum(p.info.bytes - p.base_bytes for p in _parts(store)) // 2
    engine = expert_engine(
        store, _bases_budget(store, 8) + room, expert_prefetch=False, expert_cache_in_place=True
    )
    try:
        reference = reference_model(source)
        assert compare_generation(engine, reference, STEPS).ids_equal
        reader, cache = engine.streamer._reader, engine.streamer._reader.cache
        kept_before = {key[0] for key in cache.kept()}
        read_missed = ExpertReader._read_missed
        failed: list[str] = []

        def fail_once(self, lease, data, group, experts):
            if lease.in_place and not failed:
                failed.append(lease.info.name)
                self._direct = True  # as where the page cache cannot hold the chunks
                raise ChunkIntegrityError("an expert's read failed (injected)")
            return read_missed(self, lease, data, group, experts)

        monkeypatch.setattr(ExpertReader, "_read_missed", fail_once)
        with pytest.raises(ChunkIntegrityError, match="injected"), engine.request():
            engine.model.generate(
                torch.tensor([list(reversed(PROMPT))]),  # other experts: misses
                max_new_tokens=2,
                do_sample=False,
                pad_token_id=0,
            )
        (chunk,) = failed
        assert chunk in kept_before and reader.spoiled(chunk) == 1
        assert not [key for key in cache.kept() if key[0] == chunk]
        reader._direct = False
        second = compare_generation(engine, reference, STEPS)
        assert second.ids_equal and second.step_diffs == [0.0] * STEPS
    finally:
        engine.close()


def _copying_engine(store, **options):
    """Every base pinned, one streaming buffer, room for half the experts in the cache, no
    guesses, blocks computing in buffers."""
    room = sum(p.info.bytes - p.base_bytes for p in _parts(store)) // 2
    return expert_engine(
        store,
        _bases_budget(store, 8, buffers=1) + room,
        read_ahead=0,
        expert_prefetch=False,
        expert_cache_in_place=False,
        **options,
    )


def test_a_copying_install_whose_routed_experts_all_lie_kept_computes_in_its_home(moe_models):
    """Blocks computing in buffers: an install whose first routed experts all lie kept in
    its block's home computes there (no copy), every other in its buffer; exact, with every
    slice it did not read or keep NaN."""
    from layerstream.engine.experts import chosen

    source, store = moe_models("qwen3_moe")
    engine = _copying_engine(store)
    try:
        reader, manifest = engine.streamer._reader, engine.manifest
        assert reader.cache.lending and engine.plan.read_ahead == 0
        reference = reference_model(source)
        first = compare_generation(engine, reference, STEPS)
        experts = {n: m for n, m in engine.model.named_modules() if n.endswith("mlp.experts")}
        kept, at_home = [], []

        def before(name, module, args):  # before layerstream's hook: what the cache holds
            chunk = manifest.blocks[int(name.split(".")[2])].chunk
            version = reader.bases[chunk].version
            routed = chosen(args[1], module.num_experts)
            kept.append(all(reader.cache.holds((chunk, 0, e), version) for e in routed))

        def after(module, args):  # after it: where the block computes
            homes = [
                (h.buffer.data_ptr(), h.buffer.data_ptr() + h.buffer.numel())
                for h in reader._homes.values()
            ]
            ptrs = [p.data_ptr() for p in module.parameters(recurse=False)]
            at_home.append(all(any(a <= ptr < b for a, b in homes) for ptr in ptrs))

        handles = []
        for name, module in experts.items():
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, a, name=name: before(name, m, a), prepend=True
                )
            )
            handles.append(module.register_forward_pre_hook(after))
        second = compare_generation(engine, reference, STEPS)
        for handle in handles:
            handle.remove()
        for generation in (first, second):
            assert generation.ids_equal and generation.step_diffs == [0.0] * STEPS
        assert at_home == kept and any(at_home) and not all(at_home)
    finally:
        engine.close()


def test_a_failed_read_of_misses_beside_copies_fails_the_request_and_nothing_else(
    moe_models, monkeypatch
):
    """Copying, an install's missed experts are read while its kept ones are copied: a
    read that fails there fails the request (after the copies, before the buffer is
    reused), and the next request is exact."""
    import threading

    from layerstream.engine.expert_reader import ExpertReader

    source, store = moe_models("mixtral")
    engine = _copying_engine(store)
    real = ExpertReader._read_missed
    failed: list[str] = []

    def flaky(self, lease, *args):
        if threading.current_thread().name.startswith("layerstream-misses") and not failed:
            failed.append(lease.info.name)
            raise OSError("connection reset")
        return real(self, lease, *args)

    try:
        reference = reference_model(source)
        compare_generation(engine, reference, STEPS)  # the cache holds what it routed to
        monkeypatch.setattr(ExpertReader, "_read_missed", flaky)
        with pytest.raises(OSError, match="connection reset"), engine.request():
            engine.model.generate(
                torch.tensor([PROMPT[::-1]]),
                max_new_tokens=STEPS,
                do_sample=False,
                pad_token_id=0,
            )
        assert failed, "no install read misses beside copies"
        generation = compare_generation(engine, reference, STEPS)
        assert generation.ids_equal and generation.step_diffs == [0.0] * STEPS
    finally:
        engine.close()


def test_requests_together_on_installs_that_moved_home_get_their_solo_outputs(
    moe_models, monkeypatch
):
    """Blocks computing in buffers, every base pinned, half the experts kept: requests at
    once share each install; an install whose first request's experts all lie kept moves
    to its home, and back to its buffer (never reading into the home) when a request after
    it routes to an expert it lacks. Each output equals the same request run alone."""
    from test_experts import assert_together_as_solo

    from layerstream.engine.expert_reader import ExpertLease, ExpertReader

    moved, back, read_home = [], [], []
    real_move, real_back = ExpertLease._move_home, ExpertLease._move_back
    real_read = ExpertReader._read_in_place

    def move(self, group, experts):
        real_move(self, group, experts)
        moved.append(self.in_place)

    def move_back(self):
        real_back(self)
        back.append(self.in_place)

    def read(self, lease, *args):
        read_home.append(lease)
        return real_read(self, lease, *args)

    monkeypatch.setattr(ExpertLease, "_move_home", move)
    monkeypatch.setattr(ExpertLease, "_move_back", move_back)
    monkeypatch.setattr(ExpertReader, "_read_in_place", read)
    _, store = moe_models("qwen3_moe")
    engine = _copying_engine(store, compute_slots=2)
    try:
        prompts = [PROMPT, PROMPT[::-1], PROMPT[2:], PROMPT[::2]]
        for _ in range(2):  # the second time, with what the first kept
            assert_together_as_solo(engine, prompts)
        assert any(moved) and back and not any(back) and not read_home
    finally:
        engine.close()


def test_a_move_home_whose_bind_fails_fails_that_request_alone(moe_models, monkeypatch):
    """Binding an install's home views fails once: the request that moved it fails, the
    install stays in its buffer as it was bound, and the requests riding it with that one
    finish with their solo outputs."""
    from test_experts import greedy, together

    from layerstream.engine.expert_reader import ExpertLease

    failed: list[int] = []
    real_move = ExpertLease._move_home

    def move(self, group, experts):
        rebind = self.rebind
        if rebind is not None and not failed:

            def flaky(tensors):
                if not failed:
                    failed.append(self.index)
                    raise RuntimeError("bind failed")
                rebind(tensors)

            self.rebind = flaky
        try:
            real_move(self, group, experts)
        finally:
            self.rebind = rebind

    _, store = moe_models("qwen3_moe")
    engine = _copying_engine(store, compute_slots=2)
    prompts = [PROMPT, PROMPT[::-1], PROMPT[2:], PROMPT[::2]]
    try:
        greedy(engine, PROMPT)  # the cache holds what it routed to
        solo = [greedy(engine, p) for p in prompts]
        monkeypatch.setattr(ExpertLease, "_move_home", move)
        results, errors = together(engine, prompts)
        assert failed and len(errors) <= 1 and all("bind failed" in str(e) for e in errors)
        assert len(results) + len(errors) == len(prompts)
        assert all(results[i] == solo[i] for i in results)
    finally:
        engine.close()
