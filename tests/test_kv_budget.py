"""The KV cache budget: each request's cache estimated from the config, admission within
the budget, and a request that could never fit refused with the numbers."""

from __future__ import annotations

import asyncio

import pytest
from conftest import CONFIGS
from mlserver.settings import ModelParameters, ModelSettings
from mlserver.types import InferenceRequest
from transformers import AutoConfig

from layerstream.errors import InvalidRequest, SettingsError
from layerstream.inference.kv import kv_bytes_per_token, request_kv_bytes, resolve_kv_budget
from layerstream.inference.request import Request
from layerstream.serving.runtime import LayerStreamRuntime


def config_of(name: str):
    fields = dict(CONFIGS[name])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def test_kv_per_token_counts_the_kv_heads_of_grouped_query_attention():
    config = config_of("llama")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    assert kv_heads < heads  # the fixture has grouped-query attention
    head_dim = config.hidden_size // heads
    blocks = config.num_hidden_layers
    assert kv_bytes_per_token(config, blocks, "float32") == 2 * blocks * kv_heads * head_dim * 4
    assert kv_bytes_per_token(config, blocks, "bfloat16") == 2 * blocks * kv_heads * head_dim * 2


def test_kv_per_token_of_a_model_that_names_no_kv_heads():
    config = config_of("gpt2")
    assert kv_bytes_per_token(config, 12, "float32") == 2 * 12 * config.n_embd * 4


def test_a_request_counts_its_prompt_and_new_tokens_within_the_context():
    ids = Request(mode="tokens", input_ids=[1] * 10, max_new_tokens=5)
    assert request_kv_bytes(ids, 100, context=128) == 15 * 100
    text = Request(mode="tokens", prompt="héllo", max_new_tokens=5)  # 6 UTF-8 bytes
    assert request_kv_bytes(text, 100, context=None) == (6 + 16 + 5) * 100
    assert request_kv_bytes(text, 100, context=20) == 20 * 100  # never past the context
    forward = Request(mode="embedding", input_ids=[1] * 10)
    assert request_kv_bytes(forward, 100, context=128) == 10 * 100


def test_the_budget_setting():
    assert resolve_kv_budget("1MiB", 100, 8, 128) == 2**20
    assert resolve_kv_budget("auto", 100, 8, 128) <= 8 * 128 * 100
    with pytest.raises(SettingsError, match="kv_cache_budget"):
        resolve_kv_budget("lots", 100, 8, 128)


def gpt2_at_16kib(model_factory, name: str) -> LayerStreamRuntime:
    """The tiny GPT-2 (6 KiB of KV cache per token) with a 16 KiB kv_cache_budget."""
    extra = {"chunk_store": str(model_factory("gpt2").store), "torch_threads": 1}
    parameters = ModelParameters(extra=extra | {"kv_cache_budget": "16KiB"})
    return LayerStreamRuntime(
        ModelSettings(name=name, implementation=LayerStreamRuntime, parameters=parameters)
    )


def test_a_request_that_could_never_fit_is_refused_with_the_numbers(model_factory):
    """A 16 KiB budget on the tiny GPT-2 (6 KiB of KV cache per token): a request of two
    tokens fits, one of 12 could never fit and is an invalid_request naming the setting."""
    runtime = gpt2_at_16kib(model_factory, "kv")

    async def main():
        runtime.ready = await runtime.load()
        try:
            small = {
                "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1], "data": [5]}],
                "parameters": {"max_new_tokens": 1, "temperature": 0},
            }
            big = {**small, "parameters": {"max_new_tokens": 11, "temperature": 0}}
            ok = [r async for r in runtime.predict_stream(_one(small))]
            refused = [r async for r in runtime.predict_stream(_one(big))]
            return ok, refused
        finally:
            await runtime.unload()

    ok, (refused,) = asyncio.run(main())
    assert ok[-1].parameters.finish_reason in ("length", "stop")
    params = refused.parameters
    assert (params.finish_reason, params.error_type) == ("error", "invalid_request")
    assert "kv_cache_budget" in params.error and "12 tokens" in params.error


async def _one(payload: dict):
    yield InferenceRequest.model_validate(payload)


def test_admission_counts_kv_bytes_against_the_budget_in_bytes(model_factory):
    """16 KiB of KV budget on the tiny GPT-2 (6 KiB per token) and three requests of two
    tokens (12 KiB each), with room for four sequences: one runs at a time. Counting the
    request in tokens, or the budget in anything but bytes, would admit all three."""
    store = model_factory("gpt2").store
    settings = ModelSettings(
        name="kv",
        implementation=LayerStreamRuntime,
        parameters=ModelParameters(
            extra={
                "chunk_store": str(store),
                "torch_threads": 1,
                "kv_cache_budget": "16KiB",
                "max_active_sequences": 4,
            }
        ),
    )
    runtime = LayerStreamRuntime(settings)
    active: list[int] = []

    async def main():
        runtime.ready = await runtime.load()
        scheduler = runtime._scheduler
        report = scheduler._on_active_change

        def record(count: int) -> None:
            active.append(count)
            report(count)

        scheduler._on_active_change = record
        try:
            payload = {
                "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1], "data": [5]}],
                "parameters": {"max_new_tokens": 1, "temperature": 0},
            }

            async def one():
                return [r async for r in runtime.predict_stream(_one(payload))]

            return await asyncio.gather(one(), one(), one())
        finally:
            await runtime.unload()

    results = asyncio.run(main())
    assert all(r[-1].parameters.finish_reason in ("length", "stop") for r in results)
    assert active and max(active) == 1, active


def test_hidden_states_count_against_the_budget_until_read(model_factory):
    """A hidden-states request holds its states until its client has read them: they count
    as its KV cache does. The KV of two tokens (12 KiB) fits a 16 KiB budget; with the
    float32 states of all 13 layers (stacked for a unary answer) it does not, and the
    refusal says so. Counting its KV only admitted it (8 such requests took 374 MiB against
    a ~96 MiB bound)."""
    runtime = gpt2_at_16kib(model_factory, "kvh")
    ids = {"name": "input_ids", "datatype": "INT64", "shape": [2], "data": [5, 6]}

    async def main():
        runtime.ready = await runtime.load()
        try:
            hidden = {"inputs": [ids], "parameters": {"mode": "hidden_states"}}
            with pytest.raises(InvalidRequest, match=r"KV cache and .* of hidden states"):
                await runtime.predict(InferenceRequest.model_validate(hidden))
            one = {"inputs": [ids], "parameters": {"mode": "hidden_states", "layers": [-1]}}
            return await runtime.predict(InferenceRequest.model_validate(one))
        finally:
            await runtime.unload()

    answer = asyncio.run(main())
    assert answer.parameters.layers == "12"
