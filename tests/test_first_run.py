"""What someone meets first: quick help, a chunk command that needs no more than it must,
client output a person can read, and a clear answer for a model name the server lacks."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from mlserver_proc import BERT, SOURCES, prompt_input

from layerstream.chunker import cli as chunker_cli
from layerstream_client import (
    Final,
    GRPCClient,
    HiddenState,
    ModelNotLoadedError,
    ModelStatus,
    SSEClient,
    Token,
)
from layerstream_client import cli as client_cli

pytest_plugins = ["mlserver_proc"]

HEAVY = ("torch", "transformers", "safetensors", "mlserver", "grpc", "boto3")
TRANSPORTS = ("sse", "grpc")


def _modules_loaded_by(module: str, argvs: list[list[str]]) -> list[str]:
    """The heavy modules a fresh interpreter holds after ``module.main(argv)`` for each argv
    (help exits, argument errors return or exit)."""
    script = f"""
import contextlib, io, json, sys
from {module} import main
for argv in {argvs!r}:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])


# -- help and argument errors answer before the heavy imports ------------------------------


def test_chunker_help_and_argument_errors_import_no_torch(tmp_path):
    argvs = [
        ["--help"],
        ["chunk", "--help"],
        ["chunk"],  # DEST missing: argparse's error
        ["chunk", "--random-init", "tiny-llama", "src", str(tmp_path / "m" / "chunks")],
        ["chunk", str(tmp_path / "src"), str(tmp_path / "store")],  # no --name to infer
        ["chunk", "src", str(tmp_path / "m" / "chunks"), "--memory-budget", "lots"],
    ]
    assert _modules_loaded_by("layerstream.chunker.cli", argvs) == []


def test_client_help_imports_no_torch_or_grpc():
    argvs = [["--help"], ["generate", "--help"], ["hidden-states", "--help"], ["generate"]]
    assert _modules_loaded_by("layerstream_client.cli", argvs) == []


def test_the_help_lists_every_preset():
    from layerstream.chunker.presets import PRESETS

    assert tuple(PRESETS) == chunker_cli.PRESET_NAMES


# -- layerstream chunk [options] SOURCE DEST ------------------------------------------------


def test_chunk_usage_reads_source_dest(capsys):
    with pytest.raises(SystemExit):
        chunker_cli.main(["chunk", "--help"])
    usage = capsys.readouterr().out
    assert "usage: layerstream chunk [options] SOURCE DEST\n" in usage
    assert "layerstream chunk [options] --random-init PRESET|CONFIG.json DEST" in usage


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["chunk", "--random-init", "tiny-llama", "src", "m/x/chunks"], ["takes the place"]),
        (["chunk", "m/x/chunks"], ["give SOURCE DEST", "--random-init"]),
    ],
    ids=["source-and-random-init", "neither"],
)
def test_chunk_wants_exactly_one_of_source_and_random_init(argv, words, caplog):
    assert chunker_cli.main(argv) == 2
    for word in words:
        assert word in caplog.text


@pytest.mark.parametrize(
    ("dest", "name"),
    [
        ("model-repo/demo/chunks", "demo"),
        ("model-repo/demo/chunks/", "demo"),
        ("model-repo/demo/store", None),  # not a model folder's chunks
        ("s3://models/demo/chunks", None),
    ],
)
def test_name_is_inferred_only_from_a_model_folders_chunks(dest, name):
    assert chunker_cli.infer_name(dest) == name


def test_chunk_into_model_repo_name_chunks_needs_no_name(tmp_path):
    model_dir = tmp_path / "model-repo" / "toy"
    code = chunker_cli.main(
        ["chunk", "--random-init", "tiny-llama", str(model_dir / "chunks"), "--quiet"]
    )
    assert code == 0
    settings = json.loads((model_dir / "model-settings.json").read_text())
    assert settings["name"] == "toy"
    manifest = json.loads((model_dir / "chunks" / "manifest.json").read_text())
    assert manifest["name"] == "toy"


def test_force_keeps_the_old_store_whole_until_the_new_one_is_complete(
    tmp_path, monkeypatch, caplog
):
    """``--force`` deleted the old store first: a chunker stopped midway left no store, and
    the model being served lost its chunks. The new store is written beside the old one and
    swapped in once complete; a failure leaves the old one as it was, and nothing else."""
    from layerstream.chunker import sinks

    model_dir = tmp_path / "model-repo" / "toy"
    chunks = model_dir / "chunks"
    argv = ["chunk", "--random-init", "tiny-llama", str(chunks), "--quiet", "--force"]
    assert chunker_cli.main(argv) == 0
    before = {p.name: p.read_bytes() for p in chunks.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(sinks, "write_durably", disk_full)  # every chunk written, then this
        assert chunker_cli.main([*argv[:2], "tiny-gpt2", *argv[3:]]) == 1
    assert "No space left on device" in caplog.text and "is as it was" in caplog.text
    assert {p.name: p.read_bytes() for p in chunks.iterdir()} == before
    assert sorted(p.name for p in model_dir.iterdir()) == ["chunks", "model-settings.json"]

    assert chunker_cli.main([*argv[:2], "tiny-gpt2", *argv[3:]]) == 0
    manifest = json.loads((chunks / "manifest.json").read_text())
    assert manifest["architecture"] == "GPT2LMHeadModel"
    assert sorted(p.name for p in model_dir.iterdir()) == ["chunks", "model-settings.json"]


def test_rechunking_keeps_the_users_settings(tmp_path):
    """``--force`` rewrote model-settings.json from scratch, dropping memory_budget,
    max_active_sequences and request_timeout_s the user had set."""
    model_dir = tmp_path / "model-repo" / "toy"
    argv = ["chunk", "--random-init", "tiny-llama", str(model_dir / "chunks"), "--quiet"]
    assert chunker_cli.main(argv) == 0
    path = model_dir / "model-settings.json"
    settings = json.loads(path.read_text())
    mine = {"memory_budget": "60%", "max_active_sequences": 3, "request_timeout_s": 90}
    settings["parameters"]["extra"] |= mine
    settings["max_batch_size"] = 1
    path.write_text(json.dumps(settings))

    assert chunker_cli.main([*argv, "--force"]) == 0
    after = json.loads(path.read_text())
    assert after["max_batch_size"] == 1
    assert after["parameters"]["extra"] == {"chunk_store": "./chunks", **mine}
    # what this run is given explicitly wins
    assert chunker_cli.main([*argv, "--force", "--memory-budget", "75%"]) == 0
    assert json.loads(path.read_text())["parameters"]["extra"]["memory_budget"] == "75%"


def test_a_chunker_that_fails_into_a_new_folder_leaves_nothing(tmp_path, monkeypatch, caplog):
    """A full disk left 36 MB of partial chunks and a traceback; now the error names the
    destination and the cause, and what was written is gone."""
    from layerstream.chunker import sinks

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sinks, "sync_files", disk_full)
    chunks = tmp_path / "model-repo" / "toy" / "chunks"
    argv = ["chunk", "--random-init", "tiny-llama", str(chunks), "--quiet"]
    assert chunker_cli.main(argv) == 1
    assert f"chunking into {chunks} failed" in caplog.text and "No space left" in caplog.text
    assert not chunks.exists()


def test_chunk_says_how_to_name_a_model_it_cannot_name(tmp_path, caplog):
    dest = tmp_path / "stores" / "toy"
    assert chunker_cli.main(["chunk", "--random-init", "tiny-llama", str(dest), "--quiet"]) == 2
    assert "cannot tell the model name" in caplog.text and "pass --name NAME" in caplog.text
    assert not dest.exists()


# -- the client: what it sends and prints ---------------------------------------------------


def _client_params(argv: list[str]) -> dict:
    return client_cli._params(client_cli._parser().parse_args(argv))


def test_hidden_states_cli_asks_for_every_layer_unless_told():
    assert _client_params(["hidden-states", "--model", "m", "hi"]) == {"mode": "hidden_states"}
    assert _client_params(["hidden-states", "--model", "m", "--layers", "0,-1", "hi"]) == {
        "mode": "hidden_states",
        "layers": "0,-1",
    }


def test_events_print_short():
    final = Final(
        finish_reason="stop",
        stats={"tokens": 12, "prompt_tokens": 4, "total_us": 1234},
        text="x" * 100,
    )
    assert repr(final) == f"Final(finish_reason='stop', tokens=12, text='{'x' * 39}…')"
    embedded = Final("stop", {"tokens": 0, "prompt_tokens": 4}, embedding=[0.5] * 768)
    assert repr(embedded) == "Final(finish_reason='stop', embedding=float32[768])"
    assert repr(Final("length", {})) == "Final(finish_reason='length')"
    hidden = HiddenState(layer=-1, shape=(4, 64), values=[0.0] * 256)
    assert repr(hidden) == "HiddenState(layer=-1, shape=(4, 64), values=float32[256])"
    assert repr(Token(7, "hi")) == "Token(token_id=7, text='hi')"


def test_model_not_loaded_names_what_is_loaded():
    index = [ModelStatus("b", "READY"), ModelStatus("a", "READY"), ModelStatus("c", "LOADING")]
    assert str(ModelNotLoadedError("x", index)) == "model x is not loaded here; loaded: a, b"
    failed = [ModelStatus("x", "UNAVAILABLE", "out of memory")]
    assert str(ModelNotLoadedError("x", failed)) == (
        "model x is not loaded here (UNAVAILABLE: out of memory); loaded: none"
    )


# -- against a real server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(layerstream_server):
    return layerstream_server


def _target(server, transport: str) -> list[str]:
    return ["--url", server.http_url] if transport == "sse" else ["--grpc", server.grpc_target]


@pytest.mark.e2e
def test_a_raw_sse_client_gets_200_and_no_events_for_an_unknown_model(server):
    """What docs/protocol.md says MLServer does, and why the clients check the model."""
    url = f"{server.http_url}/v2/models/no-such-model/generate_stream"
    body = {"inputs": [prompt_input("hi")]}
    with httpx.Client(timeout=30.0) as client, client.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        received = b""
        with pytest.raises(httpx.RemoteProtocolError):  # the body is cut, not ended
            for part in response.iter_bytes():
                received += part
        assert received == b""


@pytest.mark.e2e
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_cli_names_the_loaded_models_for_an_unknown_one(server, capsys, transport):
    code = client_cli.main(["generate", *_target(server, transport), "--model", "nope", "hi"])
    assert code == 1
    loaded = ", ".join(sorted(SOURCES))
    assert capsys.readouterr().err == f"error: model nope is not loaded here; loaded: {loaded}\n"


@pytest.mark.e2e
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_library_raises_model_not_loaded(server, transport):
    client = SSEClient(server.http_url) if transport == "sse" else GRPCClient(server.grpc_target)
    with pytest.raises(ModelNotLoadedError) as caught:
        list(client.generate("nope", "hi", max_new_tokens=1))
    assert caught.value.model == "nope" and caught.value.loaded == sorted(SOURCES)
    assert {m.name: m.state for m in client.models()} == dict.fromkeys(SOURCES, "READY")
    client.check_model(BERT)  # a served model passes


@pytest.mark.e2e
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_hidden_states_cli_prints_every_layer_by_default(server, capsys, transport):
    argv = ["hidden-states", *_target(server, transport), "--model", BERT, "--json", "hi"]
    assert client_cli.main(argv) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    layers = [e["layer"] for e in events if e["event"] == "hiddenstate"]
    assert layers == list(range(13))  # embeddings + 12 blocks, as the server sends them
    assert events[-1]["event"] == "final"
