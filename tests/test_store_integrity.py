"""A broken store is an error that names the chunk and what to do, never a wrong answer."""

from __future__ import annotations

import shutil

import pytest
import torch

from layerstream.engine.engine import Engine, EngineOptions
from layerstream.errors import ChunkIntegrityError, ChunkStoreError, ManifestError, SettingsError
from layerstream.stores import open_store

PROMPT = torch.tensor([[5, 17, 99, 3]])


@pytest.fixture
def store_copy(model_factory, tmp_path):
    path = tmp_path / "chunks"
    shutil.copytree(model_factory("llama").store, path)
    return path


def flip_byte(path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampered_non_block_chunk_fails_load(store_copy):
    flip_byte(store_copy / "rest.safetensors")
    with pytest.raises(ChunkIntegrityError, match=r"chunk rest .*sha256.*re-run the chunker"):
        Engine(open_store(str(store_copy)), EngineOptions(memory_budget="100%"))


def test_tampered_streamed_block_fails_the_request_not_the_answer(model_factory, store_copy):
    reference = model_factory("llama").resident()
    engine = Engine(open_store(str(store_copy)), EngineOptions(memory_budget="25%", read_ahead=0))
    try:
        assert 7 in engine.plan.streamed
        flip_byte(store_copy / "block_0007.safetensors")
        with pytest.raises(ChunkIntegrityError, match="block_0007"), engine.request():
            engine.model(PROMPT)
        # the engine recovers: with the chunk restored, the next request is exact again
        flip_byte(store_copy / "block_0007.safetensors")
        with engine.request():
            logits = engine.model(PROMPT).logits
        with torch.inference_mode():
            assert torch.equal(logits, reference(PROMPT).logits)
    finally:
        engine.close()


def test_missing_chunk_names_the_path(store_copy):
    (store_copy / "block_0002.safetensors").unlink()
    with pytest.raises(ChunkStoreError, match=r"block_0002.safetensors is missing"):
        engine = Engine(open_store(str(store_copy)), EngineOptions(memory_budget="100%"))
        engine.close()


def test_truncated_chunk_is_detected_even_without_checksums(store_copy):
    path = store_copy / "rest.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ChunkIntegrityError, match="truncated"):
        Engine(
            open_store(str(store_copy)), EngineOptions(memory_budget="100%", verify_checksums="off")
        )


def test_missing_store_and_manifest(tmp_path):
    with pytest.raises(ChunkStoreError, match="does not exist"):
        open_store(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChunkStoreError, match=r"manifest\.json is missing"):
        Engine(open_store(str(tmp_path / "empty")), EngineOptions())


def test_budget_below_the_minimum_says_what_is_needed(model_factory):
    with pytest.raises(SettingsError, match=r"below this model's minimum .* raise memory_budget"):
        Engine(open_store(str(model_factory("llama").store)), EngineOptions(memory_budget="1KiB"))


def test_unsupported_scheme_is_a_clear_error():
    with pytest.raises(
        ChunkStoreError,
        match=r"unknown scheme ftp://; use a directory, file://, s3:// or http\(s\)://",
    ):
        open_store("ftp://host/chunks")


def test_manifest_from_another_architecture_is_refused(store_copy):
    text = (store_copy / "manifest.json").read_text().replace("LlamaForCausalLM", "NotAModel")
    (store_copy / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match="NotAModel"):
        Engine(open_store(str(store_copy)), EngineOptions())


def test_chunk_changed_after_it_was_verified_is_caught(store_copy):
    engine = Engine(open_store(str(store_copy)), EngineOptions(memory_budget="25%", read_ahead=0))
    try:
        with engine.request():
            engine.model(PROMPT)  # block 7 read and verified
        flip_byte(store_copy / "block_0007.safetensors")  # rewritten in place: a new version
        with pytest.raises(ChunkIntegrityError, match="block_0007"), engine.request():
            engine.model(PROMPT)
    finally:
        engine.close()


@pytest.mark.parametrize(("mode", "hashed_every_read"), [("once", False), ("always", True)])
def test_verify_modes(model_factory, mode, hashed_every_read):
    # the background verifier would hash the streamed chunks before the requests need to
    options = EngineOptions(
        memory_budget="25%", read_ahead=1, verify_checksums=mode, verify_in_background=False
    )
    engine = Engine(open_store(str(model_factory("llama").store)), options)
    try:
        for _ in range(3):
            with engine.request():
                engine.model(PROMPT)
        stats = engine.streamer.stats
        distinct = 1 + len(engine.plan.resident) + len(engine.plan.streamed)  # rest + blocks
        assert stats.chunks_read > distinct
        assert stats.chunks_verified == (stats.chunks_read if hashed_every_read else distinct)
    finally:
        engine.close()


def test_auto_reader_maps_local_files_unless_every_read_is_hashed(model_factory):
    store = open_store(str(model_factory("llama").store))
    for verify, reader in (("once", "mmap"), ("off", "mmap"), ("always", "read")):
        engine = Engine(store, EngineOptions(memory_budget="25%", verify_checksums=verify))
        try:
            assert engine.streamer.reader == reader
        finally:
            engine.close()
    with pytest.raises(ValueError, match="reader must be one of"):
        Engine(store, EngineOptions(memory_budget="25%", reader="carrier-pigeon"))
