"""The fully loaded transformers model behind a served fixture model: what every streamed
answer is compared with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer


class Reference:
    """The fully loaded transformers model and tokenizer behind a served model."""

    def __init__(self, chunked):
        self.model = chunked.resident()
        self.tokenizer = AutoTokenizer.from_pretrained(chunked.store)

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def generate(self, ids: list[int], max_new_tokens: int, **kwargs: Any) -> list[int]:
        tensor = torch.tensor([ids])
        with torch.no_grad():
            out = self.model.generate(
                tensor,
                attention_mask=torch.ones_like(tensor),
                max_new_tokens=max_new_tokens,
                **kwargs,
            )
        return out[0, len(ids) :].tolist()

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        return self.generate(ids, max_new_tokens, do_sample=False)

    def sample(self, ids: list[int], max_new_tokens: int, seed: int, **kwargs: Any) -> list[int]:
        torch.manual_seed(seed)
        return self.generate(ids, max_new_tokens, do_sample=True, **kwargs)

    def finish_reason(self, new_ids: list[int], max_new_tokens: int) -> str:
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if new_ids and new_ids[-1] in eos_ids:
            return "stop"
        assert len(new_ids) == max_new_tokens
        return "length"

    def forward(self, ids: list[int]):
        """Base-model outputs with every hidden state (``resident.model`` for causal LMs)."""
        base = getattr(self.model, "model", self.model)
        with torch.no_grad():
            return base(torch.tensor([ids]), output_hidden_states=True)

    def hidden_states(self, ids: list[int]) -> list[np.ndarray]:
        return [h[0].numpy() for h in self.forward(ids).hidden_states]


def reference_lookup(chunked: dict, sources: dict[str, str]) -> Callable[[str], Reference]:
    """``get(name)``: the Reference of the served model ``name`` (``chunked[name]``), one per
    source model (``sources[name]``): two served models of one source share it."""
    cache: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if sources[name] not in cache:
            cache[sources[name]] = Reference(chunked[name])
        return cache[sources[name]]

    return get
