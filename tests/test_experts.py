"""Expert streaming: a mixture-of-experts block reads its base, then only its routed experts.

Every test here poisons the expert slices that were not read (NaN bytes), so an output equal
to from_pretrained's proves an unread expert is never used, whatever the experts
implementation transformers runs.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from architectures import (
    ARCHITECTURES,
    PROMPT,
    build,
    compare_generation,
    compare_hidden_states,
    reference_model,
)
from remote_servers import StaticServer
from test_architectures import streaming_budget

from layerstream.engine.engine import Engine, EngineOptions
from layerstream.engine.experts import chosen
from layerstream.errors import ChunkIntegrityError, ManifestError, SettingsError
from layerstream.format.manifest import Manifest
from layerstream.format.parts import chunk_parts
from layerstream.format.safetensors import parse_layout
from layerstream.stores import open_store
from layerstream.stores.http import HTTPStore
from layerstream.stores.ranged import StoreOptions

STEPS = 6
IMPLEMENTATIONS = ["eager", "grouped_mm", "batched_mm"]


# the rows whose configs route tokens to experts, in transformers' experts modules (JetMoE's
# experts are a module of its own, which transformers' experts implementations do not wrap:
# its blocks stream whole)
MOE = [
    name
    for name, config in ARCHITECTURES.items()
    if any("expert" in k for k in config) and name != "jetmoe"
]


def expert_engine(
    store: Path | str, budget: str | int, store_options: StoreOptions | None = None, **options
) -> Engine:
    options = {
        "read_ahead": 1,
        "poison_unread_experts": True,
        "expert_streaming": "on",
        **options,
    }
    return Engine(
        open_store(str(store), options=store_options),
        EngineOptions(memory_budget=budget, **options),
    )


def test_the_moe_rows_cover_the_released_layouts():
    assert set(MOE) >= {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "olmoe"}


def test_the_experts_chosen_are_each_named_once_in_order_without_sentinels():
    """Indices of a prefill (every token's choice) name each expert once; expert-parallel
    sentinels (the expert count and above) compute nothing and are read for nobody."""
    index = torch.tensor([[5, 1], [1, 7], [8, 5], [0, 12]])
    assert chosen(index, 8) == [0, 1, 5, 7]
    assert chosen(torch.tensor([3]), 8) == [3]
    assert chosen(torch.empty(0, 2, dtype=torch.long), 8) == []


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", MOE)
def test_routed_experts_only_and_exact(moe_models, name, impl):
    """Greedy ids, every step's logits and every hidden state equal from_pretrained's under
    the same experts implementation, with the unread experts NaN; fewer experts were read
    than whole-block streaming would."""
    source, store = moe_models(name)
    reference = reference_model(source)
    reference.set_experts_implementation(impl)
    engine = expert_engine(store, streaming_budget(store))
    try:
        engine.model.set_experts_implementation(impl)
        assert engine.parts, "the MoE blocks must stream as base + experts"
        generation = compare_generation(engine, reference, STEPS)
        assert generation.ids_equal
        assert generation.step_diffs == [0.0] * STEPS
        hidden = compare_hidden_states(engine, reference)
        assert hidden.diffs == [0.0] * hidden.expected
        stats = engine.streamer.stats
        installs_of_experts = sum(
            len(parts.groups) * parts.groups[0].count for parts in engine.parts.values()
        ) * (stats.streamed_runs // len(engine.plan.streamed))
        assert 0 < stats.experts_read < installs_of_experts
    finally:
        engine.close()


def _bases_budget(store: Path, pinned: int, buffers: int = 2) -> int:
    """Room for the non-block weights, the streaming buffers and ``pinned`` blocks' bases."""
    manifest, name, path = _chunk_of(store, 1)
    info = manifest.chunks[name]
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    base = chunk_parts(info, parse_layout(info, data)).base_bytes  # the same for every block
    return manifest.rest_bytes + buffers * max(manifest.block_bytes) + pinned * base


@pytest.mark.parametrize("pinned", [3, 8])
def test_bytes_read_are_the_bases_and_the_routed_experts(moe_models, pinned):
    """The bases of the first blocks that fit are pinned (all eight, or three); every install
    of another block reads its base once, and each routed expert once; the store reads
    nothing else (per-expert sizes from the chunk's own header)."""
    _, store = moe_models("olmoe")
    engine = expert_engine(
        store, _bases_budget(store, pinned, buffers=1), read_ahead=0, expert_prefetch=False
    )
    try:
        engine.wait_pinned()  # the steady state (engine/fill.py)
        plan = engine.plan
        assert sorted(plan.pinned_bases) == list(range(pinned)) and not plan.resident
        before = engine.streamer.stats.snapshot()
        with engine.request() as ctx:
            engine.model.generate(
                torch.tensor([PROMPT]), max_new_tokens=4, do_sample=False, pad_token_id=0
            )
        stats = engine.streamer.stats.since(before)
        (expert_size,) = {
            p.expert_bytes(g, e)
            for p in engine.parts.values()
            for g in range(len(p.groups))
            for e in range(p.groups[g].count)
        }
        (base,) = {p.base_bytes for p in engine.parts.values()}
        assert stats.expert_bytes == stats.experts_read * expert_size
        passes = stats.streamed_runs // len(plan.streamed)
        assert stats.chunks_read == passes * (len(plan.streamed) - pinned)
        assert stats.bytes_read == stats.chunks_read * base + stats.expert_bytes
        # a prompt pass may route to every expert; each decode step to top-2 per token
        assert ctx.stats.experts_routed >= stats.experts_read
    finally:
        engine.close()


def test_concurrent_requests_share_each_install_and_stay_exact(moe_models):
    """Requests riding one sweep share each expert read; each output is its solo output."""
    _, store = moe_models("qwen3_moe")
    engine = expert_engine(store, streaming_budget(store), compute_slots=2)
    try:
        assert_together_as_solo(engine, [PROMPT, PROMPT[::-1], PROMPT[2:]])
    finally:
        engine.close()


def greedy(engine: Engine, prompt: list[int]) -> list[int]:
    """The ids of a greedy generation of STEPS tokens after ``prompt``."""
    with engine.request():
        out = engine.model.generate(
            torch.tensor([prompt]), max_new_tokens=STEPS, do_sample=False, pad_token_id=0
        )
    return out[0].tolist()


def together(
    engine: Engine, prompts: list[list[int]]
) -> tuple[dict[int, list[int]], list[BaseException]]:
    """Greedy generations of ``prompts`` started at once: the ids of each that finished, by
    index, and the errors of the others."""
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(prompts))

    def worker(i: int) -> None:
        try:
            start.wait(timeout=60)
            results[i] = greedy(engine, prompts[i])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results, errors


def assert_together_as_solo(engine: Engine, prompts: list[list[int]]) -> None:
    """Greedy generations of ``prompts`` run at once equal each one run alone."""
    solo = [greedy(engine, p) for p in prompts]
    results, errors = together(engine, prompts)
    assert not errors
    assert [results[i] for i in range(len(prompts))] == solo


def test_an_expert_is_read_once_per_install_whoever_asks(moe_models):
    """Two threads asking one lease for overlapping experts at once: each expert's bytes
    are read once (counted in the store's ranged reads)."""
    _, store = moe_models("olmoe")
    engine = expert_engine(store, streaming_budget(store), read_ahead=0)
    try:
        j = engine.plan.streamed[-1]
        reads: list[list[tuple[int, int]]] = []
        real = engine.store.read_ranges

        def counted(name, buffer, ranges, size, **options):
            reads.append(list(ranges))
            return real(name, buffer, ranges, size, **options)

        engine.store.read_ranges = counted  # type: ignore[method-assign]
        lease = engine.streamer.acquire(j)
        try:
            reads.clear()
            barrier = threading.Barrier(2)

            def ask(experts: list[int]) -> None:
                barrier.wait(timeout=30)
                lease.ensure(0, experts)

            threads = [threading.Thread(target=ask, args=(x,)) for x in ([0, 1, 2], [2, 3, 1])]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            parts = lease.parts
            wanted = sorted(r for e in range(4) for r in parts.experts[0][e])
            got = sorted(r for ranges in reads for r in ranges)
            covered = sum(n for _, n in got)
            assert covered == sum(n for _, n in wanted)  # nothing twice, nothing missing
        finally:
            lease.release()
    finally:
        engine.close()


def test_over_http_the_experts_arrive_as_ranged_gets(moe_models):
    source, store = moe_models("mixtral")
    server = StaticServer(store).start()
    try:
        reference = reference_model(source)
        engine = Engine(
            HTTPStore(server.url, StoreOptions(part_bytes=64 << 10)),
            EngineOptions(
                memory_budget=streaming_budget(store), read_ahead=1, poison_unread_experts=True
            ),
        )
        try:
            generation = compare_generation(engine, reference, STEPS)
            assert generation.ids_equal and generation.step_diffs == [0.0] * STEPS
            assert engine.streamer.stats.experts_read > 0
        finally:
            engine.close()
    finally:
        server.stop()


def _chunk_of(store: Path, block: int) -> tuple[Manifest, str, Path]:
    manifest = Manifest.from_json((store / "manifest.json").read_text())
    info = manifest.chunks[manifest.blocks[block].chunk]
    return manifest, info.name, store / info.file


def _damage(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["pinned base", "base", "expert"])
def test_a_damaged_part_is_an_error_naming_it(tmp_path, where):
    """A damaged base of a block whose base is pinned fails the load; of one read per
    install (only three bases fit), and a damaged expert, fail the request that reads it."""
    source, store = build("olmoe", tmp_path)
    manifest, name, path = _chunk_of(store, 5)
    info = manifest.chunks[name]
    layout = parse_layout(info, torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8))
    parts = chunk_parts(info, layout)
    if where != "expert":  # a byte of a non-expert tensor (or padding), past the header
        data_start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
        _damage(path, next(max(o, data_start) for o, n in parts.base if o + n > data_start))
    else:  # every expert's first byte: whichever is routed is found
        for e in range(parts.groups[0].count):
            _damage(path, parts.experts[0][e][0][0])
    if where == "pinned base":  # pinned at load: the load fails
        with pytest.raises(ChunkIntegrityError, match=r"block_0005.*its base"):
            expert_engine(
                store, streaming_budget(store), verify_in_background=False, pin_in_background=False
            )
        # pinned in the background (engine/fill.py): the fill finds it, the model is damaged
        engine = expert_engine(store, streaming_budget(store), verify_in_background=False)
        try:
            with pytest.raises(ChunkIntegrityError, match=r"block_0005.*its base"):
                engine.wait_pinned()
            assert engine.damage is not None and "block_0005" in str(engine.damage)
        finally:
            engine.close()
        return
    engine = expert_engine(store, _bases_budget(store, 3), verify_in_background=False)
    try:
        assert 5 not in engine.plan.pinned_bases
        with pytest.raises(ChunkIntegrityError, match="its base" if where == "base" else "expert"):
            compare_generation(engine, reference_model(source), 2)
    finally:
        engine.close()


def test_expert_streaming_settings(moe_models, model_factory):
    _, store = moe_models("qwen3_moe")
    budget = streaming_budget(store)
    off = expert_engine(store, budget, expert_streaming="off")
    try:
        assert not off.parts
        with off.request():
            off.model(torch.tensor([PROMPT]))
        assert off.streamer.stats.experts_read == 0
    finally:
        off.close()
    with pytest.raises(SettingsError, match="expert_streaming must be one of auto, on, off"):
        expert_engine(store, budget, expert_streaming="yes")
    with pytest.raises(SettingsError, match="reader=mmap maps whole chunks"):
        expert_engine(store, budget, reader="mmap")
    dense = model_factory("llama").store
    with pytest.raises(SettingsError, match="has no experts modules"):
        expert_engine(dense, "25%", expert_streaming="on")


def test_a_store_chunked_before_expert_streaming_streams_whole_blocks(moe_models, tmp_path):
    """A version 1 manifest (no experts listed): exact, blocks streamed whole; "on" refuses."""
    import shutil

    source, store = moe_models("granitemoe")
    old = tmp_path / "old"
    shutil.copytree(store, old)
    data = json.loads((old / "manifest.json").read_text())
    for chunk in data["chunks"].values():
        chunk.pop("experts", None)
    data["format_version"] = 1
    (old / "manifest.json").write_text(json.dumps(data))
    engine = expert_engine(old, streaming_budget(old), expert_streaming="auto")
    try:
        assert not engine.parts
        generation = compare_generation(engine, reference_model(source), 3)
        assert generation.ids_equal and generation.step_diffs == [0.0] * 3
        assert engine.streamer.stats.experts_read == 0
    finally:
        engine.close()
    with pytest.raises(SettingsError, match="chunked without its experts' byte ranges"):
        expert_engine(old, streaming_budget(old), expert_streaming="on")


def test_manifest_experts_round_trip_and_refuse_edits(moe_models):
    _, store = moe_models("qwen3_moe")
    text = (store / "manifest.json").read_text()
    manifest = Manifest.from_json(text)
    assert manifest.format_version == 2 and manifest.has_experts
    assert Manifest.from_json(manifest.to_json()) == manifest
    data = json.loads(text)
    group = next(c for c in data["chunks"].values() if "experts" in c)["experts"]["groups"][0]
    group["sha256"] = group["sha256"][:-1]
    with pytest.raises(ManifestError, match="one sha256 per expert"):
        Manifest.from_json(json.dumps(data))


def test_dense_stores_keep_format_version_1(model_factory):
    data = json.loads((model_factory("llama").store / "manifest.json").read_text())
    assert data["format_version"] == 1
    assert all("experts" not in c for c in data["chunks"].values())


def test_local_expert_reads_split_across_threads_stay_exact(moe_models, monkeypatch):
    """Routed experts of a local store are read as many small reads at once (PIECE bytes
    each, here a few hundred): the bytes land where they belong."""
    from layerstream.engine import expert_reader

    monkeypatch.setattr(expert_reader, "PIECE", 320)
    source, store = moe_models("olmoe")
    engine = expert_engine(store, streaming_budget(store))
    try:
        generation = compare_generation(engine, reference_model(source), STEPS)
        assert generation.ids_equal and generation.step_diffs == [0.0] * STEPS
        assert engine.streamer.stats.experts_read > 0
    finally:
        engine.close()


def test_auto_streams_experts_where_the_page_cache_cannot_hold_the_chunks(moe_models, monkeypatch):
    """Locally, whole blocks mapped from the page cache cost no copy: "auto" streams experts
    only when the cache cannot hold the streamed chunks (and always from remote stores:
    test_over_http_the_experts_arrive_as_ranged_gets)."""
    from layerstream.engine import tuning

    _, store = moe_models("qwen3_moe")
    budget = streaming_budget(store)
    roomy = expert_engine(store, budget, expert_streaming="auto")
    try:
        assert not roomy.evict_after_use and not roomy.parts
    finally:
        roomy.close()
    monkeypatch.setattr(tuning, "memory_limit", lambda: budget)  # a box the size of the budget
    tight = expert_engine(store, budget, expert_streaming="auto")
    try:
        assert tight.evict_after_use and tight.parts
    finally:
        tight.close()


def test_a_damaged_expert_chunk_replaced_by_a_good_one_makes_the_model_whole(tmp_path):
    """The damage a request finds in a part takes the model out of service until a part of
    another version of the file passes: after the chunk is replaced (by rename), the next
    request is exact and the damage is gone; the damaged version itself stays damaged."""
    import os

    source, store = build("deepseek_v3", tmp_path)
    manifest, name, path = _chunk_of(store, 5)
    info = manifest.chunks[name]
    good = path.read_bytes()
    parts = chunk_parts(
        info, parse_layout(info, torch.frombuffer(bytearray(good), dtype=torch.uint8))
    )
    for e in range(parts.groups[0].count):
        _damage(path, parts.experts[0][e][0][0])
    reference = reference_model(source)
    engine = expert_engine(store, streaming_budget(store), verify_in_background=False)
    try:
        with pytest.raises(ChunkIntegrityError, match="expert"):
            compare_generation(engine, reference, 2)
        assert engine.damage is not None
        with pytest.raises(ChunkIntegrityError):  # the same file: still damaged
            compare_generation(engine, reference, 2)
        assert engine.damage is not None
        fixed = path.with_suffix(".tmp")
        fixed.write_bytes(good)
        os.replace(fixed, path)
        generation = compare_generation(engine, reference, 3)
        assert generation.ids_equal and generation.step_diffs == [0.0] * 3
        assert engine.damage is None
    finally:
        engine.close()


def test_with_verify_once_each_part_is_hashed_once_per_version(moe_models, monkeypatch):
    from layerstream.engine import checks

    hashed: list[tuple[str, str]] = []
    real = checks.verify_part

    def counted(info, what, *args):
        hashed.append((info.name, what))
        return real(info, what, *args)

    monkeypatch.setattr(checks, "verify_part", counted)
    _, store = moe_models("olmoe")
    engine = expert_engine(store, streaming_budget(store), verify_in_background=False)
    try:
        engine.wait_pinned()  # the bases' own hashes first (engine/fill.py)
        for _ in range(2):
            with engine.request():
                engine.model.generate(
                    torch.tensor([PROMPT]), max_new_tokens=3, do_sample=False, pad_token_id=0
                )
        assert hashed and len(hashed) == len(set(hashed)) > 0
    finally:
        engine.close()


@pytest.mark.parametrize(
    "edit", ["no groups", "a group twice", "format_version 1", "base as large as the chunk"]
)
def test_manifest_expert_edits_are_refused(moe_models, edit):
    _, store = moe_models("qwen3_moe")
    data = json.loads((store / "manifest.json").read_text())
    chunk = next(c for c in data["chunks"].values() if "experts" in c)
    experts = chunk["experts"]
    if edit == "no groups":
        experts["groups"] = []
    elif edit == "a group twice":
        experts["groups"] = experts["groups"] * 2
    elif edit == "base as large as the chunk":
        experts["base_bytes"] = chunk["bytes"]
    else:
        data["format_version"] = 1
    with pytest.raises(
        ManifestError, match=r"each experts module once|format_version 1|leaving none"
    ):
        Manifest.from_json(json.dumps(data))


def test_a_base_size_the_header_contradicts_fails_the_load(moe_models, tmp_path):
    """The manifest's base size (what `layerstream size` plans with) must be the header's;
    a store chunked before it was recorded has none and loads."""
    import shutil

    _, store = moe_models("olmoe")
    copy = tmp_path / "chunks"
    shutil.copytree(store, copy)
    data = json.loads((copy / "manifest.json").read_text())
    chunks = [c for c in data["chunks"].values() if "experts" in c]
    assert all(c["experts"]["base_bytes"] > 0 for c in chunks)
    for c in chunks:
        del c["experts"]["base_bytes"]
    (copy / "manifest.json").write_text(json.dumps(data))
    expert_engine(copy, streaming_budget(copy)).close()
    chunks[3]["experts"]["base_bytes"] = 4096
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ChunkIntegrityError, match="the manifest says 4096"):
        expert_engine(copy, streaming_budget(copy))


def test_through_the_disk_cache_each_part_is_kept_and_served_again(
    moe_models, tmp_path, monkeypatch
):
    """Over HTTP with a disk cache, every part read (a block's base, each routed expert) is
    kept under its own digest: a second engine on the same cache runs the same request
    exactly with no byte from the origin, the cache's own check standing for the reader's
    (no part hashed twice); after every entry is damaged, a third finds the damage, drops
    the entries and fetches again, still exact."""
    from layerstream.engine import checks

    rehashed: list[str] = []
    real = checks.verify_part

    def counted(info, what, *args):
        rehashed.append(what)
        return real(info, what, *args)

    monkeypatch.setattr(checks, "verify_part", counted)
    source, store = moe_models("olmoe")
    server = StaticServer(store).start()
    options = StoreOptions(cache_dir=str(tmp_path / "cache"), cache_bytes=1 << 30)
    reference = reference_model(source)
    try:
        for run in range(3):
            if run == 2:
                for entry in (tmp_path / "cache").rglob("sha256/*/*"):
                    _damage(entry, 0)
            engine = expert_engine(
                server.url, streaming_budget(store), store_options=options, read_ahead=0
            )
            try:
                before = engine.store.cache.stats.bytes_from_origin
                generation = compare_generation(engine, reference, STEPS)
                assert generation.ids_equal and generation.step_diffs == [0.0] * STEPS
                fetched = engine.store.cache.stats.bytes_from_origin - before
                assert engine.streamer.stats.experts_read > 0
                assert (fetched == 0) if run == 1 else (fetched > 0), (run, fetched)
                assert rehashed == []
                if run == 2:
                    assert engine.store.cache.stats.discarded > 0
            finally:
                engine.close()
    finally:
        server.stop()


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_where_the_page_cache_cannot_hold_the_chunks_parts_are_read_past_it(
    moe_models, monkeypatch, name
):
    """A local store whose chunks the page cache cannot hold is read with O_DIRECT (bytes
    of the file beside each part land in the buffer too): still exact with every unread
    expert NaN, with and without pinned bases."""
    from layerstream.engine import engine as engine_module
    from layerstream.stores.local import LocalStore

    source, store = moe_models(name)
    monkeypatch.setattr(engine_module.tuning, "evict_after_use", lambda manifest, plan: True)
    calls = []
    real = LocalStore._read_ranges_direct

    def counted(self, *args):
        calls.append(args[0])
        return real(self, *args)

    monkeypatch.setattr(LocalStore, "_read_ranges_direct", counted)
    reference = reference_model(source)
    for budget in (streaming_budget(store), _bases_budget(store, 2)):
        engine = expert_engine(store, budget)
        try:
            generation = compare_generation(engine, reference, STEPS)
            assert generation.ids_equal and generation.step_diffs == [0.0] * STEPS
            assert engine.store._direct_ok
        finally:
            engine.close()
    assert calls


def test_the_plan_pins_every_base_before_any_expert(moe_models):
    """Bases of the first blocks that fit; once all fit, the room left is the expert cache
    (no whole block of experts is pinned); never more than the budget."""
    from layerstream.engine.plan import plan_residency

    _, store = moe_models("olmoe")
    manifest = Manifest.from_json((store / "manifest.json").read_text())
    sizes, largest = manifest.block_bytes, max(manifest.block_bytes)
    base = _bases_budget(store, 1) - _bases_budget(store, 0)
    bases = dict.fromkeys(range(len(sizes)), base)
    floor = manifest.rest_bytes + 2 * largest
    for budget, pinned_bases, cache in [
        (floor + 3 * base + base // 2, [0, 1, 2], 0),  # three bases fit, not four
        (floor + 8 * base, list(range(8)), 0),
        # every base, and room for block 0's experts: an expert cache of that size
        (floor + 8 * base + sizes[0] - base, list(range(8)), sizes[0] - base),
    ]:
        plan = plan_residency(manifest, budget, 1, bases)
        assert sorted(plan.pinned_bases) == pinned_bases
        assert not plan.resident and plan.expert_cache == cache
        assert plan.weight_bytes() <= budget
        assert "non-expert parts of" in plan.describe()


def test_a_chunk_replaced_while_its_block_runs_fails_every_request_on_that_install(
    moe_models, tmp_path
):
    """A read that finds another version of the chunk than the install's fails, and so does
    every request that ran the install (confirm): a read past the page cache writes the new
    version's bytes beside its parts, into experts already read."""
    import shutil

    _, store = moe_models("olmoe")
    copy = tmp_path / "chunks"
    shutil.copytree(store, copy)
    engine = expert_engine(copy, streaming_budget(copy), read_ahead=0, expert_prefetch=False)
    try:
        j = engine.plan.streamed[0]
        lease = engine.streamer.acquire(j)
        try:
            lease.ensure(0, [0])
            lease.confirm()  # nothing changed yet
            path = copy / lease.info.file
            shutil.copyfile(path, tmp_path / "new")
            os.replace(tmp_path / "new", path)  # the same bytes, another version
            with pytest.raises(ChunkIntegrityError, match="changed"):
                lease.ensure(0, [1])
            with pytest.raises(ChunkIntegrityError, match="changed while its block ran"):
                lease.confirm()
        finally:
            lease.release()
    finally:
        engine.close()
