"""``POST /tokenize`` and ``POST /detokenize``, in the shape vLLM's server gives them.

``/tokenize`` returns the ids the model is given for a prompt (special tokens included) or a
chat (rendered with the model's template, the assistant's turn opened), checked as a request
with that prompt would be (its size, before anything tokenizes it): the same ids a
completion of it starts from. ``/detokenize`` returns the text of ids.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

import pydantic
from mlserver.types import InferenceRequest, Parameters

from .body import messages_input, text_input, validated
from .errors import invalid


class TokenizeBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    model: Any = None  # which model: the route's to read (models.py)
    prompt: pydantic.StrictStr | None = None
    messages: list[Any] | None = None
    # the ids are those the model is given: special tokens added, a chat's turn opened
    add_special_tokens: Literal[True] = True
    add_generation_prompt: Literal[True] = True


class DetokenizeBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    model: Any = None
    tokens: list[pydantic.StrictInt]


def tokenize_payload(body: dict[str, Any], mode: str) -> InferenceRequest:
    """The V2 request whose prompt is tokenized (it is checked, never run), in the model's
    default ``mode``."""
    parsed = validated(TokenizeBody, body)
    if (parsed.prompt is None) == (parsed.messages is None):
        raise invalid("send one of prompt (a string) and messages (a chat)", "prompt")
    if parsed.prompt is not None:
        item = text_input("prompt", parsed.prompt)
    else:
        item = messages_input({"messages": parsed.messages})
    return InferenceRequest(
        id=f"tokenize-{uuid.uuid4().hex}",
        inputs=[item],
        parameters=Parameters(mode=mode, **({"max_new_tokens": 1} if mode == "tokens" else {})),
    )


def detokenize_ids(body: dict[str, Any]) -> list[int]:
    return validated(DetokenizeBody, body).tokens
