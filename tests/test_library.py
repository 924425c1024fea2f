"""layerstream as a library (library.py): ``layerstream.load`` returns the model's own
transformers class, its blocks streamed while it runs; it generates, runs forward with
hidden states and in a pipeline exactly as ``from_pretrained`` of the same checkpoint does,
from several threads at once too."""

from __future__ import annotations

import threading

import pytest
import torch
import transformers

import layerstream

PROMPT = torch.tensor([[5, 17, 99, 3, 250, 7, 42, 130]])


def greedy(model, steps: int = 8) -> list[int]:
    out = model.generate(
        PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=steps, do_sample=False
    )
    return out[0].tolist()


def test_load_generates_and_runs_forward_as_from_pretrained(model_factory):
    chunked = model_factory("llama")
    reference = chunked.resident()
    with layerstream.load(chunked.store, memory_budget="25%") as model:
        assert isinstance(model, transformers.LlamaForCausalLM)
        assert type(model).__name__ == "LlamaForCausalLM"
        assert model.tokenizer is not None
        assert model._layerstream_engine.plan.n_blocks > len(
            model._layerstream_engine.plan.resident
        )
        with torch.no_grad():
            expected = greedy(reference)
            got = greedy(model)
            mine = model(PROMPT, output_hidden_states=True)
            theirs = reference(PROMPT, output_hidden_states=True)
        assert got == expected
        assert torch.equal(mine.logits, theirs.logits)
        assert len(mine.hidden_states) == len(theirs.hidden_states)
        for a, b in zip(mine.hidden_states, theirs.hidden_states, strict=True):
            assert torch.equal(a, b)


def test_a_pipeline_runs_the_streamed_model(model_factory):
    chunked = model_factory("gpt2")
    reference = chunked.resident()
    text = "Once upon a time"
    with layerstream.load(chunked.store, memory_budget="25%") as model:
        streamed = transformers.pipeline("text-generation", model=model, tokenizer=model.tokenizer)
        expected = transformers.pipeline(
            "text-generation", model=reference, tokenizer=model.tokenizer
        )
        settings = {"max_new_tokens": 8, "do_sample": False}
        assert streamed(text, **settings) == expected(text, **settings)


def test_generate_from_threads_is_each_what_it_is_alone(model_factory):
    chunked = model_factory("llama")
    with layerstream.load(chunked.store, memory_budget="25%") as model:
        alone = greedy(model, 12)
        answers: list = [None] * 3
        start = threading.Barrier(3)

        def run(k: int) -> None:
            start.wait()
            answers[k] = greedy(model, 12)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert answers == [alone, alone, alone]


# Run where MLServer cannot be imported (as after `pip install layerstream` without the
# server extra): chunk a checkpoint with the CLI, load the store, generate, and fail with
# layerstream's own error; then check that nothing of the server was imported.
WITHOUT_SERVER = """
import sys

for name in ("mlserver", "grpc", "fastapi", "uvicorn", "prometheus_client", "pydantic_settings"):
    sys.modules[name] = None  # `import name` raises ImportError from here on

import torch

import layerstream
from layerstream.chunker.cli import main as chunker
from layerstream.errors import SettingsError

source, store = sys.argv[1], sys.argv[2]
assert chunker(["chunk", source, store, "--name", "nolib"]) == 0
with layerstream.load(store, memory_budget="25%") as model:
    prompt = torch.tensor([[5, 17, 99, 3]])
    ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                         do_sample=False)
    print("ids", ids[0].tolist())
try:
    layerstream.load(store, memory_budget="1KiB")
except SettingsError as exc:
    print("refused", exc.status_code, exc)
assert chunker(["size", store]) == 2  # it needs the server extra, and says so
try:
    layerstream.LayerStreamRuntime
except ModuleNotFoundError as exc:
    print("runtime:", exc)
loaded = sorted(n for n, m in sys.modules.items()
                if m is not None and n.split(".")[0] in ("mlserver", "grpc", "fastapi"))
print("server modules", loaded)
"""


def test_the_library_and_the_chunker_run_without_mlserver(model_factory, tmp_path):
    import subprocess
    import sys

    chunked = model_factory("llama")
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_SERVER, str(chunked.source), str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    with torch.no_grad():
        expected = chunked.resident().generate(
            PROMPT[:, :4],
            attention_mask=torch.ones_like(PROMPT[:, :4]),
            max_new_tokens=4,
            do_sample=False,
        )
    assert f"ids {expected[0].tolist()}" in lines
    refused = next(line for line in lines if line.startswith("refused"))
    assert refused.startswith("refused 422 configuration: memory_budget")
    assert "server modules []" in lines
    assert any(line.startswith("runtime:") and "layerstream[server]" in line for line in lines), (
        lines
    )
    assert "layerstream size reads a model's server settings" in done.stderr


def test_a_closed_model_says_so(model_factory):
    model = layerstream.load(model_factory("gpt2").store, memory_budget="25%")
    model.close()
    model.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        model.generate(PROMPT, max_new_tokens=2)
