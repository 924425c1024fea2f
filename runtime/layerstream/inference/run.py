"""The one entry for running a request on an engine: tokenize, check, dispatch.

Runs on the request's worker thread (serving/scheduler.py): tokenizing costs time and memory in
proportion to the prompt, so it stays off the event loop, which only looked at the
request's shape and sizes (serving/protocol.py).
"""

from __future__ import annotations

from collections.abc import Callable

from ..engine.engine import Engine
from .embedding import run_embedding
from .generation import run_generation
from .hidden import run_hidden_states
from .prompts import chat_ids, tokenize
from .request import ModelCapabilities, Request, check_context
from .types import Cancelled, Emit, FinalEvent, Mode

Runner = Callable[[Engine, Request, list[int], Emit, Cancelled], FinalEvent]
RUNNERS: dict[Mode, Runner] = {
    Mode.TOKENS: run_generation,
    Mode.HIDDEN_STATES: run_hidden_states,
    Mode.EMBEDDING: run_embedding,
}


def run(
    engine: Engine,
    request: Request,
    caps: ModelCapabilities,
    emit: Emit,
    cancelled: Cancelled,
) -> FinalEvent:
    """Run ``request``: its events go to ``emit``, the final one is returned. Raises
    InvalidRequest when the prompt does not fit the model, RequestCancelled when
    ``cancelled`` says the consumer has gone."""
    ids = request.input_ids
    if ids is None:
        ids = prompt_ids(engine, request)
        check_context(len(ids), request, caps)  # ids that came as ids were checked on arrival
    return RUNNERS[request.mode](engine, request, ids, emit, cancelled)


def prompt_ids(engine: Engine, request: Request) -> list[int]:
    """The token ids of the request's prompt: its ids as sent, or its text or chat (the
    model's own template) tokenized."""
    if request.input_ids is not None:
        return list(request.input_ids)
    if request.messages is not None:
        return chat_ids(engine.tokenizer, request.messages, request.tools)
    assert request.prompt is not None  # the protocol sets one of the three
    return tokenize(engine.tokenizer, request.prompt)
