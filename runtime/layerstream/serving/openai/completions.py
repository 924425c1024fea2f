"""The answer to a chat or text completion, whole or streamed, of one choice or of ``n``.

Each choice is a V2 request of its own (body.py builds them): choices run as sequences of
their own and share the passes over the streamed blocks like any concurrent requests, and
each one's tokens are what it would generate alone (with a seed, choice i uses seed + i, so
it is reproducible alone by sending that seed with ``n`` 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ...errors import LayerStreamError
from ...inference.types import Event, FinalEvent, TokenEvent
from .body import Call, OpenAIError

log = logging.getLogger(__name__)

Events = AsyncIterator[Event]
T = TypeVar("T")


def usage(finals: list[FinalEvent]) -> dict[str, int]:
    """OpenAI's usage of a request: its prompt once, every choice's tokens."""
    prompt = finals[0].stats.prompt_tokens
    completion = sum(final.stats.tokens for final in finals)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _envelope(call: Call, kind: str, choices: list[dict[str, Any]], **extra: Any) -> dict:
    return {
        "id": call.id,
        "object": kind,
        "created": call.created,
        "model": call.model,
        "choices": choices,
        **extra,
    }


def answer(call: Call, answers: list[tuple[str, FinalEvent]]) -> dict[str, Any]:
    """The whole answer (``stream`` false): each choice's text and why it ended."""
    choices = []
    for index, (text, final) in enumerate(answers):
        choice: dict[str, Any] = {"index": index, "logprobs": None}
        if call.chat:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
        else:
            choice["text"] = text
        choice["finish_reason"] = final.finish_reason.value
        choices.append(choice)
    finals = [final for _, final in answers]
    return _envelope(call, call.answer_object, choices, usage=usage(finals))


def _chunk(
    call: Call, index: int, text: str, finish: str | None = None, role: bool = False
) -> bytes:
    """One SSE event of a streamed answer: choice ``index``'s ``text`` (a chat's first chunk
    of a choice opens the assistant's turn), the finish reason on its last."""
    choice: dict[str, Any] = {"index": index}
    if call.chat:
        delta = {"role": "assistant", "content": text} if role else {}
        if text:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text
    choice.update(logprobs=None, finish_reason=finish)
    extra = {"usage": None} if call.include_usage else {}  # as OpenAI: null until the last
    return sse(_envelope(call, call.chunk_object, [choice], **extra))


def sse(data: dict[str, Any]) -> bytes:
    return (
        b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
    )


DONE = b"data: [DONE]\n\n"


def _chunks(call: Call, index: int, event: Event) -> list[bytes]:
    if isinstance(event, TokenEvent):
        # "" while a character's bytes are incomplete: nothing to send yet
        return [_chunk(call, index, event.text)] if event.text else []
    if isinstance(event, FinalEvent):
        return [_chunk(call, index, event.text, event.finish_reason.value)]
    return []  # mode "tokens" produces no other event


async def first_events(streams: list[Events]) -> list[Event]:
    """Each choice's first event: a refused or queued-out request fails here, before the
    200, with its status."""
    return list(await asyncio.gather(*(stream.__anext__() for stream in streams)))


async def stream(call: Call, firsts: list[Event], streams: list[Events]) -> AsyncIterator[bytes]:
    """The SSE body: every choice's chunks as they come, a usage chunk, ``[DONE]``. At most
    one event of each choice is read ahead of the client: one that stops reading holds its
    events where the scheduler's deadline reaches them (serving/scheduler.py)."""
    pending: dict[asyncio.Future, int] = {}
    finals: list[FinalEvent] = []
    try:
        if call.chat:
            for index in range(len(streams)):
                yield _chunk(call, index, "", role=True)
        for index, first in enumerate(firsts):
            finals += [first] if isinstance(first, FinalEvent) else []
            for chunk in _chunks(call, index, first):
                yield chunk
            pending[asyncio.ensure_future(anext(streams[index]))] = index
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):  # choices in order
                index = pending.pop(task)
                try:
                    event = task.result()
                except StopAsyncIteration:
                    continue
                except LayerStreamError as error:
                    # the 200 is sent: the error is the last event, as OpenAI and vLLM send
                    # it (the openai client raises APIError with it)
                    yield sse(OpenAIError.of(error).body())
                    yield DONE
                    return
                finals += [event] if isinstance(event, FinalEvent) else []
                for chunk in _chunks(call, index, event):
                    yield chunk
                pending[asyncio.ensure_future(anext(streams[index]))] = index
        if call.include_usage and finals:
            yield sse(_envelope(call, call.chunk_object, [], usage=usage(finals)))
        yield DONE
    except (asyncio.CancelledError, GeneratorExit):
        log.info("%s: request %s: the client left mid-stream", call.model, call.id)
        raise
    finally:
        # closing a choice's events is what stops its engine work
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for events in streams:
            await events.aclose()  # type: ignore[attr-defined]


class EventStream(StreamingResponse):
    """SSE whose generators are closed when the response ends, however it ends: starlette
    leaves a generator suspended at a ``yield`` to the garbage collector when the client
    leaves, and closing the request's events is what stops the engine. Both are closed: the
    body never starts if the client leaves while the headers are being sent, and then
    closing it would not reach the events (closing twice is harmless)."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], streams: list[Events]) -> None:
        super().__init__(body, headers=_SSE_HEADERS)
        self._streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            for events in self._streams:
                await events.aclose()  # type: ignore[attr-defined]


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def collect(events: Events) -> tuple[str, FinalEvent]:
    """One choice's whole text and its final event."""
    texts: list[str] = []
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, TokenEvent | FinalEvent):
                texts.append(event.text)
            if isinstance(event, FinalEvent):
                return "".join(texts), event
    raise LayerStreamError("the request's events ended without a final event")


async def collect_all(streams: list[Events]) -> list[tuple[str, FinalEvent]]:
    """Every choice's answer; the first failure fails the request (the others stop)."""
    return await all_of([collect(events) for events in streams])


async def all_of(work: list[Awaitable[T]]) -> list[T]:
    """Every result, in order; the first failure is raised and the rest is cancelled (a
    request's parts stop with it)."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
