"""The backbone: streamed outputs equal the fully loaded transformers model, exactly.

Every architecture runs transformers' own classes in both cases, so the numbers must be
bit-identical (max abs diff 0.0) at every budget, for the prompt pass and for every
generated token's logits; only the weights' route differs. The models here are the scaled
variants of the shared fixtures (conftest.SCALED), whose greedy ids vary from token to token.
"""

from __future__ import annotations

import pytest
import torch
from architectures import ARCHITECTURES
from conftest import CONFIGS, SCALED

from layerstream.engine.engine import Engine, EngineOptions
from layerstream.stores import open_store

CAUSAL = ["gpt2", "llama", "qwen2", "mistral"]
BUDGETS = ["100%", "25%"]
PROMPT = torch.tensor([[5, 17, 99, 3, 250, 7, 42, 130, 11, 64]])
NEW_TOKENS = 12


def engine_for(model, budget: str, read_ahead: int = 2) -> Engine:
    return Engine(
        open_store(str(model.store)), EngineOptions(memory_budget=budget, read_ahead=read_ahead)
    )


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def scaled(model_factory):
    return lambda name: model_factory(name, weight_scale=SCALED)


@pytest.fixture(scope="module")
def resident_models(scaled):
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = scaled(name).resident()
        return cache[name]

    return get


def generate_both(engine: Engine, reference, **kwargs):
    """The same generate call on both models, with every step's logits; the caller seeds."""
    kwargs = dict(
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,  # an early EOS would shorten the comparison
        attention_mask=torch.ones_like(PROMPT),
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    seed = kwargs.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    with engine.request():
        mine = engine.model.generate(PROMPT, **kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        theirs = reference.generate(PROMPT, **kwargs)
    return mine, theirs


def assert_same_generation(mine, theirs) -> None:
    assert torch.equal(mine.sequences, theirs.sequences)
    assert len(mine.logits) == len(theirs.logits) == NEW_TOKENS
    diffs = [max_diff(a, b) for a, b in zip(mine.logits, theirs.logits, strict=True)]
    assert diffs == [0.0] * NEW_TOKENS, f"logits differ per step: {diffs}"


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", CAUSAL)
def test_causal_forward_and_generate_are_identical(scaled, resident_models, name, budget):
    model = scaled(name)
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

        greedy = generate_both(engine, reference, do_sample=False)
        assert_same_generation(*greedy)
        # the scaled init makes greedy ids a meaningful check: not one token repeated
        assert len(set(greedy[1].sequences[0, -NEW_TOKENS:].tolist())) > 2

        sampling = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.95, seed=1234)
        assert_same_generation(*generate_both(engine, reference, **sampling))
    finally:
        engine.close()


@pytest.mark.parametrize("budget", BUDGETS)
def test_encoder_hidden_states_are_identical(scaled, resident_models, budget):
    model = scaled("bert")
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


def test_encoder_decoder_learns_the_block_order(scaled, resident_models):
    """T5 runs its encoder blocks once, then cycles the decoder's: "next = i+1" is wrong there."""
    model = scaled("t5")
    reference = resident_models("t5")
    engine = engine_for(model, "50%", read_ahead=1)
    try:
        assert engine.plan.streamed
        assert_same_generation(*generate_both(engine, reference, do_sample=False))
        kwargs = dict(max_new_tokens=8, do_sample=False)
        with engine.request() as second:
            engine.model.generate(PROMPT, **kwargs)
        # Encoder blocks once, then the decoder's for every token.
        assert second.stats.streamed_runs == 4 + 3 * 8
        # Once learned, the read-ahead follows the encoder->decoder jump and the decoder's
        # wrap-around; the only wasted reads are at the request boundaries.
        wasted = second.stats.chunks_read - second.stats.streamed_runs
        assert 0 <= wasted <= 2
    finally:
        engine.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_chunks_match_from_pretrained_in_that_dtype(model_factory, dtype):
    """Chunks converted to half precision by the chunker equal from_pretrained's own
    conversion at load: the same weights, the same numbers."""
    model = model_factory("llama", dtype=dtype, weight_scale=SCALED)
    torch_dtype = getattr(torch, dtype)
    reference = model.resident(dtype=torch_dtype)
    engine = engine_for(model, "25%")
    try:
        mine, theirs = generate_both(engine, reference, do_sample=False)
        assert engine.model.lm_head.weight.dtype == torch_dtype
        assert_same_generation(mine, theirs)
    finally:
        engine.close()


def test_cache_hit_rate_is_pinned_over_total(model_factory):
    """Cyclic access: pinning the first k blocks gives the optimal hit rate k/N."""
    model = model_factory("llama")
    engine = engine_for(model, "60%", read_ahead=1)
    try:
        engine.wait_pinned()  # the steady state (fill.py)
        n, k = engine.plan.n_blocks, len(engine.plan.resident)
        assert 0 < k < n
        with engine.request() as scope:
            engine.model.generate(PROMPT, max_new_tokens=6, do_sample=False, pad_token_id=0)
        runs = scope.stats.resident_runs + scope.stats.streamed_runs
        assert runs == 6 * n
        assert scope.stats.resident_runs / runs == pytest.approx(k / n)
        streamed = len(engine.plan.streamed)
        # every streamed block once per token, plus at most the read-ahead that runs past the
        # last token (it serves the next request)
        assert 6 * streamed <= scope.stats.chunks_read <= 6 * streamed + 1
    finally:
        engine.close()


@pytest.mark.parametrize("reader", ["read", "mmap"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_both_readers_are_exact(scaled, resident_models, name, reader):
    """Streamed blocks copied into pooled buffers, or mapped from the page cache."""
    engine = Engine(
        open_store(str(scaled(name).store)),
        EngineOptions(memory_budget="25%", read_ahead=1, reader=reader),
    )
    reference = resident_models(name)
    try:
        assert engine.streamer.reader == reader and engine.plan.streamed
        before = engine.streamer.stats.snapshot()
        assert_same_generation(*generate_both(engine, reference, do_sample=False))
        # the prompt pass + one pass per further token run every streamed block
        runs = engine.streamer.stats.since(before).streamed_runs
        assert runs == NEW_TOKENS * len(engine.plan.streamed)
    finally:
        engine.close()


def _parameters_as_they_run(engine: Engine) -> dict[str, torch.Tensor]:
    """Every parameter of the model as it is while its block runs (a streamed block holds
    its weights only then), after one forward."""
    seen: dict[str, torch.Tensor] = dict(engine.model.named_parameters())
    handles = []
    for prefix in engine.prefixes:
        block = engine.model.get_submodule(prefix)

        def record(module, args, prefix=prefix) -> None:  # runs after the install hook
            for key, value in module.named_parameters():
                seen[f"{prefix}.{key}"] = value

        handles.append(block.register_forward_pre_hook(record))
    try:
        with engine.request():
            engine.model(PROMPT)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("reader", ["read", "mmap"])
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_weights_sit_where_from_pretrained_holds_them(
    scaled, resident_models, name, budget, reader
):
    """Modulo 64 bytes: an AVX-512 MKL GEMV rounds by a weight's address modulo 64, so a weight
    placed otherwise than from_pretrained places it (a view of the mapped checkpoint, at its
    file offset) gives other logits on such a CPU (every decode step of 19 architectures
    did, on one machine). Checked on the addresses, so any CPU catches a slip."""
    reference = resident_models(name)
    engine = Engine(
        open_store(str(scaled(name).store)),
        EngineOptions(memory_budget=budget, read_ahead=1, reader=reader),
    )
    try:
        weights = _parameters_as_they_run(engine)
        theirs = {k: v.data_ptr() % 64 for k, v in reference.named_parameters()}
        assert {k: v.data_ptr() % 64 for k, v in weights.items()} == theirs
    finally:
        engine.close()


@pytest.mark.parametrize("budget", BUDGETS)
def test_parameters_are_flagged_like_from_pretrained(scaled, resident_models, budget):
    """ATen decomposes some products partly by requires_grad (torch.matmul of a 2-D weight
    by a batched input), so a weight flagged otherwise than from_pretrained's gives other
    roundings (Mamba's dt_proj: test_architectures' mamba row). Every parameter must carry
    from_pretrained's flag."""
    reference = resident_models("llama")
    engine = engine_for(scaled("llama"), budget)
    try:
        flags = {k: v.requires_grad for k, v in _parameters_as_they_run(engine).items()}
        assert flags == {k: v.requires_grad for k, v in reference.named_parameters()}
    finally:
        engine.close()


# models that keep some tensors in float32 whatever the dtype asked for: T5's `wo` in
# float16 (_keep_in_fp32_modules), DeepSeek-V2's router in bfloat16 (..._strict), gpt-oss's
# sinks and norms in float16
KEEP_FP32 = {
    "t5-float16": (CONFIGS["t5"], "float16"),
    "deepseek_v2-bfloat16": (
        dict(
            model_type="deepseek_v2",
            architectures=["DeepseekV2ForCausalLM"],
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            vocab_size=320,
            max_position_embeddings=128,
        ),
        "bfloat16",
    ),
    "gpt_oss-float16": (ARCHITECTURES["gpt_oss"], "float16"),
}


@pytest.mark.parametrize("case", sorted(KEEP_FP32))
def test_tensors_from_pretrained_keeps_in_float32_stay_float32(tmp_path, case):
    """Every chunk tensor has the dtype from_pretrained(dtype=...) gives it, the ones a
    model keeps in float32 included, and the outputs are identical streamed and resident."""
    import json

    import transformers
    from safetensors import safe_open

    from layerstream.chunker.convert import chunk_checkpoint
    from layerstream.chunker.presets import write_random_checkpoint
    from layerstream.format.header import BY_CODE

    config, dtype = KEEP_FP32[case]
    (tmp_path / "config.json").write_text(json.dumps(config))
    source = write_random_checkpoint(
        str(tmp_path / "config.json"), tmp_path / "src", weight_scale=8
    )
    manifest = chunk_checkpoint(source, tmp_path / "store", case, dtype=dtype, progress=False)
    cls = getattr(transformers, config["architectures"][0])
    reference = cls.from_pretrained(source, dtype=getattr(torch, dtype)).eval()
    want = {k: v.dtype for k, v in reference.state_dict().items()}
    assert torch.float32 in want.values()  # the model keeps some in float32
    for info in manifest.chunks.values():
        with safe_open(str(tmp_path / "store" / info.file), "pt") as f:
            for key in info.tensors:
                assert BY_CODE[f.get_slice(key).get_dtype()].torch == want[key], key
    kwargs = {"decoder_input_ids": PROMPT} if config["model_type"] == "t5" else {}
    engine = Engine(open_store(str(tmp_path / "store")), EngineOptions(memory_budget="40%"))
    try:
        assert engine.plan.streamed
        with engine.request():
            mine = engine.model(PROMPT, **kwargs).logits
        with torch.inference_mode():
            theirs = reference(PROMPT, **kwargs).logits
        assert max_diff(mine, theirs) == 0.0
    finally:
        engine.close()
