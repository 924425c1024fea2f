"""OpenAI-compatible endpoints: what the official ``openai`` client needs, at the server's
``/v1`` and at each model's own base URL (models.py says which model each serves).

- ``POST /chat/completions``: ``messages``, rendered with the model's own chat template;
- ``POST /completions``: one ``prompt`` (a string, or a list of token ids);
- ``GET /models``, ``GET /models/{id}``: the models the base URL serves.

Each request becomes a V2 request (``mode`` "tokens") and runs through the runtime's
``events``, the path every V2 request takes (validation, queue, metrics, the log line), so
both APIs give the same answer. The request body and the errors: body.py;
docs/openai.md has the tables and the statuses.

MLServer adds a custom handler's route once per model instance, and the first one registered
answers every request on its path: the handlers serve the model the path or the body names
(``loaded.find``), whichever instance ``self`` is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi.responses import JSONResponse, Response
from mlserver.handlers import custom_handler
from starlette.requests import Request

from ...errors import LayerStreamError
from ...inference.request import Extras
from ...inference.types import Event
from . import completions, embeddings, responses, tokens
from .body import json_body, parse_call
from .errors import OpenAIError
from .models import Target, by_body, by_path, model_card, served_ids

log = logging.getLogger(__name__)

BASE = "/v2/models/{model_name}/openai/v1"
T = TypeVar("T")

CLIENT_GONE = 499  # nginx's "client closed request": in the access log and metrics only


class _ClientGone(Exception):
    pass


async def _unless_client_leaves(work: Awaitable[T], request: Request) -> T:
    """``work``'s result, or _ClientGone once the client disconnects first (``work`` is then
    cancelled, which closes the request's event stream: the engine stops). Before the first
    byte of a response nothing else would notice: the queue wait and the prefill, or a whole
    unary answer, would run for nobody."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise _ClientGone
    return task.result()


async def _disconnected(request: Request) -> None:
    # the body is read: the next ASGI message is the disconnect
    while (await request.receive())["type"] != "http.disconnect":
        pass


Resolve = Callable[[Any], Target]  # the body's ``model`` -> the model the request is for


class _Refused(Exception):
    """A request refused before it became a V2 request: its response."""

    def __init__(self, response: Response):
        self.response = response


async def _read(resolve: Resolve, request: Request, parse: Callable[[dict, Target], T]):
    """The body, the model it is for and ``parse(body, target)``; _Refused with the
    OpenAI error where any of them fails (counted with the model's other refusals)."""
    target = None
    try:
        body = await json_body(request)
        target = resolve(body.get("model"))
        return target, parse(body, target)
    except OpenAIError as error:
        if target is not None:
            target.runtime.count_refused("invalid_request" if error.status < 500 else "internal")
        raise _Refused(error.response()) from None


async def _answered(
    request: Request,
    label: str,
    streams: list[AsyncIterator[Event]],
    whole: Callable[[], Awaitable[Response]],
    streamed: Callable[[Event], AsyncIterator[bytes]] | None = None,
) -> Response:
    """Run a request's streams: with ``streamed``, its first event before the 200 (a
    refused or queued-out request gets its status), then SSE; else ``whole()``. An error
    is OpenAI's; a client that leaves first stops the work."""
    try:
        if streamed is not None:
            first = await _unless_client_leaves(completions.first_event(streams), request)
            return completions.EventStream(streamed(first), streams)
        return await _unless_client_leaves(whole(), request)
    except LayerStreamError as error:
        await _close(streams)
        return OpenAIError.of(error).response()
    except _ClientGone:
        await _close(streams)
        log.info("%s: the client left before the answer began", label)
        return Response(status_code=CLIENT_GONE)


async def _close(streams: list[AsyncIterator[Event]]) -> None:
    for events in streams:
        await events.aclose()  # type: ignore[attr-defined]


async def _complete(resolve: Resolve, request: Request, chat: bool) -> Response:
    try:
        target, call = await _read(
            resolve, request, lambda body, target: parse_call(body, target.model, chat)
        )
    except _Refused as refused:
        return refused.response
    runtime = target.runtime
    tools = call.tools.declared if call.tools is not None else None
    extras = Extras(logprobs=call.logprobs, grammar=call.grammar, tools=tools)
    streams = [runtime.events(payload, extras) for payload in call.payloads]

    async def whole() -> Response:
        answers = await completions.collect_all(streams)
        return JSONResponse(completions.answer(call, answers, runtime.token_text))

    def streamed(first: Event) -> AsyncIterator[bytes]:
        return completions.stream(call, first, streams, runtime.token_text)

    label = f"{call.model}: request {call.id}"
    return await _answered(request, label, streams, whole, streamed if call.stream else None)


async def _respond(resolve: Resolve, request: Request) -> Response:
    try:
        target, call = await _read(
            resolve, request, lambda body, target: responses.parse(body, target.model)
        )
    except _Refused as refused:
        return refused.response
    streams = [target.runtime.events(call.payloads[0])]

    async def whole() -> Response:
        ((text, final, _),) = await completions.collect_all(streams)
        return JSONResponse(responses.answer(call, text, final))

    def streamed(first: Event) -> AsyncIterator[bytes]:
        return responses.stream(call, first, streams[0])

    label = f"{call.model}: response {call.id}"
    return await _answered(request, label, streams, whole, streamed if call.stream else None)


async def _embed(resolve: Resolve, request: Request) -> Response:
    def parse(body: dict, target: Target) -> tuple[embeddings.EmbeddingsBody, list]:
        parsed = embeddings.parse_embeddings(body, target.runtime.caps().hidden_size)
        return parsed, embeddings.payloads(parsed)

    try:
        target, (parsed, payloads) = await _read(resolve, request, parse)
    except _Refused as refused:
        return refused.response
    runtime = target.runtime
    streams = [runtime.events(payload) for payload in payloads]

    async def whole() -> Response:
        finals = await embeddings.all_finals(streams, runtime.max_in_flight())
        return JSONResponse(embeddings.answer(parsed, target.model, finals))

    return await _answered(request, f"{target.model}: embeddings", streams, whole)


async def _tokens(resolve: Resolve, request: Request, decode: bool) -> Response:
    try:
        body = await json_body(request)
        runtime = resolve(body.get("model")).runtime
        if decode:
            return JSONResponse({"prompt": await runtime.detokenize(tokens.detokenize_ids(body))})
        caps = runtime.caps()
        ids = await runtime.token_ids(tokens.tokenize_payload(body, caps.default_mode.value))
    except OpenAIError as error:
        return error.response()
    except LayerStreamError as error:
        return OpenAIError.of(error).response()
    return JSONResponse({"count": len(ids), "max_model_len": caps.context_length, "tokens": ids})


async def _respond(resolve: Resolve, request: Request) -> Response:
    runtime = None
    try:
        body = await json_body(request)
        target = resolve(body.get("model"))
        runtime = target.runtime
        call = responses.parse(body, target.model)
    except OpenAIError as error:
        if runtime is not None:
            runtime.count_refused("invalid_request" if error.status < 500 else "internal")
        return error.response()
    streams = [runtime.events(call.payloads[0])]
    try:
        if call.stream:
            first = await _unless_client_leaves(completions.first_event(streams), request)
            return completions.EventStream(responses.stream(call, first, streams[0]), streams)
        ((text, final, _),) = await _unless_client_leaves(completions.collect_all(streams), request)
        return JSONResponse(responses.answer(call, text, final))
    except LayerStreamError as error:
        await _close(streams)
        return OpenAIError.of(error).response()
    except _ClientGone:
        await _close(streams)
        log.info("%s: response %s: the client left before the answer began", call.model, call.id)
        return Response(status_code=CLIENT_GONE)


async def _post(resolve: Resolve, path: str, request: Request) -> Response:
    """``POST`` under a base URL: the route its path names."""
    route = path.strip("/")
    if route == "chat/completions":
        return await _complete(resolve, request, chat=True)
    if route == "completions":
        return await _complete(resolve, request, chat=False)
    if route == "embeddings":
        return await _embed(resolve, request)
    if route == "responses":
        return await _respond(resolve, request)
    if route in {"tokenize", "detokenize"}:
        return await _tokens(resolve, request, decode=route == "detokenize")
    if route == "models" or route.startswith("models/"):
        return _wrong_method("POST", path)
    return _not_served(path)


def _get(path: str, resolve: Resolve, models: Callable[[], list[str]]) -> Response:
    """``GET`` under a base URL: the models it serves (``models()``: their ids), or one."""
    route = path.strip("/")
    try:
        if route == "models":
            return JSONResponse({"object": "list", "data": [model_card(i) for i in models()]})
        if route.startswith("models/"):
            return JSONResponse(model_card(resolve(route.removeprefix("models/")).model))
    except OpenAIError as error:
        return error.response()
    if route in POSTED:
        return _wrong_method("GET", path)
    return _not_served(path)


def _own(model_name: str, version: str | None = None) -> tuple[Resolve, Callable[[], list[str]]]:
    """A model's own base URL: how it reads a body's ``model``, and its one id."""

    def resolve(named: Any) -> Target:
        return by_path(model_name, version, named)

    return resolve, lambda: [resolve(None).model]


# MLServer adds a custom handler's route once per model instance: each route below serves
# whatever its path names, whichever instance it was registered by. One route per method and
# base URL, dispatching on the path itself: routes that overlap would be matched in the
# order MLServer happened to add them.
SERVER = "/v1"
VERSIONED = "/v2/models/{model_name}/versions/{model_version}/openai/v1"


class OpenAIRoutes:
    """MLServer custom handlers that serve the OpenAI API: at the server's ``/v1`` and at
    each model's own base URL (models.py)."""

    @custom_handler(rest_path=SERVER + "/{path:path}")
    async def openai_server_post(self, path: str, request: Request) -> Response:
        return await _post(by_body, path, request)

    # where vLLM's server has them: at its root, the body's model choosing
    @custom_handler(rest_path="/tokenize")
    async def openai_root_tokenize(self, request: Request) -> Response:
        return await _tokens(by_body, request, decode=False)

    @custom_handler(rest_path="/detokenize")
    async def openai_root_detokenize(self, request: Request) -> Response:
        return await _tokens(by_body, request, decode=True)

    @custom_handler(rest_path=SERVER + "/{path:path}", rest_method="GET")
    async def openai_server_get(self, path: str) -> Response:
        return _get(path, by_body, served_ids)

    @custom_handler(rest_path=BASE + "/{path:path}")
    async def openai_model_post(self, model_name: str, path: str, request: Request) -> Response:
        return await _post(_own(model_name)[0], path, request)

    @custom_handler(rest_path=BASE + "/{path:path}", rest_method="GET")
    async def openai_model_get(self, model_name: str, path: str) -> Response:
        return _get(path, *_own(model_name))

    @custom_handler(rest_path=VERSIONED + "/{path:path}")
    async def openai_version_post(
        self, model_name: str, model_version: str, path: str, request: Request
    ) -> Response:
        return await _post(_own(model_name, model_version)[0], path, request)

    @custom_handler(rest_path=VERSIONED + "/{path:path}", rest_method="GET")
    async def openai_version_get(self, model_name: str, model_version: str, path: str) -> Response:
        return _get(path, *_own(model_name, model_version))

    # Other methods anywhere under a base URL: OpenAI's 405, not FastAPI's {"detail": ...}
    @custom_handler(rest_path=SERVER + "/{path:path}", rest_method="PUT")
    async def openai_server_put(self, path: str) -> Response:
        return _wrong_method("PUT", path)

    @custom_handler(rest_path=SERVER + "/{path:path}", rest_method="PATCH")
    async def openai_server_patch(self, path: str) -> Response:
        return _wrong_method("PATCH", path)

    @custom_handler(rest_path=SERVER + "/{path:path}", rest_method="DELETE")
    async def openai_server_delete(self, path: str) -> Response:
        return _wrong_method("DELETE", path)

    @custom_handler(rest_path=BASE + "/{path:path}", rest_method="PUT")
    async def openai_model_put(self, model_name: str, path: str) -> Response:
        return _wrong_method("PUT", path)

    @custom_handler(rest_path=BASE + "/{path:path}", rest_method="PATCH")
    async def openai_model_patch(self, model_name: str, path: str) -> Response:
        return _wrong_method("PATCH", path)

    @custom_handler(rest_path=BASE + "/{path:path}", rest_method="DELETE")
    async def openai_model_delete(self, model_name: str, path: str) -> Response:
        return _wrong_method("DELETE", path)

    @custom_handler(rest_path=VERSIONED + "/{path:path}", rest_method="PUT")
    async def openai_version_put(self, model_name: str, model_version: str, path: str) -> Response:
        return _wrong_method("PUT", path)

    @custom_handler(rest_path=VERSIONED + "/{path:path}", rest_method="PATCH")
    async def openai_version_patch(
        self, model_name: str, model_version: str, path: str
    ) -> Response:
        return _wrong_method("PATCH", path)

    @custom_handler(rest_path=VERSIONED + "/{path:path}", rest_method="DELETE")
    async def openai_version_delete(
        self, model_name: str, model_version: str, path: str
    ) -> Response:
        return _wrong_method("DELETE", path)


SERVED = (
    "POST /chat/completions, /completions, /responses, /embeddings, /tokenize, /detokenize "
    "and GET /models"
)
POSTED = {"chat/completions", "completions", "responses", "embeddings", "tokenize", "detokenize"}


def _wrong_method(method: str, path: str) -> Response:
    allowed = "GET" if path.strip("/").split("/")[0] == "models" else "POST"
    response = OpenAIError(
        405,
        f"{method} /{path.strip('/')} is not served; a base URL here serves {SERVED}",
        "method_not_allowed",
    ).response()
    response.headers["Allow"] = allowed
    return response


def _not_served(path: str) -> Response:
    return OpenAIError(
        404, f"/{path.strip('/')} is not served here; a base URL here serves {SERVED}", "not_found"
    ).response()
