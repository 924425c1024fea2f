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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ...errors import LayerStreamError
from ...inference.types import Event, FinalEvent, TokenEvent
from .body import Call
from .errors import OpenAIError
from .tools import as_call

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


TokenText = Callable[[int], str]  # one token's own text (the model's tokenizer)
# what OpenAI (and vLLM) send for a log probability of minus infinity, which JSON cannot
# spell: a token top-k or top-p left out, listed among a request's top_logprobs
NO_CHANCE = -9999.0


def _entry(token_id: int, logprob: float, token_text: TokenText) -> dict[str, Any]:
    text = token_text(token_id)
    # the bytes of a token that holds part of a character are not its text's (U+FFFD)
    raw = None if "\ufffd" in text else list(text.encode())
    return {"token": text, "logprob": max(logprob, NO_CHANCE), "bytes": raw}


def logprobs(call: Call, tokens: list[TokenEvent], token_text: TokenText, offset: int = 0):
    """The ``logprobs`` of a choice (or of a chunk of it) holding ``tokens``: a chat's
    ``content`` list, or the completions API's parallel lists (``offset``: where the first
    token's text begins in the choice's text)."""
    if call.logprobs is None:
        return None
    if call.chat:
        content = []
        for event in tokens:
            entry = _entry(event.token_id, event.logprob, token_text)
            entry["top_logprobs"] = [_entry(i, lp, token_text) for i, lp in event.top_logprobs]
            content.append(entry)
        return {"content": content, "refusal": None}
    texts = [token_text(event.token_id) for event in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [max(event.logprob, NO_CHANCE) for event in tokens],
        "top_logprobs": [
            {token_text(i): max(lp, NO_CHANCE) for i, lp in event.top_logprobs} for event in tokens
        ]
        if call.logprobs
        else None,
        "text_offset": offsets,
    }


def answer(call: Call, answers: list[Collected], token_text: TokenText) -> dict[str, Any]:
    """The whole answer (``stream`` false): each choice's text and why it ended."""
    choices = []
    for index, (text, final, tokens) in enumerate(answers):
        choice: dict[str, Any] = {
            "index": index,
            "logprobs": logprobs(call, tokens, token_text),
        }
        called = as_call(call.tools, text) if call.tools is not None else None
        if called is not None:
            message = {"role": "assistant", "content": None, "tool_calls": [called]}
            choice.update(message=message, finish_reason=TOOL_CALLS)
        elif call.chat:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
        else:
            choice["text"] = text
        choice.setdefault("finish_reason", final.finish_reason.value)
        choices.append(choice)
    finals = [final for _, final, _ in answers]
    return _envelope(call, call.answer_object, choices, usage=usage(finals))


TOOL_CALLS = "tool_calls"  # the finish_reason of an answer that is a tool call


def _chunk(
    call: Call,
    index: int,
    text: str,
    finish: str | None = None,
    role: bool = False,
    chosen: Any = None,
    called: dict[str, Any] | None = None,
) -> bytes:
    """One SSE event of a streamed answer: choice ``index``'s ``text`` (a chat's first chunk
    of a choice opens the assistant's turn), the finish reason on its last, the log
    probabilities of its tokens (``chosen``) where asked."""
    choice: dict[str, Any] = {"index": index}
    if call.chat:
        delta = {"role": "assistant", "content": text} if role else {}
        if text:
            delta["content"] = text
        if called is not None:  # the whole call in one delta, as index 0 of its calls
            delta["tool_calls"] = [{"index": 0, **called}]
        choice["delta"] = delta
    else:
        choice["text"] = text
    choice.update(logprobs=chosen, finish_reason=finish)
    extra = {"usage": None} if call.include_usage else {}  # as OpenAI: null until the last
    return sse(_envelope(call, call.chunk_object, [choice], **extra))


def sse(data: dict[str, Any]) -> bytes:
    return (
        b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
    )


DONE = b"data: [DONE]\n\n"


class _Choice:
    """A streamed choice: the tokens whose text is not sent yet, and how much text is.

    With tools, text that may be a tool call is held until the end: all of it where a call
    is required, and under ``auto`` while it begins like one (``{`` or ``<``); an answer
    that is a call goes as one ``tool_calls`` delta, any other as text."""

    def __init__(self, index: int, call: Call) -> None:
        self.index = index
        self.tokens: list[TokenEvent] = []
        self.sent = 0
        tools = call.tools
        self.holding = tools is not None and tools.choice != "none"
        self.held = ""

    def chunks(self, call: Call, event: Event, token_text: TokenText) -> list[bytes]:
        if isinstance(event, TokenEvent):
            self.tokens.append(event)
            if not event.text:  # a character's bytes incomplete: nothing to send yet
                return []
            if self.holding:
                self.held += event.text
                if call.tools.must_call or self.held.lstrip()[:1] in ("", "{", "<"):
                    return []
                self.holding, text, self.held = False, self.held, ""
                return [self._chunk(call, text, None, token_text)]
            return [self._chunk(call, event.text, None, token_text)]
        if isinstance(event, FinalEvent):
            text, finish = self.held + event.text, event.finish_reason.value
            called = as_call(call.tools, text) if self.holding else None
            if called is not None:
                return [self._chunk(call, "", TOOL_CALLS, token_text, called)]
            return [self._chunk(call, text, finish, token_text)]
        return []  # mode "tokens" produces no other event

    def _chunk(
        self,
        call: Call,
        text: str,
        finish: str | None,
        token_text: TokenText,
        called: dict[str, Any] | None = None,
    ) -> bytes:
        chosen = logprobs(call, self.tokens, token_text, self.sent)
        self.tokens = []
        self.sent += len(text)
        return _chunk(call, self.index, text, finish, chosen=chosen, called=called)


async def first_event(streams: list[Events]) -> Event:
    """The first choice's first event: a refused or queued-out request fails here, before
    the 200, with its status. Only the first: choices that do not all fit at once wait for
    the ones before them to be read, which only the stream does (each choice's KV stays
    reserved until its events are read)."""
    return await anext(streams[0])


async def stream(
    call: Call, first: Event, streams: list[Events], token_text: TokenText
) -> AsyncIterator[bytes]:
    """The SSE body: every choice's chunks as they come, a usage chunk, ``[DONE]``. At most
    one event of each choice is read ahead of the client: one that stops reading holds its
    events where the scheduler's deadline reaches them (serving/scheduler.py)."""
    pending: dict[asyncio.Future, int] = {}
    finals: list[FinalEvent] = []
    choices = [_Choice(index, call) for index in range(len(streams))]
    try:
        if call.chat:
            for index in range(len(streams)):
                yield _chunk(call, index, "", role=True)
        finals += [first] if isinstance(first, FinalEvent) else []
        for chunk in choices[0].chunks(call, first, token_text):
            yield chunk
        for index, events in enumerate(streams):
            pending[asyncio.ensure_future(anext(events))] = index
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
                for chunk in choices[index].chunks(call, event, token_text):
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


Collected = tuple[str, FinalEvent, list[TokenEvent]]


async def collect(events: Events) -> Collected:
    """One choice's whole text, its final event and its tokens."""
    texts: list[str] = []
    tokens: list[TokenEvent] = []
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, TokenEvent):
                tokens.append(event)
            if isinstance(event, TokenEvent | FinalEvent):
                texts.append(event.text)
            if isinstance(event, FinalEvent):
                return "".join(texts), event, tokens
    raise LayerStreamError("the request's events ended without a final event")


async def collect_all(streams: list[Events]) -> list[Collected]:
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
