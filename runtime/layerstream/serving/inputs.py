"""The request's one input tensor: ``prompt`` (BYTES, one UTF-8 string) or ``input_ids``
(INT64, one sequence of token ids).

Checked as sent, never repaired: a shape that disagrees with its data, ids sent as floats
(``fp32_contents``, or ``1.0`` under INT64), a ``null`` or non-string prompt, bytes that are
not UTF-8 are errors that name the input, not values to round or guess at. A prompt longer
than the model's byte limit is rejected before anything tokenizes it (see prompts.py).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from mlserver.types import InferenceRequest, RequestInput

from ..errors import InvalidRequest
from ..inference.prompts import PromptLimit

PROMPT, INPUT_IDS = "prompt", "input_ids"
ID_DATATYPES = ("INT64", "INT32")
_HOW = "send 'prompt' (BYTES, one UTF-8 string) or 'input_ids' (INT64, token ids)"


def the_input(payload: InferenceRequest) -> RequestInput:
    """The one input of a request, or an error that says what is missing or doubled."""
    names = [item.name for item in payload.inputs]
    if not names:
        raise InvalidRequest(f"the request has no inputs; {_HOW}")
    doubled = sorted(name for name, count in Counter(names).items() if count > 1)
    if doubled:
        times = names.count(doubled[0])
        raise InvalidRequest(f"input {doubled[0]!r} appears {times} times; {_HOW}")
    if set(names) == {PROMPT, INPUT_IDS}:
        raise InvalidRequest("send 'prompt' or 'input_ids', not both")
    unknown = [name for name in names if name not in (PROMPT, INPUT_IDS)]
    if unknown:
        raise InvalidRequest(f"unknown input {unknown[0]!r}; {_HOW}")
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
    if item.datatype != "BYTES":
        raise InvalidRequest(f"input 'prompt' must have datatype BYTES, not {item.datatype}")
    content_type = item.parameters.content_type if item.parameters else None
    if content_type not in (None, "str"):
        # MLServer's codecs would read "base64" etc. differently; the text is taken as sent
        raise InvalidRequest(
            f"input 'prompt' has content_type {content_type!r}; send the text itself "
            "(content_type 'str', or none)"
        )
    if element_count(item) != 1:
        raise InvalidRequest(
            f"input 'prompt' must hold one string (shape [1]), not shape {list(item.shape)}"
        )
    values = flat_data(item)
    if len(values) != 1:
        raise InvalidRequest(f"input 'prompt' must hold one string, not {len(values)}")
    (value,) = values
    if not isinstance(value, str | bytes):
        shown = "null" if value is None else f"{type(value).__name__} {value!r}"
        raise InvalidRequest(f"input 'prompt' must hold a string, got {shown[:60]}")
    if limit is not None:
        _check_prompt_size(value, limit)
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(
                f"input 'prompt' is not valid UTF-8 (byte {value[exc.start]:#04x} at offset "
                f"{exc.start}); send the prompt as UTF-8 text"
            ) from None
    if not value.strip():
        raise InvalidRequest("input 'prompt' is empty")
    return value


def _check_prompt_size(value: str | bytes, limit: PromptLimit) -> None:
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
        what = f"has {low} characters"  # at least as many bytes: no need to count them
    raise InvalidRequest(
        f"input 'prompt' {what}, over this model's limit of {limit.max_bytes} bytes "
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
