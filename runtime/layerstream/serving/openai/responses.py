"""``POST /responses``: OpenAI's Responses API, for text in and text out, whole or streamed.

A response is a chat completion underneath: ``input`` (a string, or a list of messages whose
content is a string or ``input_text`` parts) and ``instructions`` (a system turn) become the
chat's messages, ``max_output_tokens`` its ``max_tokens``, and it runs through the same
body checks and the same V2 request. Fields that would change the answer and are not served
(tools, reasoning, a text format other than plain text, ``previous_response_id``: nothing is
stored) are refused with a 400 naming them.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

from ...errors import LayerStreamError
from ...inference.types import Event, FinalEvent, TokenEvent
from ..parameters import show
from .body import Call, parse_call
from .completions import sse
from .errors import OpenAIError, invalid

# Responses field -> the chat completions field it is
_AS_CHAT = {"max_output_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p"}
_AS_CHAT |= {"stream": "stream", "model": "model", "user": "user", "metadata": "metadata"}
# read, and change nothing in the answer
_HARMLESS = {"store", "service_tier", "parallel_tool_calls", "truncation", "safety_identifier"}
_HARMLESS |= {"prompt_cache_key"}
_NEUTRAL = {"tools": [], "tool_choice": "auto", "text": {"format": {"type": "text"}}}


def chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """The chat completions body that answers a Responses body."""
    body = {key: value for key, value in body.items() if value is not None}
    chat: dict[str, Any] = {}
    for name, value in body.items():
        if name in _AS_CHAT:
            chat[_AS_CHAT[name]] = value
        elif name in _NEUTRAL:
            if value != _NEUTRAL[name]:
                message = f"{name}={show(value)} is not served here"
                raise invalid(message, name, "unsupported_parameter")
        elif name not in _HARMLESS | {"input", "instructions"}:
            raise invalid(
                f"unrecognized or unserved request argument {name!r} (text in and text out "
                "only: docs/openai.md)",
                name,
                "unknown_parameter",
            )
    messages = []
    if "instructions" in body:
        if not isinstance(body["instructions"], str):
            raise invalid("instructions must be a string", "instructions")
        messages.append({"role": "system", "content": body["instructions"]})
    messages += _input_messages(body.get("input"))
    chat["messages"] = messages
    return chat


def _input_messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise invalid("input must be a string or a non-empty list of messages", "input")
    messages = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise invalid(f"input[{index}] must be a message ({{'role', 'content'}})", "input")
        content = item.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("input_text", "output_text") or not isinstance(
                    part.get("text"), str
                ):
                    raise invalid(f"input[{index}] holds a part that is not text", "input")
                texts.append(part["text"])
            content = "".join(texts)
        messages.append({"role": item.get("role"), "content": content})
    return messages


def _item_id(call: Call) -> str:
    """The id of the response's one output item (its own id is ``resp_`` and the same)."""
    return "msg_" + call.id.removeprefix("chatcmpl-")


def _envelope(call: Call, status: str, text: str, final: FinalEvent | None) -> dict[str, Any]:
    item_id = _item_id(call)
    output = []
    if status != "in_progress":
        part = {"type": "output_text", "text": text, "annotations": []}
        output = [
            {
                "type": "message",
                "id": item_id,
                "status": "completed",
                "role": "assistant",
                "content": [part],
            }
        ]
    usage = None
    if final is not None:
        s = final.stats
        usage = {
            "input_tokens": s.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": s.tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": s.prompt_tokens + s.tokens,
        }
    length = final is not None and final.finish_reason.value == "length"
    return {
        "id": "resp_" + item_id.removeprefix("msg_"),
        "object": "response",
        "created_at": call.created,
        "status": "incomplete" if length else status,
        "incomplete_details": {"reason": "max_output_tokens"} if length else None,
        "error": None,
        "model": call.model,
        "output": output,
        "parallel_tool_calls": False,
        "tool_choice": "auto",
        "tools": [],
        "text": {"format": {"type": "text"}},
        "usage": usage,
    }


def parse(body: dict[str, Any], model: str) -> Call:
    return parse_call(chat_body(body), model, chat=True)


def answer(call: Call, text: str, final: FinalEvent) -> dict[str, Any]:
    return _envelope(call, "completed", text, final)


async def stream(call: Call, first: Event, events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
    """The Responses API's streaming events: created, the item and its text part opened,
    a delta per piece of text, each closed, completed."""
    item_id = _item_id(call)
    numbers = itertools.count()

    def event(kind: str, **fields: Any) -> bytes:
        return sse({"type": kind, "sequence_number": next(numbers), **fields})

    async def from_first() -> AsyncIterator[Event]:
        yield first
        async for later in events:
            yield later

    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=_envelope(call, "in_progress", "", None))
    yield event("response.in_progress", response=_envelope(call, "in_progress", "", None))
    item = {"type": "message", "id": item_id, "status": "in_progress", "role": "assistant"}
    yield event("response.output_item.added", output_index=0, item={**item, "content": []})
    part = {"type": "output_text", "text": "", "annotations": []}
    yield event("response.content_part.added", part=part, **where)
    texts: list[str] = []
    final = None
    try:
        async with contextlib.aclosing(from_first()) as everything:
            async for current in everything:
                if isinstance(current, TokenEvent | FinalEvent) and current.text:
                    texts.append(current.text)
                    yield event("response.output_text.delta", delta=current.text, **where)
                if isinstance(current, FinalEvent):
                    final = current
                    break
    except LayerStreamError as error:
        failure = OpenAIError.of(error)
        yield event("error", code=failure.code, message=failure.message, param=None)
        return
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    text = "".join(texts)
    yield event("response.output_text.done", text=text, **where)
    yield event("response.content_part.done", part={**part, "text": text}, **where)
    done = {**item, "status": "completed", "content": [{**part, "text": text}]}
    yield event("response.output_item.done", output_index=0, item=done)
    whole = _envelope(call, "completed", text, final)
    kind = "response.incomplete" if whole["status"] == "incomplete" else "response.completed"
    yield event(kind, response=whole)
