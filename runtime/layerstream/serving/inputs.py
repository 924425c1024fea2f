"""The request's one input tensor: ``prompt`` (BYTES, one UTF-8 string), ``messages`` (BYTES,
one JSON string: a chat, ``[{"role": ..., "content": ...}, ...]``, rendered with the model's
chat template) or ``input_ids`` (INT64, one sequence of token ids).

Checked as sent, never repaired: a shape that disagrees with its data, ids sent as floats
(``fp32_contents``, or ``1.0`` under INT64), a ``null`` or non-string prompt, bytes that are
not UTF-8 are errors that name the input, not values to round or guess at. A prompt longer
than the model's byte limit is rejected before anything tokenizes it (see prompts.py).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

from mlserver.types import InferenceRequest, RequestInput

from ..errors import InvalidRequest
from ..inference.prompts import PromptLimit

PROMPT, MESSAGES, INPUT_IDS = "prompt", "messages", "input_ids"
INPUTS = (PROMPT, MESSAGES, INPUT_IDS)
ID_DATATYPES = ("INT64", "INT32")
_HOW = (
    "send one of 'prompt' (BYTES, one UTF-8 string), 'messages' (BYTES, one JSON string: "
    '[{"role": "user", "content": "..."}]) or \'input_ids\' (INT64, token ids)'
)
# the keys a chat message may have: what every chat template reads, and the tool calls of an
# assistant's turn and the call a tool's answer is for, which templates with tools read
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")
# The roles chat templates know (OpenAI's, and Llama 3.1's ipython). Templates build a
# turn's header from the role ("<|{{ role }}|>"), so a free-form role could spell a control
# token ("eos") that no sanitizing of the content can see.
ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")


def the_input(payload: InferenceRequest) -> RequestInput:
    """The one input of a request, or an error that says what is missing or doubled."""
    names = [item.name for item in payload.inputs]
    if not names:
        raise InvalidRequest(f"the request has no inputs; {_HOW}")
    doubled = sorted(name for name, count in Counter(names).items() if count > 1)
    if doubled:
        times = names.count(doubled[0])
        raise InvalidRequest(f"input {doubled[0]!r} appears {times} times; {_HOW}")
    unknown = [name for name in names if name not in INPUTS]
    if unknown:
        raise InvalidRequest(f"unknown input {unknown[0]!r}; {_HOW}")
    if len(names) == 2:
        raise InvalidRequest(f"send {names[0]!r} or {names[1]!r}, not both")
    if len(names) > 2:
        raise InvalidRequest(f"send one input, not {len(names)}; {_HOW}")
    return payload.inputs[0]


def element_count(item: RequestInput) -> int:
    """The element count the input's shape declares."""
    shape = list(item.shape)
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise InvalidRequest(
            f"input {item.name!r} has shape {shape}; dimensions must be integers >= 0"
        )
    return math.prod(shape)


def flat_data(item: RequestInput) -> list[Any]:
    """The input's values, flattened (V2 JSON allows ``[[1, 2, 3]]`` for shape [1, 3])."""
    data = item.data.root if hasattr(item.data, "root") else item.data
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        value = next(stack[-1], _END)
        if value is _END:
            stack.pop()
        elif isinstance(value, list):
            stack.append(iter(value))
        else:
            out.append(value)
    return out


_END = object()


def _check_count(item: RequestInput, values: list[Any]) -> None:
    declared = element_count(item)
    if declared != len(values):
        raise InvalidRequest(
            f"input {item.name!r} has shape {list(item.shape)} ({declared} values) but "
            f"carries {len(values)}; the shape must match the data"
        )


def prompt_text(item: RequestInput, limit: PromptLimit | None) -> str:
    """The prompt string of a ``prompt`` input, checked against ``limit`` (UTF-8 bytes)
    before it is decoded or tokenized."""
    return _one_string(item, limit)


def chat_messages(item: RequestInput, limit: PromptLimit | None) -> list[dict[str, str]]:
    """The chat of a ``messages`` input: one JSON string holding a list of messages, each
    ``{"role": str, "content": str}`` (and optionally ``"name"``). A content given as
    OpenAI-style parts (``[{"type": "text", "text": ...}]``) is joined into one string;
    any other part is refused (the model reads text). The JSON's size counts against the
    prompt limit before it is parsed."""
    text = _one_string(item, limit)
    try:
        chat = json.loads(text)
    except (ValueError, RecursionError) as exc:  # also an integer of more than 4300 digits
        raise InvalidRequest(f"input 'messages' is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(chat, list) or not chat:
        raise InvalidRequest(
            'input \'messages\' must be a non-empty JSON list: [{"role": "user", "content": "..."}]'
        )
    return [_message(i, message) for i, message in enumerate(chat)]


def _message(index: int, message: Any) -> dict[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequest(f"{where} must be an object with 'role' and 'content'")
    unknown = sorted(set(message) - set(MESSAGE_KEYS))
    if unknown:
        raise InvalidRequest(
            f"{where} has unsupported key(s) {', '.join(map(repr, unknown))}; a message has "
            f"{', '.join(MESSAGE_KEYS)}"
        )
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise InvalidRequest(f"{where}.role must be one of {', '.join(ROLES)}, got {_shown(role)}")
    if content is None and "tool_calls" in message:
        content = ""  # an assistant's turn that only calls tools
    if isinstance(content, list):
        content = _joined_parts(where, content)
    if not isinstance(content, str):
        raise InvalidRequest(f"{where}.content must be a string, got {_shown(content)}")
    out: dict[str, Any] = {"role": role, "content": unicode_text(f"{where}.content", content)}
    for key in ("name", "tool_call_id"):
        if key in message:
            if not isinstance(message[key], str):
                raise InvalidRequest(f"{where}.{key} must be a string, got {_shown(message[key])}")
            out[key] = unicode_text(f"{where}.{key}", message[key])
    if "tool_calls" in message:
        if role != "assistant":
            raise InvalidRequest(f"{where}.tool_calls is for an assistant's turn, not {role!r}")
        out["tool_calls"] = [
            _tool_call(f"{where}.tool_calls[{i}]", call)
            for i, call in enumerate(_list(f"{where}.tool_calls", message["tool_calls"]))
        ]
    return out


def _list(where: str, value: Any) -> list:
    if not isinstance(value, list):
        raise InvalidRequest(f"{where} must be a list, got {_shown(value)}")
    return value


def _tool_call(where: str, call: Any) -> dict[str, Any]:
    """An OpenAI tool call echoed back (``{"id", "type": "function", "function": {"name",
    "arguments"}}``), its arguments as the object templates render (OpenAI sends them as a
    JSON string)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequest(f"{where} must be like {{'function': {{'name', 'arguments'}}}}")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError):
            raise InvalidRequest(f"{where}.function.arguments is not JSON") from None
    if not isinstance(arguments, dict):
        raise InvalidRequest(f"{where}.function.arguments must be a JSON object")
    try:  # a lone surrogate (which JSON can spell) is not text
        json.dumps(arguments, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{where}.function.arguments holds text that is not UTF-8") from None
    out: dict[str, Any] = {
        "type": "function",
        "function": {
            "name": unicode_text(f"{where}.function.name", function["name"]),
            "arguments": arguments,
        },
    }
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def unicode_text(what: str, text: str) -> str:
    """``text``, if it is Unicode text: a lone UTF-16 surrogate (JSON can spell one,
    ``"\\ud800"``) is not, and would fail in the tokenizer instead of here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            f"{what} is not valid Unicode: a lone surrogate {text[exc.start]!r} at character "
            f"{exc.start}"
        ) from None
    return text


def _joined_parts(where: str, parts: list[Any]) -> str:
    if not parts:  # OpenAI refuses it too: not the empty text it would join to
        raise InvalidRequest(f"{where}.content is an empty list of parts; send a string")
    texts = []
    for part in parts:
        if not (isinstance(part, dict) and part.get("type") == "text"):
            raise InvalidRequest(
                f"{where}.content holds a part that is not text ({_shown(part)}); this "
                "model reads text parts only"
            )
        if not isinstance(part.get("text"), str):
            raise InvalidRequest(f"{where}.content has a text part without a string 'text'")
        texts.append(part["text"])
    return "".join(texts)


def _shown(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"[:60]


def _one_string(item: RequestInput, limit: PromptLimit | None) -> str:
    """The one string a BYTES input holds: checked against ``limit`` before it is decoded,
    UTF-8, not blank."""
    name = item.name
    if item.datatype != "BYTES":
        raise InvalidRequest(f"input {name!r} must have datatype BYTES, not {item.datatype}")
    content_type = item.parameters.content_type if item.parameters else None
    if content_type not in (None, "str"):
        # MLServer's codecs would read "base64" etc. differently; the text is taken as sent
        raise InvalidRequest(
            f"input {name!r} has content_type {content_type!r}; send the text itself "
            "(content_type 'str', or none)"
        )
    if element_count(item) != 1:
        raise InvalidRequest(
            f"input {name!r} must hold one string (shape [1]), not shape {list(item.shape)}"
        )
    values = flat_data(item)
    if len(values) != 1:
        raise InvalidRequest(f"input {name!r} must hold one string, not {len(values)}")
    (value,) = values
    if not isinstance(value, str | bytes):
        raise InvalidRequest(f"input {name!r} must hold a string, got {_shown(value)}")
    if limit is not None:
        _check_prompt_size(name, value, limit)
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")  # valid UTF-8 holds no lone surrogate
        except UnicodeDecodeError as exc:
            raise InvalidRequest(
                f"input {name!r} is not valid UTF-8 (byte {value[exc.start]:#04x} at offset "
                f"{exc.start}); send it as UTF-8 text"
            ) from None
    else:
        unicode_text(f"input {name!r}", value)
    if not value.strip():
        raise InvalidRequest(f"input {name!r} is empty")
    return value


def _check_prompt_size(name: str, value: str | bytes, limit: PromptLimit) -> None:
    # A str of n characters is n..4n bytes in UTF-8: encode only when that range straddles
    # the limit, so a huge prompt is rejected without a copy of it.
    low = len(value)
    high = low if isinstance(value, bytes) else 4 * low
    if high <= limit.max_bytes:
        return
    if isinstance(value, bytes) or low <= limit.max_bytes:
        size = low if isinstance(value, bytes) else len(value.encode("utf-8", "surrogatepass"))
        if size <= limit.max_bytes:
            return
        what = f"is {size} bytes"
    else:
        # characters, each at least one byte: no need to count the bytes themselves
        what = f"is at least {low} bytes (UTF-8)"
    raise InvalidRequest(
        f"input {name!r} {what}, over this model's limit of {limit.max_bytes} bytes "
        f"({limit.reason}); shorten the prompt"
    )


def token_ids(item: RequestInput, vocab_size: int, context_length: int | None) -> list[int]:
    """The ids of an ``input_ids`` input: integers (never floats) inside the vocabulary."""
    if item.datatype not in ID_DATATYPES:
        raise InvalidRequest(
            f"input 'input_ids' must have datatype INT64 (or INT32), not {item.datatype}"
        )
    shape = list(item.shape)
    if len(shape) > 2 or (len(shape) == 2 and shape[0] != 1):
        raise InvalidRequest(f"input 'input_ids' must have shape [n] or [1, n], not {shape}")
    if context_length is not None and element_count(item) > context_length:
        # cheap, before the values are looked at one by one
        raise InvalidRequest(
            f"prompt of {element_count(item)} tokens exceeds the model's context of "
            f"{context_length} tokens; shorten the prompt"
        )
    values = flat_data(item)
    _check_count(item, values)
    if not values:
        raise InvalidRequest("input 'input_ids' is empty")
    wrong = next((v for v in values if type(v) is not int), _END)
    if wrong is not _END:
        raise InvalidRequest(
            f"input 'input_ids' must hold integers, got {type(wrong).__name__} {wrong!r}; "
            "send ids as int64 (int64_contents over gRPC, JSON integers over REST), never floats"
        )
    bad = [i for i in values if not 0 <= i < vocab_size]
    if bad:
        raise InvalidRequest(f"input_ids {bad[:5]} are outside the vocabulary 0..{vocab_size - 1}")
    return values
