"""Memory is a promise: with a budget, peak RSS stays near budget + a small working set.

A ~300 MB Llama is served at a 25% budget in a fresh subprocess; its peak RSS above the
import baseline must stay under the budget plus a working set that does not grow with the
model (activations, KV cache, the skeleton's buffers, allocator slack).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from layerstream.chunker.convert import chunk_checkpoint
from layerstream.chunker.presets import write_random_checkpoint

WORKING_SET = 64 * 2**20


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    source = write_random_checkpoint("llama-300m", root / "source")
    manifest = chunk_checkpoint(source, root / "chunks", "big", progress=False)
    assert manifest.total_bytes > 250 * 2**20
    return root / "chunks", source, manifest


def probe(*args: str) -> dict:
    script = Path(__file__).with_name("memory_probe.py")
    out = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_rss_stays_within_budget_plus_working_set(big_model):
    store, source, manifest = big_model
    streamed = probe("stream", "25%", str(store), str(source))
    resident = probe("resident", str(store), str(source))
    assert streamed["ids"] == resident["ids"]
    growth = streamed["peak"] - streamed["baseline"]
    assert streamed["budget"] <= manifest.total_bytes * 0.25 + 1
    assert growth <= streamed["budget"] + WORKING_SET, (
        f"peak RSS grew {growth / 2**20:.0f} MiB for a {streamed['budget'] / 2**20:.0f} MiB budget"
    )
    # and the resident model really needs the whole model: the budget made the difference
    assert resident["peak"] - resident["baseline"] >= manifest.total_bytes * 0.9


# a Qwen3-MoE of ~400 MB in bfloat16, nearly all of it experts (64, top-8)
MOE_CONFIG = {
    "model_type": "qwen3_moe",
    "hidden_size": 512,
    "intermediate_size": 1024,
    "moe_intermediate_size": 256,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 4096,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    (root / "config.json").write_text(json.dumps(MOE_CONFIG))
    source = write_random_checkpoint(str(root / "config.json"), root / "source", dtype="bfloat16")
    manifest = chunk_checkpoint(source, root / "chunks", "moe", progress=False)
    assert manifest.total_bytes > 350 * 2**20
    resident = probe("resident", str(root / "chunks"), str(source))  # once for both ways
    return root / "chunks", source, manifest, resident["ids"]


@pytest.mark.slow
@pytest.mark.parametrize("in_place", ["true", "false"])
def test_expert_streaming_peak_rss_stays_within_budget_plus_working_set(moe_model, in_place):
    """With every non-expert part pinned and the rest of the budget an expert cache, the
    experts kept, read and in flight stay in the budget, whether blocks compute on them in
    their homes (pages taken and given back as experts come and go) or copy them."""
    store, source, manifest, ids = moe_model
    options = ("expert_streaming=on", f"expert_cache_in_place={in_place}", "read_ahead=auto")
    streamed = probe("stream", "25%", *options, str(store), str(source))
    assert streamed["in_place"] is (in_place == "true")
    assert streamed["expert_cache"] > 0 and streamed["expert_cache_hits"] > 0
    assert streamed["ids"] == ids
    growth = streamed["peak"] - streamed["baseline"]
    assert streamed["budget"] <= manifest.total_bytes * 0.25 + 1
    assert growth <= streamed["budget"] + WORKING_SET, (
        f"peak RSS grew {growth / 2**20:.0f} MiB for a {streamed['budget'] / 2**20:.0f} MiB budget"
    )


@pytest.mark.slow
def test_peak_rss_with_8_concurrent_requests_within_budget_kv_and_working_set(big_model):
    """Eight requests in flight at once share the sweeps: the peak stays within the weight
    budget + the eight sequences' KV caches (as estimated for admission) + a working set,
    and every answer is the one it gets alone."""
    store, source, _ = big_model
    result = probe("concurrent", "25%", "8", str(store), str(source))
    assert result["together"] == result["alone"]
    growth = result["peak"] - result["baseline"]
    bound = result["budget"] + result["kv_bytes"] + WORKING_SET
    assert growth <= bound, (
        f"peak RSS grew {growth / 2**20:.0f} MiB with 8 requests in flight; bound "
        f"{bound / 2**20:.0f} MiB (budget {result['budget'] / 2**20:.0f} MiB + KV "
        f"{result['kv_bytes'] / 2**20:.1f} MiB + working set {WORKING_SET / 2**20:.0f} MiB)"
    )


@pytest.mark.slow
def test_memory_of_a_burst_goes_back_once_the_engine_is_idle(big_model):
    """Each request computes on its own thread, in a glibc arena of its own: without the
    engine's care (engine/allocator.py) freed activations stayed in those arenas, 57 MiB
    after one burst of 8 requests on this model and more after each further burst."""
    store, source, _ = big_model
    result = probe("bursts", "25%", "8", str(store), str(source))
    kept = [(rss - result["loaded"]) / 2**20 for rss in result["after"]]
    assert max(kept) <= 32, f"RSS above the loaded engine after each burst: {kept} MiB"


@pytest.mark.parametrize("budget", ["100%", "25%"])
@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_tied_weights_are_one_tensor_after_load(model_factory, name, budget):
    """lm_head = embeddings (and T5's shared embeddings) are one tensor, as in
    from_pretrained, not a second copy of the largest weight in memory."""
    from layerstream.engine.engine import Engine, EngineOptions
    from layerstream.engine.skeleton import get_tensor
    from layerstream.stores import open_store

    engine = Engine(open_store(str(model_factory(name).store)), EngineOptions(budget))
    try:
        groups = engine.manifest.tied
        assert groups
        for group in groups:
            tensors = [get_tensor(engine.model, key) for key in group]
            assert all(t is tensors[0] for t in tensors), group
    finally:
        engine.close()


def test_a_users_mmap_threshold_is_kept():
    """glibc reads MALLOC_MMAP_THRESHOLD_ at start: the engine leaves that choice alone."""
    code = (
        "from layerstream.engine import allocator; "
        "print(allocator.fix_mmap_threshold(), allocator.fix_mmap_threshold())"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False"], out.stderr
    env.pop("MALLOC_MMAP_THRESHOLD_")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["True", "True"], out.stderr
