"""Shared fixtures: tiny random-init models, chunked once per test session (no network)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import transformers

from layerstream.chunker.convert import chunk_checkpoint
from layerstream.chunker.presets import write_random_checkpoint

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
logging.getLogger("layerstream").setLevel(logging.WARNING)
# Exactness tests compare against a resident model in the same process; one thread keeps the
# reductions in the same order in both.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small, but with enough blocks that a 25% budget streams most of them.
CONFIGS: dict[str, dict] = {
    "gpt2": dict(
        model_type="gpt2",
        architectures=["GPT2LMHeadModel"],
        n_embd=64,
        n_layer=12,
        n_head=4,
        vocab_size=320,
        n_positions=128,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama": dict(  # grouped-query attention, untied head, llama3 rope scaling
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=320,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "qwen2": dict(
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=12,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        max_position_embeddings=128,
    ),
    "mistral": dict(
        model_type="mistral",
        architectures=["MistralForCausalLM"],
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=12,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        max_position_embeddings=128,
        sliding_window=16,
    ),
    "bert": dict(
        model_type="bert",
        architectures=["BertModel"],
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=12,
        num_attention_heads=4,
        vocab_size=320,
        max_position_embeddings=128,
    ),
    "t5": dict(
        model_type="t5",
        architectures=["T5ForConditionalGeneration"],
        d_model=64,
        d_ff=128,
        num_layers=4,
        num_decoder_layers=3,
        num_heads=4,
        d_kv=16,
        vocab_size=320,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=2,
    ),
}


class ChunkedModel:
    """A random-init checkpoint (``source``) and its chunk store (``store``)."""

    def __init__(self, name: str, source: Path, store: Path):
        self.name, self.source, self.store = name, source, store

    @property
    def manifest(self) -> dict:
        return json.loads((self.store / "manifest.json").read_text())

    @property
    def total_bytes(self) -> int:
        return sum(c["bytes"] for c in self.manifest["chunks"].values())

    def resident(self, dtype: torch.dtype | None = None) -> transformers.PreTrainedModel:
        """The fully loaded transformers model on the same weights."""
        cls = getattr(transformers, self.manifest["architecture"])
        kwargs = {"dtype": dtype} if dtype is not None else {}
        return cls.from_pretrained(self.source, **kwargs).eval()


# Weight matrices of the scaled variants are multiplied by this: at the default init greedy
# decoding repeats one or two tokens, which makes equal ids a weak check (presets.py).
SCALED = 8.0


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """``make(name)``: the shared fixture model; ``make(name, weight_scale=SCALED)``: its
    scaled variant (other weights, other store), for the exactness tests."""
    built: dict[tuple[str, str | None, float], ChunkedModel] = {}

    def make(name: str, dtype: str | None = None, weight_scale: float = 1.0) -> ChunkedModel:
        key = (name, dtype, weight_scale)
        if key not in built:
            scaled = "" if weight_scale == 1.0 else f"-x{weight_scale:g}"
            root = tmp_path_factory.mktemp(f"{name}-{dtype or 'src'}{scaled}")
            config = root / "config.json"
            config.write_text(json.dumps(CONFIGS[name]))
            source = write_random_checkpoint(
                str(config), root / "source", weight_scale=weight_scale
            )
            store = root / "chunks"
            chunk_checkpoint(source, store, name, dtype=dtype, progress=False)
            built[key] = ChunkedModel(name, source, store)
        return built[key]

    return make


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """``make(name)``: the (checkpoint, chunk store) of an architectures.py row, built once
    per test module."""
    from architectures import build

    built: dict[str, tuple[Path, Path]] = {}

    def make(name: str) -> tuple[Path, Path]:
        if name not in built:
            built[name] = build(name, tmp_path_factory.mktemp(name))
        return built[name]

    return make
