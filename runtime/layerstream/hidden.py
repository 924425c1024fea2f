"""Hidden states, one event per selected layer, sent as soon as that layer has run.

Index k follows transformers' ``output_hidden_states``: 0 is the input of the first block
(the embeddings output), k is the output of block k-1, and the last index is the model's
final hidden state (after the final norm, where the model has one), sent when the forward
pass ends. The final event carries the pooled embedding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch

from .engine import Engine
from .events import FinalEvent, HiddenStateEvent
from .generation import Emit, request_stats
from .protocol import Request


def _as_array(hidden: torch.Tensor) -> np.ndarray:
    # [1, seq, hidden] -> float32 [seq, hidden]; gRPC cannot encode fp16/bf16 contents.
    return hidden[0].detach().to(torch.float32).numpy().copy()


@contextlib.contextmanager
def _first_block_input(engine: Engine, on_input: Callable[[torch.Tensor], None]) -> Iterator[None]:
    def hook(module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        on_input(hidden)

    block = engine.model.get_submodule(engine.prefixes[0])
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def pool(last_hidden: torch.Tensor, pooling: str, pooler_output: torch.Tensor | None) -> np.ndarray:
    if pooling == "pooler":
        assert pooler_output is not None  # protocol.py only allows "pooler" when there is one
        return pooler_output[0].to(torch.float32).numpy().copy()
    states = last_hidden[0].to(torch.float32)
    if pooling == "cls":
        return states[0].numpy().copy()
    if pooling == "last":
        return states[-1].numpy().copy()
    return states.mean(dim=0).numpy().copy()


def run_hidden_states(
    engine: Engine,
    request: Request,
    input_ids: list[int],
    emit: Emit,
    cancelled: Callable[[], bool],
) -> FinalEvent:
    """One forward pass of the base model; stream the selected layers, return the last event."""
    wanted = set(request.layers) if request.mode == "hidden_states" else set()
    last = len(engine.prefixes)
    sent: set[int] = set()

    def send(layer: int, hidden: torch.Tensor) -> None:
        if layer in wanted and layer not in sent:
            sent.add(layer)
            emit(HiddenStateEvent(layer=layer, hidden_state=_as_array(hidden)))

    ids = torch.tensor([input_ids], dtype=torch.long)
    with (
        engine.request(cancelled) as scope,
        _first_block_input(engine, lambda h: send(0, h)),
        # block j's output is hidden state j+1; the last one is taken after the final norm
        engine.capture_block_outputs(lambda j, h: send(j + 1, h) if j + 1 < last else None),
    ):
        output = engine.model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids))
    send(last, output.last_hidden_state)
    embedding = pool(
        output.last_hidden_state, request.pooling, getattr(output, "pooler_output", None)
    )
    final = FinalEvent(finish_reason="stop", embedding=embedding)
    final.stats = request_stats(scope, len(input_ids), 0, None)
    return final
