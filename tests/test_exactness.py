"""The backbone: streamed outputs equal the fully loaded transformers model, exactly.

Every architecture runs transformers' own classes in both cases, so the numbers must be
bit-identical (max abs diff 0.0) at every budget; only the weights' route differs.
"""

from __future__ import annotations

import pytest
import torch

from layerstream.engine import Engine, EngineOptions
from layerstream.stores import open_store

CAUSAL = ["gpt2", "llama", "qwen2", "mistral"]
BUDGETS = ["100%", "25%"]
PROMPT = torch.tensor([[5, 17, 99, 3, 250, 7, 42, 130, 11, 64]])


def engine_for(model, budget: str, read_ahead: int = 2) -> Engine:
    return Engine(
        open_store(str(model.store)), EngineOptions(memory_budget=budget, read_ahead=read_ahead)
    )


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def resident_models(model_factory):
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = model_factory(name).resident()
        return cache[name]

    return get


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", CAUSAL)
def test_causal_forward_and_generate_are_identical(model_factory, resident_models, name, budget):
    model = model_factory(name)
    reference = resident_models(name)
    engine = engine_for(model, budget)
    try:
        if budget == "25%":
            assert engine.plan.streamed, "a 25% budget must stream blocks"
        with engine.request():
            out = engine.model(PROMPT, output_hidden_states=True)
        with torch.inference_mode():
            ref = reference(PROMPT, output_hidden_states=True)
        assert max_diff(out.logits, ref.logits) == 0.0
        assert len(out.hidden_states) == len(ref.hidden_states)
        for mine, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
            assert max_diff(mine, theirs) == 0.0

        kwargs = dict(max_new_tokens=12, attention_mask=torch.ones_like(PROMPT), pad_token_id=0)
        with engine.request():
            greedy = engine.model.generate(PROMPT, do_sample=False, **kwargs)
        assert torch.equal(greedy, reference.generate(PROMPT, do_sample=False, **kwargs))

        sampling = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.95, **kwargs)
        torch.manual_seed(1234)
        with engine.request():
            sampled = engine.model.generate(PROMPT, **sampling)
        torch.manual_seed(1234)
        assert torch.equal(sampled, reference.generate(PROMPT, **sampling))
    finally:
        engine.close()


@pytest.mark.parametrize("budget", BUDGETS)
def test_encoder_hidden_states_are_identical(model_factory, resident_models, budget):
    model = model_factory("bert")
    reference = resident_models("bert")
    engine = engine_for(model, budget)
    try:
        with engine.request():
            out = engine.model(PROMPT, output_hidden_states=True)
        with torch.inference_mode():
            ref = reference(PROMPT, output_hidden_states=True)
        assert max_diff(out.last_hidden_state, ref.last_hidden_state) == 0.0
        assert max_diff(out.pooler_output, ref.pooler_output) == 0.0
        for mine, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
            assert max_diff(mine, theirs) == 0.0
    finally:
        engine.close()


def test_encoder_decoder_learns_the_block_order(model_factory, resident_models):
    """T5 runs its encoder blocks once, then cycles the decoder's: "next = i+1" is wrong there."""
    model = model_factory("t5")
    reference = resident_models("t5")
    engine = engine_for(model, "50%", read_ahead=1)
    try:
        assert engine.plan.streamed
        kwargs = dict(max_new_tokens=8, do_sample=False)
        with engine.request():
            ids = engine.model.generate(PROMPT, **kwargs)
        assert torch.equal(ids, reference.generate(PROMPT, **kwargs))
        with engine.request() as second:
            engine.model.generate(PROMPT, **kwargs)
        # Encoder blocks once, then the decoder's for every token.
        assert second.stats.cache_misses == 4 + 3 * 8
        # Once learned, the read-ahead follows the encoder->decoder jump and the decoder's
        # wrap-around; the only wasted reads are at the request boundaries.
        wasted = second.stats.chunks_read - second.stats.cache_misses
        assert 0 <= wasted <= 2
    finally:
        engine.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_chunks_match_from_pretrained_in_that_dtype(model_factory, dtype):
    model = model_factory("llama", dtype=dtype)
    torch_dtype = getattr(torch, dtype)
    reference = model.resident(dtype=torch_dtype)
    engine = engine_for(model, "25%")
    try:
        with engine.request():
            out = engine.model(PROMPT)
        with torch.inference_mode():
            ref = reference(PROMPT)
        assert out.logits.dtype == torch_dtype
        assert max_diff(out.logits, ref.logits) <= 1e-5
    finally:
        engine.close()


def test_cache_hit_rate_is_pinned_over_total(model_factory):
    """Cyclic access: pinning the first k blocks gives the optimal hit rate k/N."""
    model = model_factory("llama")
    engine = engine_for(model, "60%", read_ahead=1)
    try:
        n, k = engine.plan.n_blocks, len(engine.plan.resident)
        assert 0 < k < n
        with engine.request() as scope:
            engine.model.generate(PROMPT, max_new_tokens=6, do_sample=False, pad_token_id=0)
        runs = scope.stats.cache_hits + scope.stats.cache_misses
        assert runs == 6 * n
        assert scope.stats.cache_hits / runs == pytest.approx(k / n)
        streamed = len(engine.plan.streamed)
        # every streamed block once per token, plus at most the read-ahead that runs past the
        # last token (it serves the next request)
        assert 6 * streamed <= scope.stats.chunks_read <= 6 * streamed + 1
    finally:
        engine.close()


@pytest.mark.parametrize("reader", ["read", "mmap"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_both_readers_are_exact(model_factory, resident_models, name, reader):
    """Streamed blocks copied into pooled buffers, or mapped from the page cache."""
    engine = Engine(
        open_store(str(model_factory(name).store)),
        EngineOptions(memory_budget="25%", read_ahead=1, reader=reader),
    )
    reference = resident_models(name)
    try:
        assert engine.streamer.reader == reader and engine.plan.streamed
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        with engine.request() as scope:
            ids = engine.model.generate(PROMPT, **kwargs)
        assert torch.equal(ids, reference.generate(PROMPT, **kwargs))
        # prefill + 7 decode steps run every streamed block
        assert scope.stats.cache_misses == 8 * len(engine.plan.streamed)
    finally:
        engine.close()
