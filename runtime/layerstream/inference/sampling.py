"""Each sampling request draws from a random stream of its own, while others sample too.

transformers samples with torch's process-wide generator (``torch.multinomial`` without a
``generator``). Requests generate concurrently (engine/sweeps.py), so their draws would
interleave and a seeded request's tokens would depend on its neighbours. Each request keeps
its own generator state instead and swaps it in for its draw: a logits processor of ours
takes the lock and installs the request's state (transformers' warpers and its draw come
next); a stopping criterion (the first code of ours after the draw) saves the state and
lets the lock go. No model forward runs in between, so holding the lock never waits for a
block.

The draws are those of ``torch.manual_seed(seed)`` followed by ``generate`` alone: the
same generator, the same sequence of calls.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from transformers import LogitsProcessor, StoppingCriteria

_GLOBAL_RNG = threading.Lock()


class RequestRandom:
    """The random stream of one request (``seed``: reproducible; None: fresh entropy)."""

    def __init__(self, seed: int | None):
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        self.state = generator.get_state()
        self._held = False

    def take(self) -> None:
        """Install this request's state in torch's generator, for the draw that follows."""
        if self._held:  # a step that never reached its draw (cannot happen in transformers)
            return
        _GLOBAL_RNG.acquire()
        self._held = True
        torch.set_rng_state(self.state)

    def give_back(self) -> None:
        """Keep where the draw left the stream, and let other requests draw."""
        if not self._held:
            return
        self.state = torch.get_rng_state()
        self._held = False
        _GLOBAL_RNG.release()

    @contextlib.contextmanager
    def around(self) -> Iterator[None]:
        """Around a whole generate: the lock never outlives it, whatever happens in it."""
        try:
            yield
        finally:
            self.give_back()


class TakeRandom(LogitsProcessor):
    def __init__(self, stream: RequestRandom):
        self.stream = stream

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.stream.take()
        return scores


class GiveRandomBack(StoppingCriteria):
    def __init__(self, stream: RequestRandom):
        self.stream = stream

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs
    ) -> torch.BoolTensor:
        self.stream.give_back()
        return torch.zeros((input_ids.shape[0],), dtype=torch.bool)
