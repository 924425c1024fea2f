"""Shared sweeps on the engine: requests in flight together share every pass over the
streamed blocks, and each one's output is exactly its output alone."""

from __future__ import annotations

import functools
import gc
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS, SCALED
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import DynamicCache

from layerstream.engine.engine import Engine, EngineOptions
from layerstream.engine.sweeps import ComputeSlots, SweepRecord
from layerstream.errors import ChunkStoreError, RequestCancelled
from layerstream.inference.request import Request
from layerstream.inference.run import RUNNERS
from layerstream.inference.types import FinalEvent, HiddenStateEvent, TokenEvent
from layerstream.stores import LocalStore, ReadResult, open_store
from layerstream.stores.mapping import LocalMapping

WAIT_S = 120.0  # a bound on every wait below, never a timing assertion


def engine_for(model, reader: str = "auto") -> Engine:
    options = EngineOptions(memory_budget="25%", read_ahead=1, reader=reader)
    return Engine(open_store(str(model.store)), options)


def ids(seed: int, n: int) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(3, 300, n)]


class Run:
    """One request on its own thread, its events collected."""

    def __init__(
        self,
        engine: Engine,
        request: Request,
        prompt: list[int],
        on_event: Callable[[Run], None] = lambda run: None,
        cancel_after: int | None = None,
        start_together: threading.Barrier | None = None,
    ):
        self.engine, self.request, self.prompt = engine, request, prompt
        self.events: list = []
        self.final: FinalEvent | None = None
        self.error: BaseException | None = None
        self.on_event = on_event
        self.cancel_after = cancel_after
        self.start_together = start_together
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _emit(self, event: object) -> None:
        self.events.append(event)
        self.on_event(self)

    def _cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.events) >= self.cancel_after

    def _run(self) -> None:
        runner = RUNNERS[self.request.mode]
        if self.start_together is not None:
            self.start_together.wait(WAIT_S)
        try:
            self.final = runner(self.engine, self.request, self.prompt, self._emit, self._cancelled)
        except BaseException as exc:  # handed to the test
            self.error = exc

    def start(self) -> Run:
        self.thread.start()
        return self

    def join(self) -> Run:
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "a request did not finish"
        return self


def solo(engine: Engine, request: Request, prompt: list[int]) -> Run:
    run = Run(engine, request, prompt).start().join()
    assert run.error is None, run.error
    return run


def assert_same_output(mine: Run, alone: Run) -> None:
    assert mine.error is None, mine.error
    assert len(mine.events) == len(alone.events)
    for a, b in zip(mine.events, alone.events, strict=True):
        assert type(a) is type(b)
        if isinstance(a, HiddenStateEvent):
            assert a.layer == b.layer
            assert np.array_equal(a.hidden_state, b.hidden_state)
        else:
            assert isinstance(a, TokenEvent)
            assert a == b
    assert mine.final is not None and alone.final is not None
    assert mine.final.finish_reason == alone.final.finish_reason
    assert mine.final.text == alone.final.text
    if alone.final.embedding is None:
        assert mine.final.embedding is None
    else:
        assert np.array_equal(mine.final.embedding, alone.final.embedding)


def shared(run: Run) -> bool:
    """Whether some sweep it rode carried another sequence too."""
    stats = run.final.stats
    return stats.sweeps > 0 and stats.sweep_sequences > stats.sweeps


MIXED = [
    (Request(mode="tokens", max_new_tokens=12, do_sample=False), ids(1, 8)),
    (
        Request(mode="tokens", max_new_tokens=9, temperature=0.9, top_p=0.9, seed=1234),
        ids(2, 13),
    ),
    (Request(mode="tokens", max_new_tokens=10, top_k=20, do_sample=True, seed=7), ids(3, 5)),
    (Request(mode="tokens", max_new_tokens=14, do_sample=False, stop=["e", "a"]), ids(4, 21)),
    (Request(mode="hidden_states", layers=[0, 1, 2, 3, 4]), ids(5, 11)),
    (Request(mode="embedding", pooling="last"), ids(6, 17)),
]


@pytest.mark.parametrize("reader", ["mmap", "read"])
def test_mixed_requests_in_flight_together_each_equal_alone(model_factory, reader):
    """Greedy, seeded top-p and top-k sampling, a stop string, hidden states and an
    embedding, with different prompt lengths, all at once: each gets its solo output, and
    the streamed blocks were shared."""
    engine = engine_for(model_factory("llama", weight_scale=SCALED), reader)
    try:
        assert engine.plan.streamed, "the test needs streamed blocks"
        alone = [solo(engine, request, prompt) for request, prompt in MIXED]
        for _ in range(2):
            together = threading.Barrier(len(MIXED))
            runs = [
                Run(engine, request, prompt, start_together=together).start()
                for request, prompt in MIXED
            ]
            for run, reference in zip(runs, alone, strict=True):
                assert_same_output(run.join(), reference)
            assert any(shared(run) for run in runs)
        assert engine.sweeps.members == 0
    finally:
        engine.close()


def test_a_request_joins_one_in_mid_generation(model_factory):
    """The second request starts while the first is generating: it rides the next sweep,
    both outputs stay exact, and they shared sweeps."""
    engine = engine_for(model_factory("llama", weight_scale=SCALED))
    try:
        first_req = Request(mode="tokens", max_new_tokens=24, do_sample=False)
        second_req = Request(mode="tokens", max_new_tokens=6, temperature=0.7, seed=99)
        first_alone = solo(engine, first_req, ids(10, 9))
        second_alone = solo(engine, second_req, ids(11, 14))
        started = threading.Event()
        second = Run(engine, second_req, ids(11, 14))

        def after_five(run: Run) -> None:
            if len(run.events) == 5 and not started.is_set():
                started.set()
                second.start()

        first = Run(engine, first_req, ids(10, 9), on_event=after_five).start()
        first.join()
        assert started.is_set()
        second.join()
        assert_same_output(first, first_alone)
        assert_same_output(second, second_alone)
        assert shared(second) and shared(first)
        # the second joined 5 tokens in: the first rode sweeps alone before that
        assert first.final.stats.sweeps > second.final.stats.sweeps
    finally:
        engine.close()


def test_a_request_cancelled_mid_sweep_leaves_the_others_exact(model_factory):
    """One of three stops after three tokens (its consumer went away): it raises
    RequestCancelled, the other two finish with their solo outputs, and nothing of the
    cancelled one stays behind (its KV cache is freed, the sweep group is empty)."""
    engine = engine_for(model_factory("llama", weight_scale=SCALED))
    try:
        plan = [
            (Request(mode="tokens", max_new_tokens=16, do_sample=False), ids(20, 10)),
            (Request(mode="tokens", max_new_tokens=16, do_sample=False), ids(21, 12)),
            (Request(mode="tokens", max_new_tokens=12, temperature=0.8, seed=5), ids(22, 7)),
        ]
        alone = [solo(engine, request, prompt) for request, prompt in plan]
        runs = [
            Run(engine, request, prompt, cancel_after=3 if k == 1 else None)
            for k, (request, prompt) in enumerate(plan)
        ]
        for run in runs:
            run.start()
        for run in runs:
            run.join()
        assert isinstance(runs[1].error, RequestCancelled)
        assert len(runs[1].events) == 3
        assert_same_output(runs[0], alone[0])
        assert_same_output(runs[2], alone[2])
        assert engine.sweeps.members == 0
        runs[1] = None  # the test's own reference to its events
        gc.collect()
        assert not [o for o in gc.get_objects() if type(o) is DynamicCache]
    finally:
        engine.close()


def test_encoder_hidden_states_under_concurrency(model_factory):
    """BERT: four hidden-state requests and an embedding at once, each equal to alone."""
    engine = engine_for(model_factory("bert"))
    try:
        n = len(engine.prefixes)
        plan = [
            (Request(mode="hidden_states", layers=list(range(n + 1))), ids(30 + k, 6 + 3 * k))
            for k in range(4)
        ]
        plan.append((Request(mode="embedding", pooling="cls"), ids(40, 9)))
        alone = [solo(engine, request, prompt) for request, prompt in plan]
        runs = [Run(engine, request, prompt).start() for request, prompt in plan]
        for run, reference in zip(runs, alone, strict=True):
            assert_same_output(run.join(), reference)
    finally:
        engine.close()


def test_compute_slots_are_handed_over_in_arrival_order():
    """A thread that gives its slot up and asks again goes behind the ones waiting."""
    slots = ComputeSlots(1)
    order: list[str] = []
    slots.acquire()
    waiting = [threading.Event() for _ in range(2)]

    def worker(name: str, ready: threading.Event) -> None:
        ready.set()
        slots.acquire()
        order.append(name)
        slots.release()

    threads = []
    for name, ready in zip("ab", waiting, strict=True):
        thread = threading.Thread(target=worker, args=(name, ready))
        thread.start()
        threads.append(thread)
        ready.wait(WAIT_S)
        for _ in range(100_000):  # until it is queued (bounded)
            if len(slots._queue) == len(threads):
                break
            threading.Event().wait(0.001)
    slots.pass_on()  # the holder lets both go first
    order.append("holder")
    slots.release()
    for thread in threads:
        thread.join(WAIT_S)
    assert order == ["a", "b", "holder"]


def test_a_short_request_behind_a_long_one_needs_only_its_own_sweeps(model_factory):
    """A 100-token request is generating when a 4-token one arrives: the short one finishes
    in 4 sweeps (its prefill rides the first), long before the long one ends; the long one
    is not held up for it either (it rides every sweep)."""
    engine = engine_for(model_factory("llama", weight_scale=SCALED))
    try:
        long_req = Request(mode="tokens", max_new_tokens=100, do_sample=True, seed=1)
        short_req = Request(mode="tokens", max_new_tokens=4, do_sample=False)
        short = Run(engine, short_req, ids(51, 10))
        long_events_when_short_ended: list[int] = []

        def start_short(run: Run) -> None:
            if len(run.events) == 3:
                short.start()

        long = Run(engine, long_req, ids(50, 12), on_event=start_short)
        short.on_event = lambda run: (
            long_events_when_short_ended.append(len(long.events)) if len(run.events) == 4 else None
        )
        long.start().join()
        short.join()
        assert long.error is None and short.error is None
        assert len(long.events) == 100, "the long request must not stop early for this test"
        assert short.final.stats.tokens == 4
        assert short.final.stats.sweeps == 4  # never waited a sweep it did not ride
        assert long_events_when_short_ended and long_events_when_short_ended[0] < 20
        assert long.final.stats.sweeps == 100  # one sweep per token, shared or not
    finally:
        engine.close()


def test_a_block_that_cannot_be_read_fails_every_request_waiting_for_it(model_factory):
    """The store fails on a streamed block while three requests ride the sweeps: each of
    them gets that error (its own copy), nothing is left installed or counted, and once the
    store is back the next requests are exact."""
    engine = engine_for(model_factory("llama", weight_scale=SCALED))
    try:
        plan = [
            (Request(mode="tokens", max_new_tokens=8, do_sample=False), ids(60 + k, 9 + k))
            for k in range(3)
        ]
        alone = [solo(engine, request, prompt) for request, prompt in plan]
        failing = engine.plan.streamed[len(engine.plan.streamed) // 2]
        acquire = engine.streamer.acquire
        armed = threading.Event()

        def flaky(j: int):
            if j == failing and armed.is_set():
                raise ChunkStoreError(f"block {j}: the store is down")
            return acquire(j)

        engine.streamer.acquire = flaky
        together = threading.Barrier(len(plan))
        runs = [Run(engine, r, p, start_together=together) for r, p in plan]

        def arm_once_all_ride(run: Run) -> None:
            if len(run.events) == 2:
                armed.set()

        runs[0].on_event = arm_once_all_ride
        for run in runs:
            run.start()
        for run in runs:
            run.join()
        armed.clear()
        errors = [run.error for run in runs]
        assert all(isinstance(e, ChunkStoreError) for e in errors), errors
        assert len({id(e) for e in errors}) == len(errors)  # one object each
        assert engine.sweeps.members == 0
        for (request, prompt), reference in zip(plan, alone, strict=True):
            assert_same_output(solo(engine, request, prompt), reference)
    finally:
        engine.close()


def test_a_failing_sweep_report_does_not_break_the_requests(model_factory):
    engine = engine_for(model_factory("llama", weight_scale=SCALED))
    try:
        request, prompt = Request(mode="tokens", max_new_tokens=6, do_sample=False), ids(70, 9)
        alone = solo(engine, request, prompt)

        def broken(record):
            raise ValueError("a bug in the metrics")

        engine.sweeps.on_sweep = broken
        runs = [Run(engine, request, prompt).start() for _ in range(2)]
        for run in runs:
            assert_same_output(run.join(), alone)
    finally:
        engine.close()


def test_hidden_state_requests_leave_no_hooks_behind(model_factory):
    """The hidden-state taps are registered once per module and kept: requests only watch
    them, so no request changes a module's hooks while another one runs it."""
    engine = engine_for(model_factory("llama"))
    try:
        request = Request(mode="hidden_states", layers=[0, 3, 12])

        def hooks() -> int:
            return sum(
                len(m._forward_hooks) + len(m._forward_pre_hooks) for m in engine.model.modules()
            )

        solo(engine, request, ids(80, 7))
        after_first = hooks()
        runs = [Run(engine, request, ids(81 + k, 7)).start() for k in range(3)]
        for run in runs:
            assert run.join().error is None
        assert hooks() == after_first
    finally:
        engine.close()


def test_dynamic_rotary_frequencies_keep_requests_one_at_a_time():
    """transformers' dynamic RoPE rewrites its frequencies from the longest sequence seen:
    such a model is flagged, and the runtime serves it one request at a time."""
    from transformers import AutoConfig

    from layerstream.engine.skeleton import build_skeleton, shared_state

    fields = dict(CONFIGS["llama"])
    plain = AutoConfig.for_model(fields.pop("model_type"), **fields)
    assert shared_state(build_skeleton(plain, "LlamaForCausalLM", "float32")) is None
    dynamic = AutoConfig.for_model(
        "llama",
        **{**fields, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
    )
    reason = shared_state(build_skeleton(dynamic, "LlamaForCausalLM", "float32"))
    assert reason is not None and "dynamic" in reason


# -- a read that fails, then succeeds ------------------------------------------------------------


class FlakyStore(LocalStore):
    """A local store whose next reads of a chunk file fail, as a disk or a mount that has a
    moment's trouble: to the engine a real store (nothing of the engine is replaced). Counts
    every read of each file (``read_into`` for the read reader, ``map`` for the mmap one)."""

    def __init__(self, root: Path):
        super().__init__(root)
        self._lock = threading.Lock()
        self._failing: dict[str, int] = {}
        self.reads: Counter[str] = Counter()
        self.failed = threading.Event()  # a read failed (on whichever thread read)

    def fail_next(self, name: str, times: int = 1) -> None:
        with self._lock:
            self._failing[name] = times

    def _attempt(self, name: str) -> None:
        with self._lock:
            self.reads[name] += 1
            left = self._failing.get(name, 0)
            if left:
                self._failing[name] = left - 1
                self.failed.set()
                raise ChunkStoreError(f"{name}: input/output error (a read that fails once)")

    def read_into(self, name: str, buffer: memoryview, size: int | None = None) -> ReadResult:
        self._attempt(name)
        return super().read_into(name, buffer, size)

    def map(self, name: str) -> LocalMapping:
        self._attempt(name)
        return super().map(name)


def block_file(engine: Engine, j: int) -> str:
    return engine.manifest.chunks[engine.manifest.blocks[j].chunk].file


@pytest.mark.parametrize("reader", ["read", "mmap"])
@pytest.mark.parametrize("where", ["first", "middle"])
def test_a_failed_read_fails_its_waiters_and_the_next_request_reads_afresh(
    model_factory, reader: str, where: str
) -> None:
    """One read of a streamed block fails (the store is good again at once). Both requests
    that were waiting for that read get its error (each its own copy); a request that
    arrives right after (it joins while they are still in flight, so the failed install is
    the last one) reads the block afresh instead of being handed the stale error, and its
    output is exact. ``first``: the first streamed block, which the newcomer reaches just
    after the failure (the failed install is still the installed one); ``middle``: a later
    block, whose failed read was a read-ahead with the read reader."""
    model = model_factory("llama")
    store = FlakyStore(model.store)
    options = EngineOptions(memory_budget="25%", read_ahead=1, reader=reader, compute_slots=3)
    engine = Engine(store, options)
    handles: list[RemovableHandle] = []
    try:
        streamed = engine.plan.streamed
        assert len(streamed) >= 3, "the test needs streamed blocks"
        failing = streamed[0] if where == "first" else streamed[len(streamed) // 2]
        name = block_file(engine, failing)
        store.fail_next(name)
        request = Request(mode="hidden_states", layers=list(range(len(engine.prefixes) + 1)))
        prompt = ids(90, 9)
        together = threading.Barrier(2)
        failed = [threading.Event() for _ in range(2)]
        newcomer_joined = threading.Event()
        errors: list[BaseException | None] = [None, None]

        def waiting_for_the_failing_read(k: int) -> None:
            """A request in flight with the other one: both wait for the read that fails;
            it ends (leaves) only once the newcomer has joined."""
            try:
                with engine.request():
                    together.wait(WAIT_S)  # both are members before any block is installed
                    try:
                        tensor = torch.tensor([prompt])
                        engine.model.base_model(input_ids=tensor)
                    finally:
                        failed[k].set()
                        newcomer_joined.wait(WAIT_S)
            except BaseException as exc:  # handed to the test
                errors[k] = exc

        threads = [
            threading.Thread(target=waiting_for_the_failing_read, args=(k,), daemon=True)
            for k in range(2)
        ]
        for thread in threads:
            thread.start()
        for event in failed:
            assert event.wait(WAIT_S)
        newcomer = Run(engine, request, prompt)
        reads_when_it_ran: list[int] = []

        def joined(module: nn.Module, args: tuple) -> None:
            if threading.current_thread() is newcomer.thread:
                newcomer_joined.set()

        def runs_the_block(module: nn.Module, args: tuple) -> None:
            if threading.current_thread() is newcomer.thread:
                reads_when_it_ran.append(store.reads[name])

        embeddings = engine.model.get_input_embeddings()
        handles.append(embeddings.register_forward_pre_hook(joined))
        block = engine.model.get_submodule(engine.prefixes[failing])
        handles.append(block.register_forward_pre_hook(runs_the_block))
        newcomer.start().join()
        for thread in threads:
            thread.join(WAIT_S)
            assert not thread.is_alive()
        assert all(isinstance(e, ChunkStoreError) for e in errors), errors
        assert all("a read that fails once" in str(e) for e in errors), errors
        assert errors[0] is not errors[1]
        assert newcomer.error is None, newcomer.error
        # the failed read, then the newcomer's own
        assert reads_when_it_ran == [2]
        assert engine.sweeps.members == 0
        for handle in handles:
            handle.remove()
        handles.clear()
        assert_same_output(newcomer, solo(engine, request, prompt))
    finally:
        for handle in handles:
            handle.remove()
        engine.close()


def test_a_read_ahead_that_failed_after_its_requests_left_is_read_again(model_factory) -> None:
    """A request reads the first streamed block ahead, at its last block, for whoever comes
    next; that read fails (the store is good again at once), maybe after the request has
    left. The next request arrives afterwards: it was waiting for no read, so it reads the
    block afresh and succeeds instead of being handed the read-ahead's stale error."""
    model = model_factory("llama")
    store = FlakyStore(model.store)
    engine = Engine(store, EngineOptions(memory_budget="25%", read_ahead=1, reader="read"))
    handles: list[RemovableHandle] = []
    try:
        first_block = engine.plan.streamed[0]
        name = block_file(engine, first_block)
        request = Request(mode="hidden_states", layers=list(range(len(engine.prefixes) + 1)))
        prompt = ids(95, 8)
        reference = solo(engine, request, prompt)
        before = Run(engine, request, prompt)
        after = Run(engine, request, prompt)
        reads_at_arm: list[int] = []
        reads_when_it_ran: list[int] = []

        def runs_the_block(module: nn.Module, args: tuple) -> None:
            me = threading.current_thread()
            if me is before.thread and not reads_at_arm:
                # its own block 0 is installed: every earlier read of it is done, so the
                # next one is made ahead, at its last block, and fails
                reads_at_arm.append(store.reads[name])
                store.fail_next(name)
            elif me is after.thread:
                reads_when_it_ran.append(store.reads[name])

        block = engine.model.get_submodule(engine.prefixes[first_block])
        handles.append(block.register_forward_pre_hook(runs_the_block))
        assert_same_output(before.start().join(), reference)
        assert store.failed.wait(WAIT_S)
        assert engine.sweeps.members == 0
        assert_same_output(after.start().join(), reference)
        # the read that failed, then its own fresh one
        assert reads_when_it_ran == [reads_at_arm[0] + 2]
    finally:
        for handle in handles:
            handle.remove()
        engine.close()


# -- the order of a sweep ------------------------------------------------------------------------


def test_a_sweep_goes_forward_when_requests_join_it_midway(model_factory) -> None:
    """A request is half-way through a sweep when two others join (they wait at the first
    streamed block) and a third joins and is cancelled at once (it leaves): the blocks
    after the half-way one are installed next, in order, to the end of the sweep; only then
    does a new sweep begin at the first block, for the two that joined. The one in flight
    rode one sweep, the two newcomers one other (shared)."""
    engine = Engine(
        open_store(str(model_factory("llama").store)),
        EngineOptions(memory_budget="25%", read_ahead=1, compute_slots=4),
    )
    records: list[SweepRecord] = []
    engine.sweeps.on_sweep = records.append
    handles: list[RemovableHandle] = []
    try:
        streamed = engine.plan.streamed
        assert len(streamed) >= 3, "the test needs streamed blocks"
        halfway = streamed[len(streamed) // 2]
        request = Request(mode="hidden_states", layers=[0])
        first = Run(engine, request, ids(91, 8))
        joiners = [Run(engine, request, ids(92 + k, 6 + k)) for k in range(2)]
        leaver = Run(engine, request, ids(94, 7), cancel_after=1)  # at its first block
        names = {first.thread: "first", joiners[0].thread: "joiner", joiners[1].thread: "joiner"}
        joined = [threading.Event() for _ in joiners]
        halfway_reached = threading.Event()
        ran: list[tuple[str, int]] = []  # who ran which streamed block, in order
        lock = threading.Lock()

        def on_embeddings(module: nn.Module, args: tuple) -> None:
            for joiner, event in zip(joiners, joined, strict=True):
                if threading.current_thread() is joiner.thread:
                    event.set()

        def on_block(j: int, module: nn.Module, args: tuple) -> None:
            """Runs after the engine's own hook: block j is installed for this thread."""
            me = threading.current_thread()
            with lock:
                ran.append((names.get(me, "other"), j))
            if me is first.thread and j == halfway and not halfway_reached.is_set():
                halfway_reached.set()
                for joiner in joiners:
                    joiner.start()
                leaver.start()
                for event in joined:
                    assert event.wait(WAIT_S)
                leaver.join()  # it has left the sweeps

        embeddings = engine.model.get_input_embeddings()
        handles.append(embeddings.register_forward_pre_hook(on_embeddings))
        for j in streamed:
            block = engine.model.get_submodule(engine.prefixes[j])
            handles.append(block.register_forward_pre_hook(functools.partial(on_block, j)))
        first.start().join()
        for joiner in joiners:
            joiner.join()
        assert first.error is None and all(j.error is None for j in joiners)
        assert isinstance(leaver.error, RequestCancelled)
        sweep = list(streamed)
        installs = [j for k, (_, j) in enumerate(ran) if k == 0 or ran[k - 1][1] != j]
        assert installs == sweep + sweep
        assert [j for who, j in ran if who == "first"] == sweep
        assert ran[: len(sweep)] == [("first", j) for j in sweep]
        assert first.final.stats.sweeps == 1
        assert [j.final.stats.sweeps for j in joiners] == [1, 1]
        assert [j.final.stats.sweep_sequences for j in joiners] == [2, 2]
        assert [r.sequences for r in records] == [1, 2]
    finally:
        for handle in handles:
            handle.remove()
        engine.close()
