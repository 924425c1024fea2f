"""Models whose forward writes to their own weights (engine/writes.py): RWKV divides block
weights in place on its first forward. Streamed, the division was lost (logits off by 17 at
25%, no error); two first requests at once divided twice."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
import transformers
from architectures import ARCHITECTURES, PROMPT, build, reference_model

from layerstream.chunker.sinks import ChunkerError
from layerstream.engine.engine import Engine, EngineOptions
from layerstream.errors import ManifestError, SettingsError
from layerstream.format.manifest import Manifest
from layerstream.stores import open_store


@pytest.fixture(scope="module")
def rwkv(tmp_path_factory):
    return build("rwkv", tmp_path_factory.mktemp("rwkv"))


def greedy(model, steps: int = 6) -> list[int]:
    prompt = torch.tensor([PROMPT])
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0].tolist()


def test_the_chunker_records_the_writes_of_the_first_forward(rwkv):
    _, store = rwkv
    data = json.loads((store / "manifest.json").read_text())
    assert data["format_version"] == 4  # an older reader refuses the store
    written = data["weight_writes"]["first"]
    assert "rwkv.blocks.0.attention.output.weight" in written
    assert all(".blocks." in name for name in written)


@pytest.mark.parametrize("budget", ["25%", "90%"])
def test_a_budget_that_streams_a_block_is_refused(rwkv, budget):
    _, store = rwkv
    with pytest.raises(SettingsError, match=r"served only with every block in memory.*100%"):
        Engine(open_store(str(store)), EngineOptions(budget))


def two_at_once(engine: Engine) -> list[list[int] | None]:
    answers: list[list[int] | None] = [None, None]
    start = threading.Barrier(2)

    def run(k: int) -> None:
        start.wait()
        with engine.request():
            answers[k] = greedy(engine.model)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return answers


def test_two_first_requests_at_once_are_each_exact(rwkv):
    """The write is made once, at load: requests racing to be first no longer divide the
    weights twice (it went wrong in 5 of 50 fresh engines before), nor does the first
    request of an engine differ from the later ones."""
    source, store = rwkv
    with torch.inference_mode():
        expected = greedy(reference_model(source))
    for _ in range(3):
        engine = Engine(open_store(str(store)), EngineOptions("100%", compute_slots=2))
        try:
            assert two_at_once(engine) == [expected, expected]
            assert two_at_once(engine) == [expected, expected]
        finally:
            engine.close()


def test_a_store_chunked_before_the_check_is_checked_at_load(rwkv, tmp_path):
    """A manifest without ``weight_writes`` (an older chunker's): the engine learns it."""
    _, store = rwkv
    data = json.loads((store / "manifest.json").read_text())
    older = tmp_path / "chunks"
    shutil.copytree(store, older)
    del data["weight_writes"]
    data["format_version"] = 1
    (older / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(SettingsError, match="writes to its weights on its first forward"):
        Engine(open_store(str(older)), EngineOptions("25%"))


def test_an_edited_manifest_cannot_hide_the_writes_from_an_older_reader(rwkv):
    _, store = rwkv
    data = json.loads((store / "manifest.json").read_text())
    data["format_version"] = 3
    with pytest.raises(ManifestError, match="edited"):
        Manifest.from_json(json.dumps(data))


def test_a_model_that_writes_on_every_forward_is_refused(tmp_path, monkeypatch):
    """A model whose every forward writes (here RWKV made to rescale on each): each answer
    would depend on the requests before it."""
    forward = transformers.RwkvModel.forward

    def rescale_always(self, *args, **kwargs):
        self.layers_are_rescaled = self.training
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(transformers.RwkvModel, "forward", rescale_always)
    with pytest.raises(ChunkerError, match="writes to its weights on every forward"):
        build("rwkv", tmp_path, config=ARCHITECTURES["rwkv"])
