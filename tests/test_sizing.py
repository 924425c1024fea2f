"""`layerstream size`: each term of a served model's memory, their sum, and Seldon's
spec.memory, on the fixture models (no server is started here; docs/seldon.md has the
comparison with a real server's peak RSS)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from remote_servers import S3Server

from layerstream.chunker import cli
from layerstream.chunker.sizing import (
    BASELINE_BYTES,
    WORKING_SET_BYTES,
    config_from_json,
    size_model,
)
from layerstream.engine.plan import plan_residency
from layerstream.format.manifest import Manifest

MiB = 2**20
# the llama fixture (tests/conftest.py): 12 blocks, 2 KV heads of 64 / 8 = 8 dims, fp32,
# 128 positions: 2 (K and V) x 12 x 2 x 8 x 4 bytes per token
LLAMA_KV_PER_TOKEN = 2 * 12 * 2 * 8 * 4
LLAMA_CONTEXT = 128


@pytest.fixture(scope="module")
def llama(model_factory):
    model = model_factory("llama")
    manifest = Manifest.from_json((model.store / "manifest.json").read_text())
    config = config_from_json((model.store / "config.json").read_text())
    return model, manifest, config


def test_terms_at_a_budget_follow_the_residency_plan(llama):
    _, manifest, config = llama
    sizing = size_model(manifest, config, memory_budget="25%")
    budget = manifest.total_bytes * 25 // 100
    plan = plan_residency(manifest, budget, read_ahead=1)
    sizes = manifest.block_bytes
    assert not plan.fully_resident and plan.pool_buffers == 2
    assert sizing.budget == budget
    assert sizing.pinned == manifest.rest_bytes + sum(sizes[j] for j in plan.resident)
    assert sizing.pinned_blocks == len(plan.resident)
    assert sizing.buffers == 2 * max(sizes)
    # what the engine holds at most is what the budget allows, and the plan says it holds
    assert sizing.weights == plan.weight_bytes() <= budget


def test_auto_kv_budget_is_max_active_full_context_sequences(llama):
    _, manifest, config = llama
    sizing = size_model(manifest, config, max_active_sequences=3)
    assert sizing.kv_per_token == LLAMA_KV_PER_TOKEN
    assert sizing.kv == 3 * LLAMA_CONTEXT * LLAMA_KV_PER_TOKEN
    assert "3 sequences x 128 tokens" in sizing.kv_how
    shorter = size_model(manifest, config, max_active_sequences=3, context=16)
    assert shorter.kv == 3 * 16 * LLAMA_KV_PER_TOKEN


def test_an_explicit_kv_budget_is_taken_as_given(llama):
    _, manifest, config = llama
    sizing = size_model(manifest, config, kv_cache_budget="1MiB", max_active_sequences=64)
    assert sizing.kv == MiB
    assert f"({MiB // LLAMA_KV_PER_TOKEN} tokens)" in sizing.kv_how


def test_auto_budget_is_the_whole_model_resident(llama):
    _, manifest, config = llama
    sizing = size_model(manifest, config, memory_budget="auto")
    assert sizing.pinned == manifest.total_bytes
    assert sizing.pinned_blocks == sizing.n_blocks == 12
    assert sizing.buffers == 0
    # a budget above the model holds no more than the model
    assert size_model(manifest, config, memory_budget="10GiB").weights == manifest.total_bytes


def test_total_is_the_sum_of_the_terms_and_spec_memory_rounds_it_up(llama):
    _, manifest, config = llama
    sizing = size_model(manifest, config, memory_budget="25%", kv_cache_budget="3MiB")
    expected = (
        BASELINE_BYTES
        + sizing.pinned
        + sizing.buffers
        + WORKING_SET_BYTES
        + 3 * MiB  # the KV cache budget
        + 3 * MiB  # and its growth slack
    )
    assert sizing.total == expected == sum(nbytes for _, nbytes, _ in sizing.terms())
    assert sizing.spec_memory == f"{math.ceil(expected / MiB)}Mi"
    assert math.ceil(expected / MiB) * MiB >= expected > (math.ceil(expected / MiB) - 1) * MiB


def test_a_budget_below_the_models_minimum_is_refused(llama):
    from layerstream.errors import SettingsError

    _, manifest, config = llama
    with pytest.raises(SettingsError, match="below this model's minimum"):
        size_model(manifest, config, memory_budget="1KiB")


# -- the command -----------------------------------------------------------------------------


def _model_folder(tmp_path, store, extra: dict) -> str:
    folder = tmp_path / "repo" / "llama"
    folder.mkdir(parents=True)
    settings = {"name": "llama", "parameters": {"extra": {"chunk_store": str(store), **extra}}}
    (folder / "model-settings.json").write_text(json.dumps(settings))
    return str(folder)


def test_size_prints_every_term_the_total_and_spec_memory(llama, capsys):
    model, manifest, config = llama
    assert cli.main(["size", str(model.store), "--memory-budget", "25%"]) == 0
    out = capsys.readouterr().out
    sizing = size_model(manifest, config, memory_budget="25%")
    for term in (
        "process baseline",
        "pinned weights",
        "streaming buffers",
        "working set",
        "KV cache budget",
        "KV growth slack",
        "total",
    ):
        assert term in out
    assert f"Seldon Model spec.memory: {sizing.spec_memory}" in out
    assert f"memory_budget={sizing.budget}, kv_cache_budget={sizing.kv}" in out


def test_size_reads_a_model_folders_settings_and_the_flags_override_them(llama, tmp_path, capsys):
    """As Seldon passes them: every extra a string."""
    model, manifest, config = llama
    folder = _model_folder(
        tmp_path,
        model.store,
        {"memory_budget": "50%", "max_active_sequences": "2", "kv_cache_budget": "auto"},
    )
    assert cli.main(["size", folder]) == 0
    from_settings = size_model(manifest, config, memory_budget="50%", max_active_sequences=2)
    assert f"spec.memory: {from_settings.spec_memory}" in capsys.readouterr().out
    assert cli.main(["size", folder, "--kv-cache-budget", "2MiB", "--memory-budget", "25%"]) == 0
    overridden = size_model(manifest, config, memory_budget="25%", kv_cache_budget="2MiB")
    assert f"spec.memory: {overridden.spec_memory}" in capsys.readouterr().out


def test_size_reads_an_s3_store(llama, tmp_path, monkeypatch, capsys):
    """As docs/seldon.md sizes a store chunked into S3: the manifest and config only."""
    model, manifest, config = llama
    s3 = S3Server(tmp_path).start()
    try:
        s3.chunk(model.source, "s3://models/llama", "llama")
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        argv = ["size", "s3://models/llama", "--s3-endpoint-url", s3.endpoint]
        assert cli.main([*argv, "--memory-budget", "25%"]) == 0
    finally:
        s3.stop()
    sizing = size_model(manifest, config, memory_budget="25%")
    assert f"spec.memory: {sizing.spec_memory}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--memory-budget", "lots"], "--memory-budget"),
        (["--kv-cache-budget", "25%"], "--kv-cache-budget"),
        (["--read-ahead", "-1"], "--read-ahead"),
        (["--max-active-sequences", "0"], "--max-active-sequences must be at least 1"),
    ],
)
def test_size_argument_errors_name_the_flag(argv, words, caplog):
    assert cli.main(["size", "somewhere", *argv]) == 2
    assert words in caplog.text


def test_size_of_a_missing_store_says_so(tmp_path, caplog):
    assert cli.main(["size", str(tmp_path / "nothing")]) == 1
    assert "does not exist" in caplog.text
    (tmp_path / "empty").mkdir()
    assert cli.main(["size", str(tmp_path / "empty")]) == 1
    assert "manifest.json" in caplog.text


def test_size_help_and_argument_errors_import_no_torch():
    script = """
import contextlib, io, json, sys
from layerstream.chunker.cli import main
for argv in (["size", "--help"], ["size", "x", "--memory-budget", "lots"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_chunk_prints_the_sizing_of_the_new_store(tmp_path, capsys):
    dest = tmp_path / "repo" / "toy" / "chunks"
    argv = ["chunk", "--random-init", "tiny-llama", str(dest), "--memory-budget", "50%"]
    assert cli.main([*argv, "--quiet"]) == 0
    out = capsys.readouterr().out
    manifest = Manifest.from_json((dest / "manifest.json").read_text())
    config = config_from_json((dest / "config.json").read_text())
    sizing = size_model(manifest, config, memory_budget="50%")
    assert f"Seldon Model spec.memory: {sizing.spec_memory}" in out


def test_a_moe_store_is_sized_as_expert_streaming_plans_it(moe_models):
    """The manifest's base sizes give `layerstream size` the engine's own plan: every base
    pinned, the rest an expert cache, the weights within the budget."""
    from layerstream.engine.engine import Engine, EngineOptions
    from layerstream.stores import open_store

    _, store = moe_models("olmoe")
    manifest = Manifest.from_json((store / "manifest.json").read_text())
    config = config_from_json((store / "config.json").read_text())
    sizing = size_model(manifest, config, memory_budget="60%")
    engine = Engine(
        open_store(str(store)), EngineOptions(memory_budget="60%", expert_streaming="on")
    )
    try:
        plan = engine.plan
        assert sizing.based_blocks == len(plan.pinned_bases) > 0
        assert sizing.bases == sum(plan.pinned_bases.values())
        assert sizing.expert_cache == plan.expert_cache > 0
        assert sizing.weights == plan.weight_bytes() <= sizing.budget
    finally:
        engine.close()
    report = sizing.report()
    assert "pinned bases" in report and "expert cache" in report


def test_a_short_read_ahead_is_told_once_for_a_moe_store(moe_models, caplog):
    """Sized (or loaded) with expert streaming, a model is planned twice, without its bases
    and with them: a budget that leaves no room for the read-ahead is told once."""
    import logging

    _, store = moe_models("olmoe")
    manifest = Manifest.from_json((store / "manifest.json").read_text())
    config = config_from_json((store / "config.json").read_text())
    largest = max(manifest.block_bytes) + max(
        manifest.chunks[b.chunk].dequantized_room for b in manifest.blocks
    )
    budget = manifest.rest_bytes + largest + largest // 2  # one buffer, not two
    with caplog.at_level(logging.WARNING, logger="layerstream"):
        size_model(manifest, config, memory_budget=str(budget), read_ahead="1")
    told = [r for r in caplog.records if "leaves room for a read-ahead" in r.getMessage()]
    assert len(told) == 1


def test_a_moe_store_is_sized_for_the_expert_streaming_it_is_served_with(moe_models, capsys):
    """`--expert-streaming off` sizes whole blocks, as the engine plans them then; auto
    (the default) sizes expert streaming and says when auto streams whole blocks instead."""
    from layerstream.engine.engine import Engine, EngineOptions
    from layerstream.stores import open_store

    _, store = moe_models("olmoe")
    manifest = Manifest.from_json((store / "manifest.json").read_text())
    config = config_from_json((store / "config.json").read_text())
    whole = size_model(manifest, config, memory_budget="60%", expert_streaming="off")
    engine = Engine(
        open_store(str(store)), EngineOptions(memory_budget="60%", expert_streaming="off")
    )
    try:
        assert whole.based_blocks == 0 and whole.pinned_blocks == len(engine.plan.resident)
    finally:
        engine.close()
    size = ["size", str(store), "--memory-budget", "60%"]
    assert cli.main([*size, "--expert-streaming", "off"]) == 0
    assert "pinned bases" not in capsys.readouterr().out
    assert cli.main(size) == 0
    out = capsys.readouterr().out
    assert "pinned bases" in out and "auto streams whole blocks instead" in out
    with pytest.raises(ValueError, match="expert_streaming must be auto, on or off"):
        size_model(manifest, config, memory_budget="60%", expert_streaming="sometimes")
