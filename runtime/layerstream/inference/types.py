"""What a request produces, independent of MLServer: events, why it ended, and its stats.

serving/encoding.py is the one place that turns these into V2 responses and parameters.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..words import Word

if TYPE_CHECKING:
    from ..engine.engine import RequestContext


class Mode(Word):
    TOKENS = "tokens"
    HIDDEN_STATES = "hidden_states"
    EMBEDDING = "embedding"


class Pooling(Word):
    MEAN = "mean"
    CLS = "cls"
    LAST = "last"
    POOLER = "pooler"  # the model's own pooler head, where it has one


class FinishReason(Word):
    STOP = "stop"  # end of sequence, a stop string, or (hidden states, embedding) done
    LENGTH = "length"  # max_new_tokens reached
    SHUTDOWN = "shutdown"  # the server shut down: the tokens sent so far stand
    ERROR = "error"  # only on the wire: a failed request ends with an error, not an event


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str  # the decoded text this token adds (may be "" while a character is incomplete)
    # where the request asked for them (logprobs.py): the token's log probability under the
    # scores it was chosen from, and the most likely tokens' (id, log probability)
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class HiddenStateEvent:
    layer: int  # the index into transformers' own output_hidden_states for this model
    hidden_state: np.ndarray  # float32 [seq, hidden]


@dataclass(frozen=True)
class RequestStats:
    """What one request cost. Integers only: gRPC parameters keep bool/int/string."""

    prompt_tokens: int
    tokens: int  # generated
    ttft_us: int  # time to first token; 0 when none was generated
    total_us: int
    weight_wait_us: int  # compute waiting for weights to arrive
    compute_us: int  # the rest of total_us
    bytes_streamed: int
    chunks_streamed: int
    resident_runs: int  # block runs served from memory (wire name: cache_hits)
    streamed_runs: int  # block runs that streamed weights (wire name: cache_misses)
    sweeps: int  # passes over the streamed blocks it rode (engine/sweeps.py)
    sweep_sequences: int  # the sequences of those sweeps, summed (/ sweeps: mean sharing)
    # expert streaming: experts its routers chose (summed over its streamed block runs), and
    # the experts read and their bytes while it ran (a part of bytes_streamed)
    experts_routed: int = 0
    experts_read: int = 0
    expert_bytes: int = 0
    # experts read ahead on a guess of the next block's routing, and those its router chose
    experts_predicted: int = 0
    experts_predicted_used: int = 0
    expert_cache_hits: int = 0  # routed experts found in the expert cache, not read

    @classmethod
    def measure(
        cls,
        ctx: RequestContext,
        prompt_tokens: int,
        tokens: int = 0,
        first_token_at: float | None = None,
    ) -> RequestStats:
        """The stats of the engine request ``ctx`` (ended), read now."""
        total_us = int((time.perf_counter() - ctx.started) * 1e6)
        wait_us = int(ctx.stats.wait_s * 1e6)
        return cls(
            prompt_tokens=prompt_tokens,
            tokens=tokens,
            ttft_us=int((first_token_at - ctx.started) * 1e6) if first_token_at else 0,
            total_us=total_us,
            weight_wait_us=wait_us,
            compute_us=max(total_us - wait_us, 0),
            bytes_streamed=ctx.stats.bytes_read,
            chunks_streamed=ctx.stats.chunks_read,
            resident_runs=ctx.stats.resident_runs,
            streamed_runs=ctx.stats.streamed_runs,
            sweeps=ctx.rider.sweeps,
            sweep_sequences=ctx.rider.sweep_sequences,
            experts_routed=ctx.stats.experts_routed,
            experts_read=ctx.stats.experts_read,
            expert_bytes=ctx.stats.expert_bytes,
            experts_predicted=ctx.stats.experts_predicted,
            experts_predicted_used=ctx.stats.experts_predicted_used,
            expert_cache_hits=ctx.stats.expert_cache_hits,
        )


@dataclass(frozen=True)
class FinalEvent:
    finish_reason: FinishReason
    stats: RequestStats
    text: str = ""  # text held back while it could have begun a stop string
    embedding: np.ndarray | None = None  # float32 [hidden]


Event = TokenEvent | HiddenStateEvent | FinalEvent
Emit = Callable[[Event], None]  # hands an event to the request's consumer
# Asked before every block and after every token: True once the consumer has gone (the
# engine then raises RequestCancelled); may itself raise RequestTimeout past the deadline,
# or ShuttingDown once the server's drain is over (a generation then ends with SHUTDOWN).
Cancelled = Callable[[], bool]
