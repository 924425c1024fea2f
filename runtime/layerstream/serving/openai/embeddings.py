"""``POST /embeddings``: the ``embedding`` mode of the V2 path, in OpenAI's shape.

Each input is a V2 request of its own (``mode`` "embedding"), so it is validated, queued,
counted and logged as every request is, and its vector is the V2 answer's, bit for bit.
The pooling is the V2 default (mean over the prompt's tokens) unless the body's ``pooling``
(an extension, as vLLM's are: the client's ``extra_body``) names another.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import numpy as np
import pydantic
from mlserver.types import InferenceRequest, Parameters, RequestInput

from ...inference.types import Event, FinalEvent
from .body import validated
from .completions import all_of, collect
from .errors import invalid

# OpenAI's own limit on the inputs of one request
MAX_INPUTS = 2048

Ids = list[pydantic.StrictInt]


class EmbeddingsBody(pydantic.BaseModel):
    """What ``POST /embeddings`` reads; any other field is refused (it could change the
    answer), nulls read as absent."""

    model_config = pydantic.ConfigDict(extra="forbid")

    model: Any = None  # which model: the route's to read (models.py)
    input: pydantic.StrictStr | list[pydantic.StrictStr] | Ids | list[Ids]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: pydantic.StrictInt | None = None
    user: pydantic.StrictStr | None = None
    pooling: pydantic.StrictStr | None = None  # an extension: mean, cls, last, pooler

    def items(self) -> list[RequestInput]:
        """One V2 input per embedding asked for."""
        value = self.input
        batch = value if isinstance(value, list) and value and not _is_ids(value) else [value]
        if not batch or len(batch) > MAX_INPUTS:
            raise invalid(f"input must hold 1 to {MAX_INPUTS} inputs, got {len(batch)}", "input")
        out = []
        for item in batch:
            if isinstance(item, str):
                if not item:
                    raise invalid("input must not hold an empty string", "input")
                out.append(RequestInput(name="prompt", datatype="BYTES", shape=[1], data=[item]))
            else:
                if not item:
                    raise invalid("input must not hold an empty list of token ids", "input")
                out.append(
                    RequestInput(name="input_ids", datatype="INT64", shape=[len(item)], data=item)
                )
        return out


def _is_ids(value: list) -> bool:
    return all(isinstance(i, int) for i in value)


def parse_embeddings(body: dict[str, Any], hidden_size: int | None) -> EmbeddingsBody:
    parsed = validated(EmbeddingsBody, body)
    if parsed.dimensions is not None and parsed.dimensions != hidden_size:
        raise invalid(
            f"dimensions={parsed.dimensions} is not supported: this model's embeddings have "
            f"{hidden_size} dimensions and are not truncated",
            "dimensions",
            "unsupported_parameter",
        )
    return parsed


def payloads(parsed: EmbeddingsBody) -> list[InferenceRequest]:
    params: dict[str, Any] = {"mode": "embedding"}
    if parsed.pooling is not None:
        params["pooling"] = parsed.pooling
    call = uuid.uuid4().hex
    return [
        InferenceRequest(id=f"embd-{call}-{i}", inputs=[item], parameters=Parameters(**params))
        for i, item in enumerate(parsed.items())
    ]


async def all_finals(streams: list[AsyncIterator[Event]], at_once: int) -> list[FinalEvent]:
    """Every input's final event, ``at_once`` inputs in the model's queue at a time (a batch
    of thousands would fill the queue, refusing its own inputs and every other client's);
    the first failure fails the request (the others stop)."""
    gate = asyncio.Semaphore(max(at_once, 1))

    async def one(stream: AsyncIterator[Event]) -> FinalEvent:
        async with gate:
            _, final, _ = await collect(stream)
            return final

    return await all_of([one(stream) for stream in streams])


def answer(parsed: EmbeddingsBody, model: str, finals: list[FinalEvent]) -> dict[str, Any]:
    data = []
    for index, final in enumerate(finals):
        vector = np.asarray(final.embedding, dtype=np.float32)
        if parsed.encoding_format == "base64":  # little-endian float32, as OpenAI sends it
            encoded: Any = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
        else:
            encoded = vector.tolist()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(final.stats.prompt_tokens for final in finals)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
