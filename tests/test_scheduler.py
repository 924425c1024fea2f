from __future__ import annotations

import asyncio
import threading
import time

import pytest

from layerstream.errors import InvalidRequest, ServerBusy
from layerstream.scheduler import Scheduler


def run(coro):
    return asyncio.run(coro)


async def collect(scheduler, job):
    return [e async for e in scheduler.stream(job)]


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


def test_consumer_leaving_sets_the_cancel_flag():
    scheduler = Scheduler("m", max_queued=2)
    saw_cancel = threading.Event()

    def job(emit, cancelled):
        for i in range(500):
            if cancelled():
                saw_cancel.set()
                return None
            emit(i)
            time.sleep(0.002)
        return None

    async def main():
        stream = scheduler.stream(job)
        assert await stream.__anext__() == 0
        await stream.aclose()  # what MLServer does when the client disconnects

    try:
        run(main())
        assert saw_cancel.wait(5)
    finally:
        scheduler.close()


def test_full_queue_is_server_busy():
    scheduler = Scheduler("m", max_queued=1)
    release = threading.Event()

    def slow(emit, cancelled):
        release.wait(5)
        return "ok"

    async def main():
        first = asyncio.ensure_future(collect(scheduler, slow))
        await asyncio.sleep(0.1)  # the worker takes the first job
        second = asyncio.ensure_future(collect(scheduler, slow))
        await asyncio.sleep(0.1)  # the second waits in the queue
        with pytest.raises(ServerBusy, match="retry later"):
            await collect(scheduler, slow)
        release.set()
        return await first, await second

    try:
        assert run(main()) == (["ok"], ["ok"])
    finally:
        scheduler.close()
