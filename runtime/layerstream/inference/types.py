"""What a request produces, independent of MLServer: the runtime encodes these as responses."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str  # the decoded text this token adds (may be "" while a character is incomplete)


@dataclass(frozen=True)
class HiddenStateEvent:
    layer: int  # the index into transformers' own output_hidden_states for this model
    hidden_state: np.ndarray  # float32 [seq, hidden]


@dataclass
class FinalEvent:
    finish_reason: str  # "stop" | "length" | "error"
    stats: dict[str, int] = field(default_factory=dict)
    text: str = ""  # text held back while it could have begun a stop string
    embedding: np.ndarray | None = None  # float32 [hidden]
    error: str | None = None
