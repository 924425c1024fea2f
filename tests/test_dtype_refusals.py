"""Models that cannot run in the dtype they are chunked in (engine/writes.py): XLNet in half
precision multiplies half-precision queries by float32 positions made in its forward, and
transformers' own forward fails on every request. The chunker refuses such a store instead
of writing one whose every request fails."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from architectures import PROMPT, build, reference_model

from layerstream.chunker.sinks import ChunkerError
from layerstream.engine.engine import Engine, EngineOptions
from layerstream.errors import SettingsError
from layerstream.stores import open_store


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_xlnet_in_half_precision_is_refused_at_chunk_time(dtype, tmp_path):
    with pytest.raises(ChunkerError, match=rf"XLNetLMHeadModel cannot run in {dtype}.*aten\.bmm"):
        build("xlnet", tmp_path, dtype=dtype)
    # and the reason is transformers' own: its forward fails the same way on a CPU
    source = tmp_path / "source"
    with pytest.raises(RuntimeError, match="expected scalar type"):
        reference_model(source)(torch.tensor([PROMPT]))


def _gpt2_mlp_times(make) -> object:
    """GPT-2's MLP with its output multiplied by ``make(width)``, a tensor made in forward
    (as XLNet makes its positions), in float32 whatever the model's dtype."""
    forward = transformers.models.gpt2.modeling_gpt2.GPT2MLP.forward

    def mixed(self, hidden_states):
        out = forward(self, hidden_states)
        return out @ make(out.shape[-1]) if make is torch.eye else out * make(out.shape[-1])

    return mixed


def test_another_model_that_mixes_dtypes_in_a_matmul_is_refused(tmp_path, monkeypatch):
    """Another member of the class: any op given two floating dtypes where it takes one."""
    mlp = transformers.models.gpt2.modeling_gpt2.GPT2MLP
    monkeypatch.setattr(mlp, "forward", _gpt2_mlp_times(torch.eye))
    with pytest.raises(ChunkerError, match=r"GPT2LMHeadModel cannot run in float16.*aten\.mm"):
        build("gpt2", tmp_path, dtype="float16")


def test_a_mix_that_torch_promotes_is_not_refused(tmp_path, monkeypatch):
    """A float32 scalar times a half-precision tensor stays half precision: it runs, on the
    meta device and on a CPU, and is served."""
    mlp = transformers.models.gpt2.modeling_gpt2.GPT2MLP
    monkeypatch.setattr(mlp, "forward", _gpt2_mlp_times(lambda n: torch.tensor(1.0)))
    source, store = build("gpt2", tmp_path, dtype="float16")
    engine = Engine(open_store(str(store)), EngineOptions("25%"))
    try:
        with torch.inference_mode(), engine.request():
            got = engine.model(torch.tensor([PROMPT])).logits
        with torch.inference_mode():
            expected = reference_model(source)(torch.tensor([PROMPT])).logits
        assert torch.equal(got, expected)
    finally:
        engine.close()


def test_a_store_chunked_before_the_check_is_refused_at_load(tmp_path, monkeypatch):
    """A manifest without ``weight_writes`` (an older chunker's) is checked at load: the
    mismatch is a load error, not a failure of every request."""
    _, store = build("gpt2", tmp_path, dtype="float16")
    data = json.loads((store / "manifest.json").read_text())
    older = tmp_path / "older"
    shutil.copytree(store, older)
    data.pop("weight_writes", None)
    data["format_version"] = 1
    (older / "manifest.json").write_text(json.dumps(data))
    mlp = transformers.models.gpt2.modeling_gpt2.GPT2MLP
    monkeypatch.setattr(mlp, "forward", _gpt2_mlp_times(torch.eye))
    with pytest.raises(SettingsError, match=r"cannot run in float16.*float16 and float32"):
        Engine(open_store(str(older)), EngineOptions("100%"))
