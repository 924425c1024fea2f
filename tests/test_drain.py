"""The shutdown drain (serving/shutdown.py): once shutdown begins, waiting requests are
refused, requests in flight go on until the drain is over, then a generation ends with
``finish_reason: shutdown`` after the tokens it sent, and other modes end with an error
naming the shutdown. gRPC streams were cut after MLServer's grace with no final event."""

from __future__ import annotations

import asyncio
import threading

import pytest

from layerstream.engine.engine import Engine, EngineOptions
from layerstream.errors import ShuttingDown
from layerstream.inference.generation import run_generation
from layerstream.inference.hidden import run_hidden_states
from layerstream.inference.request import Request
from layerstream.inference.types import FinalEvent, FinishReason, TokenEvent
from layerstream.serving.scheduler import Scheduler
from layerstream.serving.shutdown import Drain
from layerstream.stores import open_store

WAIT_S = 30  # bound on every wait for an event; reached only when the code under test hangs
IDS = [5, 17, 99, 3, 250, 7, 42, 130]


class Clock:
    """The drain's clock, moved by the test: no test here waits on time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_drain_refuses_what_waits_and_ends_what_runs_once_it_is_over():
    clock = Clock()
    drain = Drain(clock)
    scheduler = Scheduler("m", max_queued=4, max_active=1, drain=drain)
    started, go_on = threading.Event(), threading.Event()
    checks_after_begin = []

    def running(emit, cancelled):
        emit("first")
        started.set()
        assert go_on.wait(WAIT_S)
        # the drain has begun but is not over: the request goes on
        checks_after_begin.append(cancelled())
        emit("second")
        clock.now = 10.0  # the drain is over
        cancelled()  # raises ShuttingDown
        emit("never")

    def queued(emit, cancelled):
        raise AssertionError("a request waiting when shutdown began ran")

    async def main():
        first = scheduler.stream(running)
        seen = [await anext(first)]
        assert await asyncio.to_thread(started.wait, WAIT_S)
        waiting = asyncio.ensure_future(_collect(scheduler.stream(queued)))
        while not scheduler._queue:  # queued behind the running request
            await asyncio.sleep(0)
        drain.begin(5.0)
        with pytest.raises(ShuttingDown, match="retry on another replica"):
            await waiting
        with pytest.raises(ShuttingDown, match="shutting down"):
            await _collect(scheduler.stream(queued))
        go_on.set()
        with pytest.raises(ShuttingDown, match="stopped after 2 events"):
            async for event in first:
                seen.append(event)
        return seen

    try:
        assert asyncio.run(main()) == ["first", "second"]
    finally:
        scheduler.close()
    assert checks_after_begin == [False]


def test_a_scheduler_made_after_shutdown_began_refuses_at_once():
    drain = Drain(Clock())
    drain.begin(5.0)
    scheduler = Scheduler("late", max_queued=4, drain=drain)

    async def main():
        await _collect(scheduler.stream(lambda emit, cancelled: "done"))

    try:
        with pytest.raises(ShuttingDown):
            asyncio.run(main())
    finally:
        scheduler.close()


async def _collect(stream) -> list:
    return [event async for event in stream]


def _stops_after(count: int, events: list):
    """The scheduler's check once the drain is over, after ``count`` tokens were sent."""

    def cancelled() -> bool:
        if len(events) >= count:
            raise ShuttingDown("the server is shutting down")
        return False

    return cancelled


@pytest.mark.parametrize("after", [0, 3])
def test_a_generation_ended_by_the_drain_keeps_its_tokens_and_says_shutdown(model_factory, after):
    model = model_factory("llama")
    engine = Engine(open_store(str(model.store)), EngineOptions("25%", read_ahead=1))
    try:
        request = Request(mode="tokens", max_new_tokens=10, do_sample=False)
        solo: list = []
        run_generation(engine, request, IDS, solo.append, lambda: False)
        events: list = []
        final = run_generation(engine, request, IDS, events.append, _stops_after(after, events))
    finally:
        engine.close()
    assert isinstance(final, FinalEvent) and final.finish_reason is FinishReason.SHUTDOWN
    assert all(isinstance(e, TokenEvent) for e in events)
    assert [e.token_id for e in events] == [e.token_id for e in solo[:after]]
    assert final.stats.tokens == after
    # the text held back (it could have begun a stop string) goes out with the final event
    text = "".join(e.text for e in events) + final.text
    assert text == engine.tokenizer.decode([e.token_id for e in events], skip_special_tokens=True)


def test_a_hidden_states_request_ended_by_the_drain_fails_naming_the_shutdown(model_factory):
    model = model_factory("gpt2")
    engine = Engine(open_store(str(model.store)), EngineOptions("25%", read_ahead=1))
    try:
        request = Request(mode="hidden_states", layers=[0, 1, 2])
        events: list = []
        with pytest.raises(ShuttingDown, match="shutting down"):
            run_hidden_states(engine, request, IDS, events.append, _stops_after(0, events))
    finally:
        engine.close()
