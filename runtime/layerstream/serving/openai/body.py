"""The OpenAI request body, checked, and the V2 request that answers it; OpenAI's errors.

A field that would change the answer and cannot be honoured (``logprobs``, ``tools``,
penalties, JSON mode, any field not known here) is refused with a 400, never ignored:
docs/openai.md lists them. ``n`` choices are ``n`` V2 requests (completions.py).
"""

from __future__ import annotations

import json
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, TypeVar

import pydantic
from mlserver.types import InferenceRequest, Parameters, RequestInput
from starlette.requests import Request

from ...errors import InvalidRequest
from ...inference.constraints import ANY_OBJECT, grammar
from ...inference.logprobs import MAX_TOP_LOGPROBS
from ..parameters import show
from .errors import invalid
from .tools import Tools, parse_tools

M = TypeVar("M", bound=pydantic.BaseModel)


def validated(model: type[M], body: dict[str, Any]) -> M:
    """``body`` as ``model`` (a pydantic model), its nulls read as absent fields (as OpenAI
    reads them): a field it does not validate is a 400 naming that field, as OpenAI words it."""
    try:
        return model.model_validate({k: v for k, v in body.items() if v is not None})
    except pydantic.ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = error["loc"][0] if error["loc"] else None
        param = where if isinstance(where, str) else None
        shown = ".".join(str(part) for part in error["loc"]) or "the body"
        if error["type"] == "extra_forbidden":
            message = (
                f"unrecognized request argument {shown!r}: ignoring it could change the "
                "answer, so it is refused (docs/openai.md lists the fields this server reads)"
            )
            raise invalid(message, param, "unknown_parameter") from None
        raise invalid(f"{shown}: {error['msg']}", param) from None


# -- the request body -----------------------------------------------------------------------

_INT, _NUMBER, _BOOL = "an integer", "a number", "true or false"
# OpenAI field -> the V2 parameter it sets and the JSON type it must have. layerstream checks
# the ranges (and stop), and its messages name the V2 parameter (max_new_tokens for
# max_tokens). top_k and repetition_penalty are extensions (the client's extra_body), as in
# vLLM.
_MAPPED = {
    "max_tokens": ("max_new_tokens", _INT),
    "max_completion_tokens": ("max_new_tokens", _INT),
    "temperature": ("temperature", _NUMBER),
    "top_p": ("top_p", _NUMBER),
    "seed": ("seed", _INT),
    "stop": ("stop", None),  # a string or a list of strings
    "top_k": ("top_k", _INT),
    "repetition_penalty": ("repetition_penalty", _NUMBER),
}
# read, and change nothing in the answer
_HARMLESS = {"model", "stream", "stream_options", "user", "metadata", "store", "service_tier"}
_HARMLESS |= {"prompt_cache_key", "safety_identifier", "parallel_tool_calls"}
_COMMON = (set(_MAPPED) - {"max_completion_tokens"}) | {"n"}
MAX_CHOICES = 16  # choices of one request (each is a request of its own in the queue)
_OWN = {
    True: {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format"}
    | {"tools", "tool_choice"},
    False: {"prompt", "logprobs"},
}
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's limit


@dataclass(frozen=True)
class _Refused:
    neutral: tuple[Any, ...]  # the values that ask for nothing (OpenAI's defaults)
    reason: str


_NO_FUNCTIONS = "functions and function_call are OpenAI's older form: send tools and tool_choice"
_NO_PENALTY = "only 0 is supported (repetition_penalty, an extension, is)"
_REFUSED_BOTH = {
    "presence_penalty": _Refused((0, 0.0), _NO_PENALTY),
    "frequency_penalty": _Refused((0, 0.0), _NO_PENALTY),
    "logit_bias": _Refused(({},), "logit_bias is not supported"),
}
_REFUSED = {
    True: {
        **_REFUSED_BOTH,
        "functions": _Refused(([],), _NO_FUNCTIONS),
        "function_call": _Refused(("none",), _NO_FUNCTIONS),
    },
    False: {
        **_REFUSED_BOTH,
        "echo": _Refused((False,), "the prompt is not echoed"),
        "best_of": _Refused((1,), "one candidate is generated per request"),
        "suffix": _Refused(("",), "insertion (suffix) is not supported"),
    },
}


@dataclass(frozen=True)
class Call:
    """One OpenAI request, checked, and the V2 request that answers it."""

    chat: bool
    id: str
    model: str  # as the client named it (under Seldon, not the internal name in the path)
    created: int
    stream: bool
    include_usage: bool
    # each token's log probability and its this many most likely alternatives' (None: none)
    logprobs: int | None
    grammar: str | None  # the llguidance grammar its answer follows (None: free text)
    tools: Tools | None  # the tools declared, and what the answer may or must do with them
    payloads: tuple[InferenceRequest, ...]  # one per choice (``n``)

    @property
    def answer_object(self) -> str:
        """The ``object`` of the whole answer."""
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        """The ``object`` of each streamed chunk (OpenAI names text chunks as answers)."""
        return "chat.completion.chunk" if self.chat else "text_completion"


def parse_call(body: dict[str, Any], model: str, chat: bool) -> Call:
    """``body`` checked, and the V2 request that answers it; ``model``: the name the answer
    carries."""
    # OpenAI reads a null as an absent field
    body = {key: value for key, value in body.items() if value is not None}
    _check_fields(body, chat)
    for name, (_, want) in _MAPPED.items():
        if name in body and want is not None:
            _check_type(name, body[name], want)
    _check_type("stream", body.get("stream", False), _BOOL)
    options = body.get("stream_options", {})
    if (
        not isinstance(options, dict)
        or set(options) - {"include_usage"}
        or not isinstance(options.get("include_usage", False), bool)
    ):
        raise invalid("stream_options must be like {'include_usage': true}", "stream_options")
    if options and not body.get("stream", False):
        raise invalid("stream_options is only allowed with stream: true", "stream_options")
    limits = {body[n] for n in ("max_tokens", "max_completion_tokens") if n in body}
    if len(limits) > 1:
        raise invalid("max_tokens and max_completion_tokens disagree; send one", "max_tokens")
    params: dict[str, Any] = {"mode": "tokens"}
    params.update({v2: body[name] for name, (v2, _) in _MAPPED.items() if name in body})
    if isinstance(params.get("stop"), str):
        # an OpenAI stop string is literal: as a list of one, the V2 reading of a JSON list
        # in a string ('["l"]', which gRPC parameters need) cannot split it
        params["stop"] = [params["stop"]]
    n = body.get("n", 1)
    _check_type("n", n, _INT)
    if not 1 <= n <= MAX_CHOICES:
        raise invalid(f"n must be between 1 and {MAX_CHOICES}, got {n}", "n")
    if n > 1 and isinstance(body.get("seed"), int) and body["seed"] + n - 1 >= 2**63:
        raise invalid(
            f"seed {body['seed']} with n={n}: choice i uses seed + i, which must fit in int64",
            "seed",
        )
    logprobs = _chat_logprobs(body) if chat else _completion_logprobs(body)
    constraint = _response_format(body.get("response_format")) if chat else None
    tools = parse_tools(body) if chat else None
    if tools is not None and tools.must_call:
        if constraint is not None:
            raise invalid(
                "a required tool call and a response_format schema cannot both hold the "
                "answer: send one",
                "response_format",
            )
        constraint = tools.grammar
    call_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    item = messages_input(body) if chat else _prompt_input(body)
    return Call(
        chat=chat,
        id=call_id,
        model=model,
        created=int(time.time()),
        stream=body.get("stream", False),
        include_usage=options.get("include_usage", False),
        logprobs=logprobs,
        grammar=constraint,
        tools=tools,
        payloads=tuple(
            InferenceRequest(
                id=call_id if n == 1 else f"{call_id}-{index}",
                inputs=[item],
                parameters=Parameters(**_choice(params, index)),
            )
            for index in range(n)
        ),
    )


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    """Chat: ``logprobs`` true asks for them, ``top_logprobs`` (0 to 20) for alternatives."""
    wanted = body.get("logprobs", False)
    _check_type("logprobs", wanted, _BOOL)
    top = body.get("top_logprobs")
    if top is None:
        return 0 if wanted else None
    _check_type("top_logprobs", top, _INT)
    if not wanted:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise invalid(
            f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {top}", "top_logprobs"
        )
    return top


def _response_format(value: Any) -> str | None:
    """The grammar a chat's answer must follow: none for text, any JSON object for
    ``json_object`` (or the schema in its ``value``, as huggingface_hub sends it, TGI's
    form), the schema of ``json_schema``."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise invalid("response_format must be like {'type': 'json_object'}", "response_format")
    kind, known = value["type"], {"text": {"type"}, "json_object": {"type", "value"}}
    known["json_schema"] = {"type", "json_schema"}
    if kind not in known or set(value) - known[kind]:
        raise invalid(
            f"response_format {show(value)} is not one of type text, json_object (an optional "
            "schema in 'value') and json_schema (with 'json_schema': {'name', 'schema'})",
            "response_format",
        )
    if kind == "text":
        return None
    if kind == "json_object":
        schema = value.get("value", ANY_OBJECT)
    else:
        spec = value.get("json_schema")
        fields = {"name", "schema", "strict", "description"}
        if not isinstance(spec, dict) or set(spec) - fields or "schema" not in spec:
            raise invalid(
                "response_format.json_schema must be like {'name': ..., 'schema': {...}, "
                "'strict': true}",
                "response_format",
            )
        schema = spec["schema"]
    try:
        return grammar(schema)
    except InvalidRequest as error:
        raise invalid(error.message, "response_format") from None


def _completion_logprobs(body: dict[str, Any]) -> int | None:
    """Completions: ``logprobs`` N (0 to 5) asks for them and for N alternatives."""
    top = body.get("logprobs")
    if top is None:
        return None
    _check_type("logprobs", top, _INT)
    if not 0 <= top <= MAX_COMPLETION_LOGPROBS:
        raise invalid(
            f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {top}", "logprobs"
        )
    return top


def _choice(params: dict[str, Any], index: int) -> dict[str, Any]:
    """Choice ``index``'s parameters: with a seed, its own (seed + index), so that each
    choice is what the same request with that seed and ``n`` 1 generates."""
    if index == 0 or "seed" not in params:
        return params
    return {**params, "seed": params["seed"] + index}


def _check_fields(body: dict[str, Any], chat: bool) -> None:
    known = _HARMLESS | _COMMON | _OWN[chat]
    for name, value in body.items():
        refused = _REFUSED[chat].get(name)
        if refused is not None:
            if not any(type(value) is type(n) and value == n for n in refused.neutral):
                raise invalid(
                    f"{name}={show(value)} is not supported: {refused.reason}",
                    name,
                    "unsupported_parameter",
                )
        elif name not in known:
            raise invalid(
                f"unrecognized request argument {name!r}: ignoring it could change the "
                "answer, so it is refused (docs/openai.md lists the fields this server reads)",
                name,
                "unknown_parameter",
            )


def _check_type(name: str, value: Any, want: str) -> None:
    if want == _BOOL:
        ok = isinstance(value, bool)
    elif isinstance(value, bool):
        ok = False
    else:
        ok = isinstance(value, int if want == _INT else int | float)
    if not ok:
        raise invalid(f"{name} must be {want}, got {show(value)}", name)


def text_input(name: str, text: str) -> RequestInput:
    return RequestInput(name=name, datatype="BYTES", shape=[1], data=[text])


def messages_input(body: dict[str, Any]) -> RequestInput:
    """The body's ``messages`` as the V2 ``messages`` input (checked by the runtime)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list of messages", "messages")
    # a message echoed back from a response carries nulls (refusal, tool_calls, ...): absent
    chat = [
        {k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
        for m in messages
    ]
    # the runtime checks each message and renders the chat with the model's template
    return text_input("messages", json.dumps(chat, ensure_ascii=False))


def _prompt_input(body: dict[str, Any]) -> RequestInput:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return text_input("prompt", prompt)
    if isinstance(prompt, list) and prompt and all(type(i) is int for i in prompt):
        return RequestInput(name="input_ids", datatype="INT64", shape=[len(prompt)], data=prompt)
    if isinstance(prompt, list) and prompt and not any(isinstance(i, str | list) for i in prompt):
        wrong = next(i for i in prompt if type(i) is not int)
        raise invalid(f"prompt token ids must be integers, got {show(wrong)}", "prompt")
    raise invalid(
        "prompt must be one string or one list of token ids (several prompts in one request "
        f"are not supported: send one request each), got {show(prompt)}",
        "prompt",
    )


async def json_body(request: Request) -> dict[str, Any]:
    try:
        raw = await request.body()
    except (OSError, EOFError, zlib.error) as exc:  # a gzip body that is not gzip
        raise invalid(f"the request body cannot be read: {str(exc)[:120]}", None) from None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise invalid(f"the request body is not valid JSON: {str(exc)[:120]}", None) from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None)
    return body
