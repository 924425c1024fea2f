"""Embeddings: one forward pass of the base model, its last hidden state pooled.

hidden_states requests end the same way (hidden.py): their final event carries the pooled
embedding too.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.modeling_outputs import ModelOutput

from ..engine.engine import Engine, RequestContext
from .request import Request
from .types import Cancelled, Emit, FinalEvent, FinishReason, Pooling, RequestStats


def as_array(hidden: torch.Tensor) -> np.ndarray:
    """[1, seq, hidden] -> float32 [seq, hidden]; gRPC cannot encode fp16/bf16 contents."""
    return hidden[0].detach().to(torch.float32).numpy().copy()


def pool(
    last_hidden: torch.Tensor, pooling: Pooling, pooler_output: torch.Tensor | None
) -> np.ndarray:
    if pooling is Pooling.POOLER:
        assert pooler_output is not None  # the protocol allows "pooler" only when there is one
        return pooler_output[0].to(torch.float32).numpy().copy()
    states = last_hidden[0].to(torch.float32)
    if pooling is Pooling.CLS:
        return states[0].numpy().copy()
    if pooling is Pooling.LAST:
        return states[-1].numpy().copy()
    return states.mean(dim=0).numpy().copy()


def embedded(
    output: ModelOutput, pooling: Pooling, ctx: RequestContext, prompt_tokens: int
) -> FinalEvent:
    """The final event of a base-model forward: its pooled embedding and the stats."""
    # pooler_output: only models with a pooler head return one
    pooler_output = output.get("pooler_output")
    embedding = pool(output.last_hidden_state, pooling, pooler_output)
    stats = RequestStats.measure(ctx, prompt_tokens)
    return FinalEvent(finish_reason=FinishReason.STOP, stats=stats, embedding=embedding)


def run_embedding(
    engine: Engine,
    request: Request,
    input_ids: list[int],
    emit: Emit,
    cancelled: Cancelled,
) -> FinalEvent:
    """One forward pass of the base model; the pooled embedding is the only event."""
    del emit  # nothing streams before the final event
    ids = torch.tensor([input_ids], dtype=torch.long)
    with engine.request(cancelled) as ctx:
        output = engine.model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return embedded(output, request.pooling, ctx, len(input_ids))
