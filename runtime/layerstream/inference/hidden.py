"""Hidden states, each sent as soon as the module call that produces it has run.

1. A request runs the base model with ``output_hidden_states=True``; hooks on the modules
   the layout names (layout.py) take each selected state when its module call runs, and
   states go out in index order as soon as all the selected ones before them have gone.
2. When the forward ends, every state sent early must be the very tensor transformers
   returns at its index, with the same values: otherwise the request fails (an error,
   never a silently wrong state). The selected states without a source are taken from
   transformers' tuple itself, so every value sent is transformers' own.

The final event carries the pooled embedding (embedding.py).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from ..engine.engine import Engine
from ..errors import LayerStreamError
from .embedding import as_array, embedded
from .layout import HiddenLayout, hidden_layout, on_calls, value_at
from .request import Request
from .types import Cancelled, Emit, FinalEvent, HiddenStateEvent


class _StateStream:
    """Takes the selected states as their module calls run; sends them in index order."""

    def __init__(self, layout: HiddenLayout, layers: list[int], emit: Emit):
        self.layout = layout
        self.wanted = sorted(set(layers))  # each state once, in index order
        self.emit = emit
        self.taken: dict[int, tuple[torch.Tensor, np.ndarray]] = {}
        self.early: set[int] = set()
        self.sent = 0  # how many of ``wanted`` have gone out
        self.by_call: dict[tuple[str, int, bool], list[int]] = {}
        for k in self.wanted:
            source = layout.sources[k]
            if source is not None:
                self.by_call.setdefault((source.module, source.call, source.output), []).append(k)

    def hooks(self, base: nn.Module) -> contextlib.AbstractContextManager[None]:
        names: dict[str, tuple[bool, bool]] = {}
        for module, _, output in self.by_call:
            inputs, outputs = names.get(module, (False, False))
            names[module] = (inputs or not output, outputs or output)
        return on_calls(base, names, self._seen)

    def _seen(self, name: str, call: int, output: bool, value: object) -> None:
        for k in self.by_call.get((name, call, output), ()):
            source = self.layout.sources[k]
            assert source is not None
            try:
                tensor = value_at(value, source.path)
            except (KeyError, IndexError, TypeError):
                tensor = None
            if not isinstance(tensor, torch.Tensor):
                raise LayerStreamError(
                    f"hidden state {k} was expected at the {source.describe()}, which holds "
                    f"{type(tensor).__name__}; this model's hidden states cannot be streamed "
                    "layer by layer: please report it"
                )
            self.taken[k] = (tensor, as_array(tensor))
            self.early.add(k)
        self._flush()

    def _flush(self) -> None:
        while self.sent < len(self.wanted) and self.wanted[self.sent] in self.taken:
            k = self.wanted[self.sent]
            self.emit(HiddenStateEvent(layer=k, hidden_state=self.taken[k][1]))
            self.sent += 1

    def finish(self, states: tuple[torch.Tensor, ...] | None) -> None:
        """Check what was sent early against transformers' own tuple; send the rest."""
        if states is None or len(states) != self.layout.count:
            got = "none" if states is None else len(states)
            raise LayerStreamError(
                f"the model returned {got} hidden states where its meta pass returned "
                f"{self.layout.count}; please report it"
            )
        for k in sorted(self.early):
            tensor, sent = self.taken[k]
            if states[k] is not tensor or not np.array_equal(
                as_array(states[k]), sent, equal_nan=True
            ):
                source = self.layout.sources[k]
                assert source is not None
                raise LayerStreamError(
                    f"hidden state {k} sent from the {source.describe()} is not the one "
                    "transformers returned at that index; discard the states of this "
                    "request and please report it"
                )
        for k in self.wanted:
            if k not in self.taken:
                self.taken[k] = (states[k], as_array(states[k]))
        self._flush()


def run_hidden_states(
    engine: Engine,
    request: Request,
    input_ids: list[int],
    emit: Emit,
    cancelled: Cancelled,
) -> FinalEvent:
    """One forward pass of the base model; stream the selected layers, return the last event."""
    base = engine.model.base_model
    ids = torch.tensor([input_ids], dtype=torch.long)
    stream = _StateStream(hidden_layout(engine), request.layers, emit)
    with engine.request(cancelled) as ctx, stream.hooks(base):
        output = base(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    stream.finish(output.hidden_states)
    return embedded(output, request.pooling, ctx, len(input_ids))
