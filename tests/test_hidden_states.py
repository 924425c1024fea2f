"""Hidden states follow transformers' own ``output_hidden_states`` numbering (learned by a
meta-device pass, layout.py), stream while the forward runs, and never go out wrong: a
state that turns out not to be transformers' own ends the request with an error."""

from __future__ import annotations

import functools
import logging

import numpy as np
import pytest
import torch
from conftest import SCALED
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import AutoConfig

from layerstream.engine.engine import Engine, EngineOptions
from layerstream.errors import LayerStreamError
from layerstream.inference import layout as hidden_layouts
from layerstream.inference.capabilities import capabilities
from layerstream.inference.hidden import run_hidden_states
from layerstream.inference.layout import HiddenLayout, LayoutUnknown, learn_layout
from layerstream.inference.request import Request
from layerstream.inference.types import HiddenStateEvent
from layerstream.stores import open_store

PROMPT = [5, 17, 99, 3, 250, 7, 42, 130, 11, 64]
BLOCKS = 12  # every conftest model


@pytest.fixture
def engine(model_factory):
    engine = Engine(
        open_store(str(model_factory("llama", weight_scale=SCALED).store)),
        EngineOptions(memory_budget="25%", read_ahead=1),
    )
    yield engine
    engine.close()


def all_layers(engine: Engine) -> Request:
    return Request(mode="hidden_states", layers=list(range(capabilities(engine).num_layers + 1)))


def test_layout_is_learned_on_the_meta_device(model_factory):
    """No weights and no I/O: only the config. Llama's states: the embeddings' output, each
    block's output, the last replaced by the final norm's."""
    config = AutoConfig.from_pretrained(model_factory("llama").store)
    layout = learn_layout(config, "LlamaForCausalLM", "float32")
    assert layout.count == BLOCKS + 1
    names = [(s.module, s.call, s.output) for s in layout.sources]
    assert names[0] == ("embed_tokens", 0, True)
    assert names[1:BLOCKS] == [(f"layers.{k}", 0, True) for k in range(BLOCKS - 1)]
    assert names[BLOCKS] == ("norm", 0, True)


def test_states_stream_as_their_blocks_finish(engine):
    """State k goes out as soon as the module call producing it has run: the embeddings'
    before any block, block k-1's output before block k starts, the final norm's last."""
    runs_at_emit: list[int] = []
    layers: list[int] = []

    def emit(event: HiddenStateEvent) -> None:
        rider = engine.sweeps.current()  # this request's own block runs (emit is on its thread)
        assert rider is not None
        runs_at_emit.append(rider.resident_runs + rider.streamed_runs)
        layers.append(event.layer)

    run_hidden_states(engine, all_layers(engine), PROMPT, emit, lambda: False)
    assert layers == list(range(BLOCKS + 1))
    before = runs_at_emit[0]
    assert [r - before for r in runs_at_emit] == list(range(BLOCKS + 1))


def test_selected_states_go_out_in_index_order(engine):
    events: list[HiddenStateEvent] = []
    request = Request(mode="hidden_states", layers=[0, 5, BLOCKS])
    final = run_hidden_states(engine, request, PROMPT, events.append, lambda: False)
    ids = torch.tensor([PROMPT])
    with engine.request():
        states = engine.model.base_model(
            input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True
        ).hidden_states
    assert [e.layer for e in events] == [0, 5, BLOCKS]
    for event in events:
        assert np.array_equal(event.hidden_state, states[event.layer][0].numpy())
    assert final.finish_reason == "stop" and final.embedding is not None


def test_a_state_that_is_not_transformers_own_is_an_error(engine):
    """The safety net: if the learned layout pointed at the wrong module call, the forward's
    end finds the state sent is not the tensor transformers returned at that index."""
    layout = hidden_layouts.hidden_layout(engine)
    wrong = list(layout.sources)
    wrong[3], wrong[4] = wrong[4], wrong[3]
    hidden_layouts._LAYOUTS[engine] = HiddenLayout(layout.count, tuple(wrong))
    with pytest.raises(LayerStreamError, match=r"hidden state 3 sent from .* is not the one"):
        run_hidden_states(engine, all_layers(engine), PROMPT, lambda event: None, lambda: False)


def test_states_without_a_source_come_from_transformers_tuple(engine):
    """A state no module call hands over (made by a plain tensor op) is sent when the
    forward ends, from the tuple transformers returns."""
    layout = hidden_layouts.hidden_layout(engine)
    late = list(layout.sources)
    late[2] = None
    hidden_layouts._LAYOUTS[engine] = HiddenLayout(layout.count, tuple(late))
    events: list[HiddenStateEvent] = []
    run_hidden_states(engine, all_layers(engine), PROMPT, events.append, lambda: False)
    ids = torch.tensor([PROMPT])
    with engine.request():
        states = engine.model.base_model(
            input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True
        ).hidden_states
    assert [e.layer for e in events] == list(range(BLOCKS + 1))
    for event in events:
        assert np.array_equal(event.hidden_state, states[event.layer][0].numpy())


def test_a_model_whose_layout_is_unknown_serves_no_hidden_states(engine, caplog):
    hidden_layouts._LAYOUTS[engine] = LayoutUnknown("its forward pass on the meta device failed")
    with caplog.at_level(logging.WARNING, logger="layerstream.inference.capabilities"):
        caps = capabilities(engine)
    assert "hidden_states" not in caps.modes
    assert "embedding" in caps.modes and "tokens" in caps.modes
    assert "serves no hidden_states mode: its forward pass on the meta device" in caplog.text


@pytest.mark.parametrize("layers", ["all", "ends"])
def test_a_state_taken_from_a_module_input_goes_out_before_the_blocks_run(
    model_factory, layers: str
) -> None:
    """GPT-2's hidden state 0 (token plus position embeddings) is made by a plain addition:
    the first module call that hands it over is the *input* of its dropout. Streamed (every
    block read while the forward runs), it is sent as soon as that input exists, before the
    first block runs, not from transformers' tuple after the last one; then state k right
    after block k-1, before block k runs."""
    engine = Engine(
        open_store(str(model_factory("gpt2").store)),
        EngineOptions(memory_budget="25%", read_ahead=1),
    )
    handles: list[RemovableHandle] = []
    try:
        assert engine.plan.streamed, "the test needs streamed blocks"
        n = len(engine.prefixes)
        wanted = list(range(n + 1)) if layers == "all" else [0, n]  # ends: the first, the last
        seen: list[tuple[str, int]] = []  # on the request's own thread, in order

        def block_runs(j: int, module: nn.Module, args: tuple) -> None:
            seen.append(("block", j))

        for j, prefix in enumerate(engine.prefixes):
            module = engine.model.get_submodule(prefix)
            handles.append(module.register_forward_pre_hook(functools.partial(block_runs, j)))
        request = Request(mode="hidden_states", layers=wanted)
        run_hidden_states(
            engine, request, PROMPT, lambda e: seen.append(("state", e.layer)), lambda: False
        )
        blocks = [("block", j) for j in range(n)]
        if layers == "all":
            expected = [x for j in range(n) for x in (("state", j), blocks[j])]
            assert seen == [*expected, ("state", n)]
        else:
            assert seen == [("state", 0), *blocks, ("state", n)]
    finally:
        for handle in handles:
            handle.remove()
        engine.close()
