"""The per-model scheduler: one job at a time, events in order, a bounded queue, and jobs
that stop when their consumer leaves or their deadline passes. Every wait here is on an
event; deadlines are either long past or far away, never raced."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from layerstream.errors import InvalidRequest, RequestTimeout, ServerBusy
from layerstream.serving.scheduler import Deadline, Scheduler

WAIT_S = 30  # bound on every wait for an event; reached only when the code under test hangs


def run(coro):
    return asyncio.run(coro)


async def collect(scheduler, job, deadline=None):
    return [e async for e in scheduler.stream(job, deadline)]


async def wait_for_event(event: threading.Event) -> bool:
    """Wait for a thread's event without blocking (or closing) the loop."""
    return await asyncio.to_thread(event.wait, WAIT_S)


def test_events_then_result_and_requests_never_overlap():
    scheduler = Scheduler("m", max_queued=8)
    running = threading.Lock()

    def job_for(tag):
        def job(emit, cancelled):
            assert running.acquire(blocking=False), "two jobs ran at once"
            try:
                for i in range(3):
                    emit((tag, i))
                    time.sleep(0.01)
                return (tag, "done")
            finally:
                running.release()

        return job

    async def main():
        return await asyncio.gather(*(collect(scheduler, job_for(t)) for t in "abc"))

    try:
        results = run(main())
    finally:
        scheduler.close()
    for tag, events in zip("abc", results, strict=True):
        assert events == [(tag, 0), (tag, 1), (tag, 2), (tag, "done")]


def test_job_errors_reach_the_caller_after_earlier_events():
    scheduler = Scheduler("m", max_queued=2)

    def job(emit, cancelled):
        emit("first")
        raise InvalidRequest("bad input")

    async def main():
        seen = []
        with pytest.raises(InvalidRequest, match="bad input"):
            async for e in scheduler.stream(job):
                seen.append(e)
        return seen

    try:
        assert run(main()) == ["first"]
    finally:
        scheduler.close()


def test_consumer_leaving_sets_the_cancel_flag_while_the_loop_runs():
    """The flag must come from the stream being closed, not from the loop going away (a
    closed loop also makes the job's next emit set it): the check runs on the live loop."""
    scheduler = Scheduler("m", max_queued=2)
    saw_cancel, gave_up = threading.Event(), threading.Event()

    def job(emit, cancelled):
        emit(0)
        while not gave_up.is_set():  # no more emits: only the cancel flag can end this early
            if cancelled():
                saw_cancel.set()
                return None
            time.sleep(0.001)
        return None

    async def main():
        stream = scheduler.stream(job)
        assert await stream.__anext__() == 0
        await stream.aclose()  # what MLServer does when the client disconnects
        seen = await wait_for_event(saw_cancel)
        gave_up.set()
        return seen

    try:
        assert run(main()), "the job never saw the cancel flag while the loop was alive"
    finally:
        gave_up.set()
        scheduler.close()


def test_full_queue_is_server_busy():
    scheduler = Scheduler("m", max_queued=1)
    started, release = threading.Event(), threading.Event()

    def slow(emit, cancelled):
        started.set()
        assert release.wait(WAIT_S)
        return "ok"

    async def main():
        first = asyncio.ensure_future(collect(scheduler, slow))
        assert await wait_for_event(started)  # the worker holds the first job
        second = asyncio.ensure_future(collect(scheduler, slow))
        await asyncio.sleep(0)  # the second enters the queue (put_nowait, no await before)
        with pytest.raises(ServerBusy, match="retry later"):
            await collect(scheduler, slow)
        release.set()
        return await first, await second

    try:
        assert run(main()) == (["ok"], ["ok"])
    finally:
        scheduler.close()


# -- deadlines -------------------------------------------------------------------------------


def test_a_running_job_past_its_deadline_is_stopped_by_its_own_check():
    """The job checks before every block (here: every loop); past the deadline the check
    raises RequestTimeout, which ends the job and reaches the consumer after its events."""
    scheduler = Scheduler("m", max_queued=2)
    checks = {"n": 0}

    def job(emit, stop_requested):
        emit("first")
        while True:  # only the deadline can end this
            checks["n"] += 1
            stop_requested()
            time.sleep(0.001)

    async def main():
        seen = []
        with pytest.raises(RequestTimeout) as caught:
            async for event in scheduler.stream(job, Deadline.after(0.05, "a test")):
                seen.append(event)
        return seen, caught.value

    try:
        seen, error = run(main())
    finally:
        scheduler.close()
    assert seen == ["first"]
    assert error.kind == "timeout" and error.status == 504
    assert "deadline of 0.05s from arrival (set by a test)" in error.message
    assert checks["n"] > 0


def test_a_request_whose_deadline_passed_before_its_turn_never_runs():
    scheduler = Scheduler("m", max_queued=2)
    ran = threading.Event()

    def job(emit, stop_requested):
        ran.set()
        return "ran"

    async def main():
        with pytest.raises(RequestTimeout, match="deadline of 1s"):
            await collect(scheduler, job, Deadline(time.monotonic() - 1, 1.0, "a test"))

    try:
        run(main())
        assert run(collect(scheduler, lambda emit, stop: "next")) == ["next"]  # FIFO: after it
    finally:
        scheduler.close()
    assert not ran.is_set()


def test_a_queued_request_hears_of_its_deadline_without_waiting_for_the_one_ahead():
    """Queue wait counts: the second request's consumer gets RequestTimeout while the first
    job still holds the engine, and the second job never runs."""
    scheduler = Scheduler("m", max_queued=1)
    started, release, second_ran = threading.Event(), threading.Event(), threading.Event()

    def holder(emit, stop_requested):
        started.set()
        assert release.wait(WAIT_S)
        return "held"

    def second(emit, stop_requested):
        second_ran.set()
        return "ran"

    async def main():
        first = asyncio.ensure_future(collect(scheduler, holder))
        assert await wait_for_event(started)
        with pytest.raises(RequestTimeout, match="while waiting for its next event"):
            await collect(scheduler, second, Deadline.after(0.05, "a test"))
        still_held = not release.is_set()  # the timeout came while the first job still ran
        # the expired request gave its place up: with room for one, another is taken
        third = asyncio.ensure_future(collect(scheduler, lambda emit, stop: "third"))
        await asyncio.sleep(0)
        assert not third.done()  # queued (a refusal would have ended it with ServerBusy)
        release.set()
        return still_held, await first, await third

    try:
        still_held, first, third = run(main())
    finally:
        scheduler.close()
    assert still_held and first == ["held"] and third == ["third"]
    assert not second_ran.is_set()


# -- admission: several at once, in arrival order, within the KV budget ------------------------


class Jobs:
    """Jobs that say when they start and run until released, one by one."""

    def __init__(self) -> None:
        self.started: dict[str, threading.Event] = {}
        self.release: dict[str, threading.Event] = {}
        self.order: list[str] = []
        self._lock = threading.Lock()

    def job(self, tag: str):
        self.started[tag], self.release[tag] = threading.Event(), threading.Event()

        def job(emit, cancelled):
            with self._lock:
                self.order.append(tag)
            self.started[tag].set()
            assert self.release[tag].wait(WAIT_S)
            return tag

        return job


def test_up_to_max_active_jobs_run_at_once_and_the_next_waits_its_turn():
    scheduler = Scheduler("m", max_queued=8, max_active=2)
    jobs = Jobs()
    job_a, job_b, job_c = jobs.job("a"), jobs.job("b"), jobs.job("c")

    async def main():
        a = asyncio.ensure_future(collect(scheduler, job_a))
        assert await wait_for_event(jobs.started["a"])
        b = asyncio.ensure_future(collect(scheduler, job_b))
        assert await wait_for_event(jobs.started["b"])  # two at once
        c = asyncio.ensure_future(collect(scheduler, job_c))
        await asyncio.sleep(0)  # c is queued: both slots are taken
        assert not jobs.started["c"].is_set()
        jobs.release["b"].set()
        assert await wait_for_event(jobs.started["c"])  # b's slot went to c
        assert not a.done()
        jobs.release["a"].set()
        jobs.release["c"].set()
        return await a, await b, await c

    try:
        assert run(main()) == (["a"], ["b"], ["c"])
    finally:
        for event in jobs.release.values():
            event.set()
        scheduler.close()


def test_the_kv_budget_holds_admission_back_in_arrival_order():
    """Budget 100: a 60-byte job runs; the next 60-byte job waits although a slot is free,
    and a 10-byte job behind it waits too (first in, first out: nothing overtakes a request
    that does not fit yet, so none starves); both go once the first ends."""
    scheduler = Scheduler("m", max_queued=8, max_active=4, kv_budget=100)
    jobs = Jobs()
    big1, big2, small = jobs.job("big1"), jobs.job("big2"), jobs.job("small")

    async def main():
        first = asyncio.ensure_future(collect_kv(scheduler, big1, 60))
        assert await wait_for_event(jobs.started["big1"])
        second = asyncio.ensure_future(collect_kv(scheduler, big2, 60))
        third = asyncio.ensure_future(collect_kv(scheduler, small, 10))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not jobs.started["big2"].is_set() and not jobs.started["small"].is_set()
        jobs.release["big1"].set()
        assert await wait_for_event(jobs.started["big2"])
        assert await wait_for_event(jobs.started["small"])  # 60 + 10 fit together
        jobs.release["big2"].set()
        jobs.release["small"].set()
        return await first, await second, await third

    try:
        assert run(main()) == (["big1"], ["big2"], ["small"])
        assert jobs.order == ["big1", "big2", "small"]
    finally:
        for event in jobs.release.values():
            event.set()
        scheduler.close()


async def collect_kv(scheduler, job, kv_bytes):
    return [e async for e in scheduler.stream(job, kv_bytes=kv_bytes)]


def test_closing_tells_queued_requests_and_refuses_new_ones():
    """Unload: the running job finishes; the one queued behind it and any new request are
    told the model is gone (overloaded: retry elsewhere), none hangs."""
    scheduler = Scheduler("m", max_queued=8, max_active=1)
    jobs = Jobs()
    running, queued = jobs.job("running"), jobs.job("queued")

    async def main():
        first = asyncio.ensure_future(collect(scheduler, running))
        assert await wait_for_event(jobs.started["running"])
        second = asyncio.ensure_future(collect(scheduler, queued))
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(asyncio.to_thread(scheduler.close))
        with pytest.raises(ServerBusy, match="unloaded"):
            await second
        jobs.release["running"].set()
        await closing
        with pytest.raises(ServerBusy, match="being unloaded"):
            await collect(scheduler, queued)
        return await first

    try:
        assert run(main()) == ["running"]
        assert not jobs.started["queued"].is_set()
    finally:
        for event in jobs.release.values():
            event.set()


def test_a_consumer_that_stops_reading_holds_its_bytes_until_its_deadline_then_drops_them():
    """A paused reader: its job has finished, its events wait unread. Its memory (kv_bytes)
    stays counted, so another request is not admitted past the budget, until the deadline:
    then the unread events are dropped, the bytes given back, and the reader hears why."""
    scheduler = Scheduler("m", max_queued=4, max_active=2, kv_budget=100)
    finished = threading.Event()
    second_ran = threading.Event()

    def big(emit, stop_requested):
        for i in range(3):
            emit(("state", i))
        finished.set()
        return "final"

    def second(emit, stop_requested):
        second_ran.set()
        return "second"

    async def main():
        # far enough that the steps below are done before it, on any machine
        deadline = Deadline.after(5.0, "a test")
        paused = scheduler.stream(big, deadline, kv_bytes=80)
        first = await paused.__anext__()  # read one event, then stop reading
        assert await wait_for_event(finished)
        waiting = asyncio.ensure_future(collect_with(scheduler, second, kv_bytes=40))
        await asyncio.sleep(0)
        # not admitted: the paused reader's 80 bytes are still held although its job ended
        assert not second_ran.is_set() and scheduler._kv_in_use == 80
        assert await waiting == ["second"]  # admitted once the deadline dropped them
        assert second_ran.is_set()
        with pytest.raises(RequestTimeout, match="before its client read its answer"):
            await paused.__anext__()
        return first

    try:
        assert run(main()) == ("state", 0)
        assert scheduler._kv_in_use == 0
    finally:
        scheduler.close()


async def collect_with(scheduler, job, kv_bytes):
    return [e async for e in scheduler.stream(job, kv_bytes=kv_bytes)]
