"""The runtime's request paths (generation and hidden states) on the engine, without a server."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerstream.engine.engine import Engine, EngineOptions
from layerstream.inference.generation import generation_config, run_generation
from layerstream.inference.hidden import run_hidden_states
from layerstream.inference.request import Request
from layerstream.inference.types import FinalEvent, HiddenStateEvent, TokenEvent
from layerstream.stores import open_store

IDS = [5, 17, 99, 3, 250, 7, 42, 130]


def engine_for(model, budget="25%") -> Engine:
    return Engine(open_store(str(model.store)), EngineOptions(memory_budget=budget, read_ahead=1))


def collect(fn, engine, request, ids=IDS):
    events: list = []
    final = fn(engine, request, ids, events.append, lambda: False)
    return events, final


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2", "mistral", "bert"])
def test_hidden_state_stream_equals_output_hidden_states(model_factory, name):
    model = model_factory(name)
    reference = model.resident()
    engine = engine_for(model)
    try:
        n = len(engine.prefixes)
        request = Request(mode="hidden_states", layers=list(range(n + 1)))
        events, final = collect(run_hidden_states, engine, request)
        with torch.inference_mode():
            ids = torch.tensor([IDS])
            expected = reference.base_model(ids, output_hidden_states=True).hidden_states
        assert [e.layer for e in events] == list(range(n + 1))
        for event in events:
            assert isinstance(event, HiddenStateEvent)
            assert event.hidden_state.dtype == np.float32
            assert np.array_equal(event.hidden_state, expected[event.layer][0].numpy())
        assert isinstance(final, FinalEvent) and final.finish_reason == "stop"
        assert np.allclose(final.embedding, expected[-1][0].mean(0).numpy(), atol=1e-6)
    finally:
        engine.close()


def test_generation_events_and_stop_string(model_factory):
    model = model_factory("llama")
    reference = model.resident()
    engine = engine_for(model)
    try:
        events, final = collect(
            run_generation, engine, Request(mode="tokens", max_new_tokens=12, do_sample=False)
        )
        ids = torch.tensor([IDS])
        expected = reference.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
        )
        new = expected[0, len(IDS) :].tolist()
        assert [e.token_id for e in events] == new
        text = "".join(e.text for e in events)
        assert text == engine.tokenizer.decode(new, skip_special_tokens=True)
        assert final.finish_reason == (
            "stop" if new[-1] == engine.generation_config.eos_token_id else "length"
        )
        assert final.stats.tokens == 12 and final.stats.streamed_runs > 0

        # Stop at a piece of that text: the stream is cut before it, finish_reason is stop.
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        if stop.strip():
            events, final = collect(
                run_generation, engine, Request(mode="tokens", max_new_tokens=12, stop=[stop])
            )
            streamed = "".join(e.text for e in events) + final.text
            assert streamed == text[: text.find(stop)]
            assert final.finish_reason == "stop"
            assert [e.token_id for e in events] == new[: len(events)]
    finally:
        engine.close()


def test_cancelled_request_stops_between_blocks_and_engine_recovers(model_factory):
    model = model_factory("llama")
    engine = engine_for(model)
    try:
        calls = {"n": 0}

        def cancelled() -> bool:
            calls["n"] += 1
            return calls["n"] > 20  # mid-way through the second token

        from layerstream.errors import RequestCancelled

        tokens: list = []
        request = Request(mode="tokens", max_new_tokens=12, do_sample=False)
        with pytest.raises(RequestCancelled):
            run_generation(engine, request, IDS, tokens.append, cancelled)
        assert 0 < len(tokens) < 12
        # no buffer leaked, nothing left installed: the next request is complete and exact
        events, _ = collect(run_generation, engine, request)
        assert len(events) == 12 and [e.token_id for e in events[: len(tokens)]] == [
            t.token_id for t in tokens
        ]
        assert all(isinstance(e, TokenEvent) for e in events)
    finally:
        engine.close()


@pytest.mark.parametrize("calls_before", [3, 20])  # inside the prompt pass; mid-generation
def test_a_deadline_raised_by_the_stop_check_unwinds_the_engine_cleanly(
    model_factory, calls_before
):
    """The scheduler's check raises RequestTimeout past a request's deadline, from a block
    hook or from generate's stopping criteria: the request ends with that error, and the
    engine serves the next request completely and exactly."""
    from layerstream.errors import RequestTimeout

    model = model_factory("llama")
    engine = engine_for(model)
    try:
        calls = {"n": 0}

        def stop_requested() -> bool:
            calls["n"] += 1
            if calls["n"] > calls_before:
                raise RequestTimeout("past the deadline")
            return False

        request = Request(mode="tokens", max_new_tokens=12, do_sample=False)
        tokens: list = []
        with pytest.raises(RequestTimeout, match="past the deadline"):
            run_generation(engine, request, IDS, tokens.append, stop_requested)
        assert len(tokens) < 12
        events, final = collect(run_generation, engine, request)
        ids = torch.tensor([IDS])
        expected = model.resident().generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
        )
        assert [e.token_id for e in events] == expected[0, len(IDS) :].tolist()
        assert final.stats.tokens == 12
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("fields", "samples"),
    [
        ({}, False),  # the model's generation config: greedy for the fixture gpt2
        ({"temperature": 0.7}, True),
        ({"top_p": 0.9}, True),
        ({"top_k": 5}, True),
        ({"top_p": 1.0}, False),  # asks for nothing: OpenAI clients send it
        ({"top_k": 0}, False),  # "off"
        ({"top_p": 0.9, "do_sample": False}, False),  # said outright: greedy
    ],
)
def test_a_sampling_parameter_is_a_request_to_sample(model_factory, fields, samples):
    """Not silently ignored on a model whose generation config decodes greedily."""
    engine = engine_for(model_factory("gpt2"), budget="100%")
    try:
        engine.generation_config.do_sample = False
        config = generation_config(engine, Request(mode="tokens", **fields))
        assert config.do_sample is samples
    finally:
        engine.close()
