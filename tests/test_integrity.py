"""Tampering with the chunk store gives an error that names the chunk, never a wrong answer.

Each test is a reproduction of a hole found by tampering with a served store: a chunk
rewritten in place with its mtime restored, symbolic links out of the store, chunks whose
tensors do not fit the model, damaged streamed chunks, hand-edited manifests, and a pinned
block nobody hashed.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from mlserver_proc import MLServerProcess, ModelSpec, prompt_input, raw_sse
from remote_servers import StaticServer
from safetensors.torch import load_file, save_file

from layerstream.engine.engine import Engine, EngineOptions
from layerstream.errors import ChunkIntegrityError, ManifestError
from layerstream.format.manifest import Manifest
from layerstream.format.safetensors import sha256_of
from layerstream.stores import LocalStore, StoreOptions, open_store

PROMPT = torch.tensor([[5, 17, 99, 3, 250, 7]])
VICTIM = 7  # a block that a 25% budget streams and a 100% budget pins


@pytest.fixture
def store_copy(model_factory, tmp_path) -> Path:
    path = tmp_path / "chunks"
    shutil.copytree(model_factory("llama").store, path)
    return path


@pytest.fixture(scope="module")
def expected_logits(model_factory) -> torch.Tensor:
    with torch.inference_mode():
        return model_factory("llama").resident()(PROMPT).logits


def engine_for(store: Path | str, budget: str = "25%", **options) -> Engine:
    return Engine(open_store(str(store)), EngineOptions(memory_budget=budget, **options))


def block_file(store: Path, j: int = VICTIM) -> Path:
    return store / f"block_{j:04d}.safetensors"


def rewrite_in_place(path: Path, data: bytes) -> None:
    """Overwrite ``path`` through the same inode, then set its mtime back, as an attacker can."""
    before = os.stat(path)
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )


def another_blocks_weights(store: Path) -> bytes:
    """Block VICTIM's header with the tensor bytes of block VICTIM-1: what another model's
    block of the same shapes looks like (same size, same names, other values)."""
    mine, other = block_file(store).read_bytes(), block_file(store, VICTIM - 1).read_bytes()
    start = 8 + int.from_bytes(mine[:8], "little")
    assert start == 8 + int.from_bytes(other[:8], "little") and len(mine) == len(other)
    return mine[:start] + other[start:]


def request(engine: Engine) -> torch.Tensor:
    with engine.request():
        return engine.model(PROMPT).logits


# -- 1. a chunk rewritten in place, size and mtime kept -------------------------------------


@pytest.mark.parametrize("reader", ["mmap", "read"])
def test_in_place_rewrite_with_mtime_restored_is_caught(store_copy, expected_logits, reader):
    engine = engine_for(store_copy, read_ahead=0, reader=reader, verify_in_background=False)
    try:
        assert VICTIM in engine.plan.streamed
        assert torch.equal(request(engine), expected_logits)
        original = block_file(store_copy).read_bytes()
        rewrite_in_place(block_file(store_copy), another_blocks_weights(store_copy))
        for _ in range(2):  # and again: a failed check is never remembered as a pass
            with pytest.raises(ChunkIntegrityError, match=f"block_{VICTIM:04d}.*sha256"):
                request(engine)
        rewrite_in_place(block_file(store_copy), original)
        assert torch.equal(request(engine), expected_logits)
    finally:
        engine.close()


def test_a_chunk_rewritten_while_its_block_runs_fails_that_request(store_copy, expected_logits):
    """A kept mapping shows an in-place rewrite at once: the block checks, after it ran, that
    its file is still the version verified before it ran."""
    engine = engine_for(store_copy, read_ahead=0, verify_in_background=False)
    try:
        assert torch.equal(request(engine), expected_logits)  # block VICTIM mapped and kept
        path = block_file(store_copy)
        data = path.read_bytes()
        inner = engine.model.get_submodule(engine.prefixes[VICTIM]).self_attn
        handle = inner.register_forward_pre_hook(lambda *_: rewrite_in_place(path, data))
        try:
            with pytest.raises(ChunkIntegrityError, match="modified while its block ran"):
                request(engine)
        finally:
            handle.remove()
        assert torch.equal(request(engine), expected_logits)  # same bytes: verified, exact
    finally:
        engine.close()


def test_version_changes_with_ctime_when_only_content_changes(store_copy):
    store = LocalStore(store_copy)
    before = store.version(block_file(store_copy).name)
    rewrite_in_place(block_file(store_copy), another_blocks_weights(store_copy))
    assert store.version(block_file(store_copy).name) != before


# -- 2. symbolic links out of the store -------------------------------------------------------


def link(path: Path, target: Path) -> None:
    path.unlink()
    path.symlink_to(target)


@pytest.mark.parametrize("budget", ["25%", "100%"])
def test_a_chunk_linked_to_a_file_outside_the_store_is_refused(store_copy, tmp_path, budget):
    size = os.path.getsize("/etc/passwd")
    link(block_file(store_copy), Path("/etc/passwd"))
    with pytest.raises(ChunkIntegrityError, match="symbolic link") as info:
        engine_for(store_copy, budget)
    message = str(info.value)
    assert f"block_{VICTIM:04d}" in message and "passwd" not in message
    assert f"{size} bytes" not in message and f"more than {size}" not in message


def test_a_link_to_an_exact_copy_outside_the_store_is_refused(store_copy, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(block_file(store_copy), outside)  # right bytes, right sha256
    link(block_file(store_copy), outside)
    with pytest.raises(ChunkIntegrityError, match="resolves outside the chunk store"):
        engine_for(store_copy)


def test_links_that_stay_inside_the_store_are_served(store_copy, expected_logits):
    (store_copy / "sub").mkdir()
    moved = store_copy / "sub" / block_file(store_copy).name
    shutil.move(block_file(store_copy), moved)
    block_file(store_copy).symlink_to(Path("sub") / moved.name)
    engine = engine_for(store_copy)
    try:
        assert torch.equal(request(engine), expected_logits)
    finally:
        engine.close()


def test_a_chunk_swapped_for_a_link_after_load_is_refused(store_copy, tmp_path, expected_logits):
    engine = engine_for(store_copy, read_ahead=0, verify_in_background=False)
    try:
        assert torch.equal(request(engine), expected_logits)
        outside = tmp_path / "copy.safetensors"
        shutil.copyfile(block_file(store_copy), outside)
        link(block_file(store_copy), outside)
        with pytest.raises(ChunkIntegrityError, match="symbolic link"):
            request(engine)
    finally:
        engine.close()


@pytest.mark.parametrize("name", ["manifest.json", "tokenizer.json"])
def test_manifest_and_side_files_linked_out_of_the_store_are_refused(store_copy, tmp_path, name):
    outside = tmp_path / name
    shutil.copyfile(store_copy / name, outside)
    link(store_copy / name, outside)
    with pytest.raises(ChunkIntegrityError, match="resolves outside the chunk store"):
        engine_for(store_copy)


def test_a_named_pipe_in_place_of_a_chunk_is_refused_not_waited_on(store_copy):
    """Opening a FIFO for reading blocks until a writer comes: the load must not."""
    block_file(store_copy).unlink()
    os.mkfifo(block_file(store_copy))
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            engine_for(store_copy).close()
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=120)
    if thread.is_alive():  # free the blocked open before failing
        with open(block_file(store_copy), "wb"):
            pass
        pytest.fail("the load blocked on a named pipe")
    assert isinstance(outcome[0], ChunkIntegrityError)
    assert "not a regular file" in str(outcome[0])


@pytest.mark.parametrize("damage", ["deleted", "emptied"])
def test_a_chunk_deleted_or_emptied_while_served_takes_the_model_out(store_copy, damage):
    engine = engine_for(store_copy, read_ahead=0, verify_in_background=False)
    try:
        request(engine)
        if damage == "deleted":
            block_file(store_copy).unlink()
        else:
            block_file(store_copy).write_bytes(b"")
        with pytest.raises(ChunkIntegrityError, match=f"block_{VICTIM:04d}") as info:
            request(engine)
        assert info.value.kind == "integrity"
        assert engine.damage is not None  # the model stops reporting ready
    finally:
        engine.close()


# -- 3. chunk tensors checked against the model built from the config ------------------------


def rewrite_chunk(store: Path, chunk: str, change) -> None:
    """Rewrite ``chunk`` with ``change(tensors)`` and update the manifest to match (size,
    sha256, tensor list), as a careless or hostile re-chunking would."""
    manifest = json.loads((store / "manifest.json").read_text())
    info = manifest["chunks"][chunk]
    path = store / info["file"]
    tensors = change(load_file(path))
    save_file(tensors, path)
    data = path.read_bytes()
    info.update(
        bytes=len(data),
        sha256=sha256_of(torch.frombuffer(bytearray(data), dtype=torch.uint8)),
        tensors=sorted(tensors),
    )
    (store / "manifest.json").write_text(json.dumps(manifest))


UP = f"model.layers.{VICTIM}.mlp.up_proj.weight"  # [160, 64] in the llama fixture


def transposed(tensors):
    return {**tensors, UP: tensors[UP].t().contiguous()}


def half(tensors):
    return {**tensors, UP: tensors[UP].half()}


def extra(tensors):
    return {**tensors, f"model.layers.{VICTIM}.mlp.bias": torch.zeros(64)}


def missing(tensors):
    return {k: v for k, v in tensors.items() if k != UP}


@pytest.mark.parametrize("budget", ["25%", "100%"])
@pytest.mark.parametrize(
    ("change", "words"),
    [
        (transposed, [UP, "[64, 160] float32", "needs [160, 64] float32"]),
        (half, [UP, "[160, 64] float16", "needs [160, 64] float32"]),
        (extra, ["mlp.bias", "does not have"]),
        (missing, ["lacks tensors the model needs", UP]),
    ],
    ids=["transposed", "dtype", "extra", "missing"],
)
def test_chunk_tensors_that_do_not_fit_the_model_fail_the_load(store_copy, budget, change, words):
    rewrite_chunk(store_copy, f"block_{VICTIM:04d}", change)
    with pytest.raises(ChunkIntegrityError) as info:
        engine_for(store_copy, budget)
    for word in [f"block_{VICTIM:04d}", "re-run the chunker", *words]:
        assert word in str(info.value)


def test_rest_chunk_that_does_not_fit_the_model_fails_the_load(store_copy):
    def wrong(tensors):
        return {**tensors, "lm_head.weight": tensors["lm_head.weight"][:-1].contiguous()}

    rewrite_chunk(store_copy, "rest", wrong)
    with pytest.raises(ChunkIntegrityError, match=r"lm_head\.weight is \[319, 64\]"):
        engine_for(store_copy)


def test_remote_chunk_that_does_not_fit_the_model_fails_the_load(store_copy):
    """Over HTTP the check costs one ranged read of each streamed chunk's header."""
    rewrite_chunk(store_copy, f"block_{VICTIM:04d}", transposed)
    server = StaticServer(store_copy).start()
    try:
        store = open_store(server.url, options=StoreOptions(deadline_s=5.0))
        with pytest.raises(ChunkIntegrityError, match=r"\[64, 160\] float32"):
            Engine(store, EngineOptions(memory_budget="25%"))
    finally:
        server.stop()


# -- 4. damaged streamed chunks found at load, or in the background ---------------------------


@pytest.mark.parametrize("length", [0, 1000], ids=["zero-byte", "truncated"])
def test_short_streamed_chunk_fails_the_load(store_copy, length):
    path = block_file(store_copy)
    path.write_bytes(path.read_bytes()[:length])
    with pytest.raises(ChunkIntegrityError, match=f"has {length} bytes, the manifest says"):
        engine_for(store_copy)


def flip_tensor_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))


def test_background_verification_takes_a_damaged_model_out_of_service(store_copy, expected_logits):
    original = block_file(store_copy).read_bytes()
    flip_tensor_byte(block_file(store_copy))  # same size: only a hash can tell
    engine = engine_for(store_copy)
    try:
        assert engine.verifier is not None
        assert engine.verifier.done.wait(timeout=120)
        assert engine.damage is not None
        message = engine.damage.message
        assert f"block_{VICTIM:04d}" in message and "re-run the chunker" in message
        with pytest.raises(ChunkIntegrityError, match=f"block_{VICTIM:04d}"):
            request(engine)
        # restored (a new version): the next request verifies it and the model is whole again
        block_file(store_copy).write_bytes(original)
        assert torch.equal(request(engine), expected_logits)
        assert engine.damage is None
    finally:
        engine.close()


def test_background_verification_passes_a_whole_store_and_spares_the_requests(model_factory):
    engine = engine_for(model_factory("llama").store)
    try:
        assert engine.verifier is not None and engine.verifier.done.wait(timeout=120)
        assert engine.damage is None
        with engine.request() as scope:
            engine.model(PROMPT)
        assert scope.stats.streamed_runs == len(engine.plan.streamed) > 0
        assert scope.stats.chunks_verified == 0  # every version already passed
    finally:
        engine.close()


def test_background_verification_can_be_switched_off(model_factory):
    engine = engine_for(model_factory("llama").store, verify_in_background=False)
    try:
        assert engine.verifier is None
    finally:
        engine.close()


# -- the pinned blocks: hashed before their first use, whatever the budget -------------------


@pytest.mark.parametrize("budget", ["100%", "60%"])
def test_tampered_pinned_block_fails_the_load_when_pinned_at_load(store_copy, budget):
    flip_tensor_byte(block_file(store_copy, 0))  # the first blocks are the pinned ones
    with pytest.raises(ChunkIntegrityError, match=r"block_0000.*sha256"):
        engine_for(store_copy, budget, verify_in_background=False, pin_in_background=False)


@pytest.mark.parametrize("budget", ["100%", "60%"])
def test_tampered_pinned_block_read_in_the_background_is_never_used(store_copy, budget):
    """Ready before its pinned blocks are read (fill.py): the damaged one is found by the
    fill's hash, the model leaves readiness, and a request fails naming it, never runs."""
    flip_tensor_byte(block_file(store_copy, 0))
    engine = engine_for(store_copy, budget, verify_in_background=False)
    try:
        with pytest.raises(ChunkIntegrityError, match=r"block_0000.*sha256"):
            engine.wait_pinned()
        assert engine.damage is not None and "block_0000" in str(engine.damage)
        with pytest.raises(ChunkIntegrityError, match=r"block_0000.*sha256"), engine.request():
            engine.model(PROMPT)
    finally:
        engine.close()


# -- 5. manifest fields are typed and plausible -----------------------------------------------


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda m: m["chunks"]["rest"].update(bytes="25173000"), ["'bytes'", "int", "str"]),
        (lambda m: m["chunks"]["rest"].update(bytes=1e30), ["'bytes'", "int", "float"]),
        (lambda m: m["chunks"]["rest"].update(bytes=10**30), ["implausible size"]),
        (lambda m: m["chunks"]["rest"].update(bytes=True), ["'bytes'", "boolean"]),
        (lambda m: m["chunks"]["rest"].update(tensors="lm_head.weight"), ["'tensors'", "list"]),
        (lambda m: m["chunks"]["rest"].update(sha256=12), ["'sha256'", "str"]),
        (lambda m: m["chunks"]["rest"].pop("sha256"), ["exactly the fields"]),
        (lambda m: m["blocks"].__setitem__(0, "model.layers.0"), ["'blocks'", "dict"]),
        (lambda m: m["blocks"][0].update(chunk=3), ["'chunk'", "str"]),
        (lambda m: m.update(rest="rest"), ["'rest'", "list"]),
        (lambda m: m.update(tied=[["a", 1]]), ["'tied'", "str"]),
        (lambda m: m.update(files={"config.json": 1}), ["'files'", "list"]),
        (lambda m: m.update(format_version=True), ["format_version", "boolean"]),
        (lambda m: m.update(name=None), ["'name'", "str"]),
    ],
)
def test_manifest_fields_are_type_checked(model_factory, edit, words):
    data = json.loads((model_factory("llama").store / "manifest.json").read_text())
    edit(data)
    with pytest.raises(ManifestError) as info:
        Manifest.from_json(json.dumps(data))
    for word in words:
        assert word in str(info.value)


def edit_manifest(store: Path, edit) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    edit(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        # lm_head and the embeddings are apart in this llama: aliasing them answers wrongly
        (
            lambda m: m.update(tied=[["lm_head.weight", "model.embed_tokens.weight"]]),
            ["ties", "the model built from config.json ties []"],
        ),
        (lambda m: m.update(tied=[["a", "b"]]), ["ties"]),
        (lambda m: m.update(architecture="MistralForCausalLM"), ["MistralConfig", "LlamaConfig"]),
        (lambda m: m.update(model_type="mistral"), ["mistral", "llama config"]),
        (lambda m: m["file_sha256"].pop("config.json"), ["no digest for ['config.json']"]),
        (lambda m: m["blocks"].pop(5), ["12 blocks, the manifest lists 11", "block 5"]),
    ],
    ids=["tied", "tied-unknown", "architecture", "model-type", "side-file-digest", "blocks"],
)
def test_manifest_edits_that_would_change_the_model_fail_the_load(store_copy, edit, words):
    edit_manifest(store_copy, edit)
    with pytest.raises(ManifestError) as info:
        engine_for(store_copy)
    for word in words:
        assert word in str(info.value)


def test_a_deeply_nested_manifest_is_a_manifest_error():
    with pytest.raises(ManifestError, match="nested too deeply"):
        Manifest.from_json("[" * 100_000 + "]" * 100_000)


def test_a_manifest_with_a_string_size_fails_the_model_load(store_copy):
    manifest = json.loads((store_copy / "manifest.json").read_text())
    manifest["chunks"][f"block_{VICTIM:04d}"]["bytes"] = "25173000"
    (store_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="re-run the chunker"):
        engine_for(store_copy)


# -- through mlserver: a damaged model stops reporting ready ---------------------------------


@pytest.mark.e2e
def test_served_model_with_a_damaged_chunk_stops_reporting_ready(store_copy, tmp_path):
    good = block_file(store_copy).read_bytes()
    flip_tensor_byte(block_file(store_copy))
    server = MLServerProcess(
        tmp_path / "server", [ModelSpec("damaged", store_copy, {"memory_budget": "25%"})]
    ).start()
    try:
        deadline = time.monotonic() + 120
        with httpx.Client(timeout=10.0) as client:
            # damage found (by the background pass) and the load over (it may end later)
            while not all(
                line in server.log_text()
                for line in ("no longer ready", "Loaded model 'damaged' successfully")
            ):
                assert server.alive(), server.log_tail()
                assert time.monotonic() < deadline, server.log_tail()
                time.sleep(0.2)  # polling interval, not a timing assertion
            log = server.log_text()
            assert f"block_{VICTIM:04d}" in log and "re-run the chunker" in log
            ready = client.get(f"{server.http_url}/v2/models/damaged/ready")
            assert ready.status_code != 200  # the probes send traffic elsewhere
            assert client.get(f"{server.http_url}/v2/health/live").status_code == 200
            # a request that still comes is told which chunk and what to do
            infer = client.post(
                f"{server.http_url}/v2/models/damaged/infer",
                json={"inputs": [prompt_input("hello")]},
            )
            assert infer.status_code == 500
            error = infer.json()["error"]
            assert error.startswith("integrity: ") and f"block_{VICTIM:04d}" in error
            assert "re-run the chunker" in error
        events = raw_sse(server.http_url, "damaged", {"inputs": [prompt_input("hello")]})
        assert [e["parameters"]["error_type"] for e in events] == ["integrity"]
        # Repaired as the chunker replaces files (by rename): the next request checks the
        # new version and is served, and the model is ready again. The latched damage was
        # raised before anything was tried, so every request failed with the stale error.
        replacement = store_copy / "block.repaired"
        replacement.write_bytes(good)
        os.replace(replacement, block_file(store_copy))
        request = {"inputs": [prompt_input("hello")], "parameters": {"max_new_tokens": 3}}
        events = raw_sse(server.http_url, "damaged", request)
        assert [e["parameters"].get("finish_reason") for e in events][-1] == "length", events
        assert httpx.get(f"{server.http_url}/v2/models/damaged/ready").status_code == 200
        assert "was replaced by a version that passed its check" in server.log_text()
    finally:
        server.stop()
