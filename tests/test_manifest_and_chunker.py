from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layerstream.chunker.convert import ChunkerError, chunk_checkpoint
from layerstream.errors import ManifestError
from layerstream.format.manifest import Manifest


def test_manifest_lists_every_chunk_with_its_sha256(model_factory):
    model = model_factory("gpt2")
    manifest = Manifest.from_json((model.store / "manifest.json").read_text())
    assert manifest.architecture == "GPT2LMHeadModel"
    assert [b.prefix for b in manifest.blocks] == [f"transformer.h.{i}" for i in range(12)]
    assert manifest.tied == [["lm_head.weight", "transformer.wte.weight"]]
    for info in manifest.chunks.values():
        data = (model.store / info.file).read_bytes()
        assert len(data) == info.bytes
        assert hashlib.sha256(data).hexdigest() == info.sha256
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(manifest.files)


def test_store_holds_no_pickle(model_factory):
    store = model_factory("llama").store
    suffixes = {p.suffix for p in store.iterdir()}
    assert suffixes <= {".safetensors", ".json", ".jinja"}  # .jinja: the chat template (text)


def test_manifest_round_trip(model_factory):
    text = (model_factory("llama").store / "manifest.json").read_text()
    assert (
        Manifest.from_json(Manifest.from_json(text).to_json()).to_json()
        == Manifest.from_json(text).to_json()
    )


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "a/../../b"])
def test_manifest_refuses_file_names_that_escape_the_store(model_factory, name):
    data = json.loads((model_factory("llama").store / "manifest.json").read_text())
    data["chunks"]["rest"]["file"] = name
    with pytest.raises(ManifestError, match="unsafe file name"):
        Manifest.from_json(json.dumps(data))


def test_manifest_rejects_newer_format_and_missing_fields(model_factory):
    data = json.loads((model_factory("llama").store / "manifest.json").read_text())
    with pytest.raises(ManifestError, match="format_version 99"):
        Manifest.from_json(json.dumps(dict(data, format_version=99)))
    del data["blocks"]
    with pytest.raises(ManifestError, match="'blocks'"):
        Manifest.from_json(json.dumps(data))
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.from_json("{truncated")


def test_chunker_refuses_to_overwrite_without_force(model_factory, tmp_path):
    model = model_factory("llama")
    dest = tmp_path / "chunks"
    chunk_checkpoint(model.source, dest, "x", progress=False)
    with pytest.raises(ChunkerError, match="--force"):
        chunk_checkpoint(model.source, dest, "x", progress=False)
    chunk_checkpoint(model.source, dest, "x", force=True, progress=False)
    assert (dest / "manifest.json").exists()


def test_chunker_refuses_pickled_checkpoints(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ChunkerError, match="never unpickles"):
        chunk_checkpoint(tmp_path, tmp_path / "out", "x", progress=False)


def test_chunker_refuses_missing_weights(model_factory, tmp_path):
    """A checkpoint lacking a tensor must not become a model with random weights."""
    from safetensors.torch import load_file, save_file

    model = model_factory("llama")
    source = tmp_path / "src"
    source.mkdir()
    for f in model.source.iterdir():
        if f.suffix != ".safetensors":
            (source / f.name).write_bytes(f.read_bytes())
    tensors = load_file(model.source / "model.safetensors")
    del tensors["model.layers.3.mlp.up_proj.weight"]
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ChunkerError, match=r"model\.layers\.3\.mlp\.up_proj\.weight"):
        chunk_checkpoint(source, tmp_path / "out", "x", progress=False)


def test_cli_random_init_writes_store_and_model_settings(tmp_path):
    repo = tmp_path / "model-repo"
    cmd = [
        sys.executable,
        "-m",
        "layerstream.chunker.cli",
        "chunk",
        "--random-init",
        "tiny-llama",
        str(repo / "tiny" / "chunks"),
        "--name",
        "tiny",
        "--quiet",
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    settings = json.loads((repo / "tiny" / "model-settings.json").read_text())
    assert settings == {
        "name": "tiny",
        "implementation": "layerstream.LayerStreamRuntime",
        "parameters": {"extra": {"chunk_store": "./chunks"}},
    }
    assert (repo / "tiny" / "chunks" / "manifest.json").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "--force" in again.stderr


def test_cli_refuses_a_budget_the_model_could_never_load_with(tmp_path, caplog):
    """A budget below the model's minimum (non-block weights + one block) fails every load:
    the chunker says so, with the minimum, instead of writing settings that cannot serve."""
    from layerstream.chunker.cli import main

    model_dir = tmp_path / "model-repo" / "tiny"
    argv = ["chunk", "--random-init", "tiny-llama", str(model_dir / "chunks"), "--name", "tiny"]
    assert main([*argv, "--quiet", "--memory-budget", "25%"]) == 1
    assert not (model_dir / "model-settings.json").exists()
    assert "below this model's minimum" in caplog.text and "not written" in caplog.text
    assert main([*argv, "--quiet", "--memory-budget", "60%", "--force"]) == 0
    settings = json.loads((model_dir / "model-settings.json").read_text())
    assert settings["parameters"]["extra"]["memory_budget"] == "60%"


def test_cli_model_repo_option_with_store_elsewhere(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "layerstream.chunker.cli",
        "chunk",
        "--random-init",
        "tiny-bert",
        str(tmp_path / "stores" / "enc"),
        "--name",
        "enc",
        "--model-repo",
        str(tmp_path / "repo"),
        "--quiet",
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    settings = json.loads((tmp_path / "repo" / "enc" / "model-settings.json").read_text())
    store = settings["parameters"]["extra"]["chunk_store"]
    assert (tmp_path / "repo" / "enc" / store / "manifest.json").resolve().exists()
    assert Path(store).parts[0] == ".."


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_direct_copy_writes_the_same_bytes_as_conversion(
    model_factory, tmp_path, monkeypatch, name
):
    """Blocks whose tensors are plain renames are copied byte range by byte range from the
    source; the result must be byte-identical to the path that loads them through
    transformers' conversion (same files, same sha256)."""
    import layerstream.chunker.blocks as blocks

    model = model_factory(name)
    direct = chunk_checkpoint(model.source, tmp_path / "direct", name, progress=False)
    monkeypatch.setattr(blocks, "direct_entries", lambda *args: None)
    converted = chunk_checkpoint(model.source, tmp_path / "converted", name, progress=False)
    assert direct.chunks == converted.chunks
    for info in direct.chunks.values():
        assert (tmp_path / "direct" / info.file).read_bytes() == (
            tmp_path / "converted" / info.file
        ).read_bytes()


def test_chunker_copies_plain_blocks_without_converting(model_factory, tmp_path, caplog):
    model = model_factory("llama")
    with caplog.at_level("DEBUG", logger="layerstream.chunker.convert"):
        chunk_checkpoint(model.source, tmp_path / "s", "llama", progress=False)
    assert "block_0000: copied from the source" in caplog.text
    with caplog.at_level("DEBUG", logger="layerstream.chunker.convert"):
        chunk_checkpoint(model.source, tmp_path / "h", "llama", dtype="bfloat16", progress=False)
    assert "block_0000: converted" in caplog.text  # a dtype change goes through torch


def test_conversion_table_is_built_only_for_foreign_keys(model_factory, tmp_path, monkeypatch):
    """A checkpoint in the model's own key space is chunked without transformers' key
    conversion table (~0.4 s to build); one saved with other names (here: without the
    base-model prefix, as a bare LlamaModel writes it) goes through it, to the same tensors
    (each placed as its own source file places it: see the alignment test)."""
    import safetensors.torch
    import transformers.conversion_mapping as conversion

    model = model_factory("llama")
    built = []
    real = conversion.get_model_conversion_mapping
    monkeypatch.setattr(
        conversion, "get_model_conversion_mapping", lambda m: built.append(1) or real(m)
    )
    own = chunk_checkpoint(model.source, tmp_path / "own", "llama", progress=False)
    assert built == []

    foreign = tmp_path / "foreign"
    shutil.copytree(model.source, foreign)
    for path in foreign.glob("*.safetensors"):
        tensors = safetensors.torch.load_file(path)
        renamed = {k.removeprefix("model."): v for k, v in tensors.items()}
        safetensors.torch.save_file(renamed, path, metadata={"format": "pt"})
    index = foreign / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k.removeprefix("model."): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data))
    again = chunk_checkpoint(foreign, tmp_path / "again", "llama", progress=False)
    assert built  # renamed through transformers' table
    assert {n: c.tensors for n, c in again.chunks.items()} == {
        n: c.tensors for n, c in own.chunks.items()
    }
    for info in own.chunks.values():
        mine = safetensors.torch.load_file(tmp_path / "own" / info.file)
        theirs = safetensors.torch.load_file(tmp_path / "again" / info.file)
        mine, theirs = ({k: d[k] for k in info.tensors} for d in (mine, theirs))
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), info.name


def _tensor_offsets(path: Path) -> tuple[int, dict[str, tuple[str, int, int]]]:
    """Header length and ``{key: (dtype, begin, end)}`` with absolute file offsets."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header.pop("__metadata__", None)
    base = 8 + length
    return length, {
        k: (e["dtype"], base + e["data_offsets"][0], base + e["data_offsets"][1])
        for k, e in header.items()
    }


@pytest.mark.parametrize(("name", "dtype"), [("llama", None), ("gpt2", None), ("t5", "bfloat16")])
def test_every_chunk_tensor_sits_where_from_pretrained_holds_it(model_factory, name, dtype):
    """modulo 64 bytes (CPU kernels round by it): a tensor copied from the source as it is
    keeps its source file offset's residue, because from_pretrained keeps such a tensor as a
    view of the mapped checkpoint; a converted one (another dtype) starts on a multiple, as
    a fresh torch allocation does. The files stay plain safetensors: load_file reads the
    manifest's tensors (and padding)."""
    from safetensors.torch import load_file

    from layerstream.format.safetensors import PADDING_PREFIX, TENSOR_ALIGNMENT

    model = model_factory(name, dtype=dtype)
    manifest = Manifest.from_json((model.store / "manifest.json").read_text())
    source: dict[str, tuple[str, int, int]] = {}
    for path in model.source.glob("*.safetensors"):
        source.update(_tensor_offsets(path)[1])
    for info in manifest.chunks.values():
        length, tensors = _tensor_offsets(model.store / info.file)
        assert (8 + length) % TENSOR_ALIGNMENT == 0
        for key, (code, begin, _) in tensors.items():
            if key.startswith(PADDING_PREFIX):
                continue
            copied = key in source and source[key][0] == code
            residue = source[key][1] % TENSOR_ALIGNMENT if copied else 0
            assert begin % TENSOR_ALIGNMENT == residue, key
        loaded = load_file(model.store / info.file)
        assert {k for k in loaded if not k.startswith(PADDING_PREFIX)} == set(info.tensors)


def test_padding_entries_align_tensors_of_any_size(tmp_path):
    """Tensors whose sizes are not multiples of 64 bytes get zero-filled U8 padding entries
    before the next one (safetensors allows no gaps); readers see only the real tensors."""
    import torch
    from safetensors.torch import load_file

    from layerstream.format.manifest import ChunkInfo
    from layerstream.format.safetensors import PADDING_PREFIX, TENSOR_ALIGNMENT, parse_layout
    from layerstream.format.writer import ChunkEntry, write_chunk

    tensors = {
        "a": torch.arange(3, dtype=torch.float32),
        "b": torch.arange(5, dtype=torch.int64),
        "c": torch.arange(7, dtype=torch.bfloat16),
        "d": torch.ones(2, 3, dtype=torch.float16),
        "e": torch.tensor([True, False, True]),
    }
    path = tmp_path / "odd.safetensors"
    size, sha256 = write_chunk(
        path, [ChunkEntry.of_tensor(k, v) for k, v in tensors.items()], {"format": "pt"}
    )
    data = path.read_bytes()
    assert size == len(data) and sha256 == hashlib.sha256(data).hexdigest()
    length, layout = _tensor_offsets(path)
    assert (8 + length) % TENSOR_ALIGNMENT == 0
    padding = {k: v for k, v in layout.items() if k.startswith(PADDING_PREFIX)}
    assert len(padding) == len(tensors) - 1  # after every tensor but the last
    for dtype, begin, end in padding.values():
        assert dtype == "U8" and data[begin:end] == bytes(end - begin)
        assert end % TENSOR_ALIGNMENT == 0
    for key in tensors:
        assert layout[key][1] % TENSOR_ALIGNMENT == 0, key
    loaded = load_file(path)
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value)
    info = ChunkInfo("odd", path.name, size, sha256, sorted(tensors))
    read = parse_layout(info, torch.frombuffer(bytearray(data), dtype=torch.uint8))
    assert sorted(t.key for t in read) == sorted(tensors)


def test_every_safetensors_dtype_round_trips_through_writer_and_reader(tmp_path):
    """One dtype table serves the chunk writer and the chunk reader: a tensor of each dtype
    (fp8 and unsigned ones included) comes back bit-equal."""
    import torch

    from layerstream.format.header import DTYPES
    from layerstream.format.manifest import ChunkInfo
    from layerstream.format.safetensors import parse_layout, tensors_from_layout
    from layerstream.format.writer import ChunkEntry, read_safetensors_index, write_chunk

    raw = torch.arange(24, dtype=torch.uint8).reshape(2, 12)
    tensors = {}
    for d in DTYPES:
        bits = raw[:, : 12 // d.itemsize * d.itemsize].contiguous()
        tensors[d.code] = torch.tensor([1, 0, 1]) > 0 if d.code == "BOOL" else bits.view(d.torch)
    assert {"F8_E4M3", "F8_E5M2", "U16", "U32", "U64"} <= set(tensors)
    path = tmp_path / "dtypes.safetensors"
    entries = [ChunkEntry.of_tensor(k, v) for k, v in tensors.items()]
    size, sha256 = write_chunk(path, entries, {"format": "pt"})
    buffer = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    info = ChunkInfo("dtypes", path.name, size, sha256, sorted(tensors))
    read = tensors_from_layout(parse_layout(info, buffer), buffer)
    assert set(read) == set(tensors)
    for code, value in tensors.items():
        assert read[code].dtype == value.dtype and read[code].shape == value.shape, code
        assert torch.equal(read[code].view(torch.uint8), value.view(torch.uint8)), code
    index = read_safetensors_index(path)  # the source-checkpoint reader, same parser
    assert {k: v.dtype for k, v in index.items() if k in tensors} == {
        k: v.dtype for k, v in tensors.items()
    }


def test_a_permuted_source_tensor_is_written_permuted_a_slice_at_a_time(tmp_path):
    """A source tensor written permuted (how a store keeps MXFP4 blocks) equals the tensor
    permuted, whatever its dtype; an order that moves the first dimension is refused."""
    import pytest
    import torch
    from safetensors.torch import load_file, save_file

    from layerstream.format.writer import ChunkEntry, read_safetensors_index, write_chunk

    tensors = {
        "u8": torch.randint(0, 256, (3, 5, 4, 7), dtype=torch.uint8),
        "f32": torch.randn(2, 6, 9),
    }
    save_file(tensors, str(tmp_path / "source.safetensors"))
    index = read_safetensors_index(tmp_path / "source.safetensors")
    orders = {"u8": (0, 2, 3, 1), "f32": (0, 2, 1)}
    entries = [ChunkEntry.of_permuted(k, index[k], order) for k, order in orders.items()]
    write_chunk(tmp_path / "chunk.safetensors", entries, {"format": "pt"})
    written = load_file(tmp_path / "chunk.safetensors")
    for key, order in orders.items():
        assert torch.equal(written[key], tensors[key].permute(order)), key
    with pytest.raises(ValueError, match="does not keep the first dimension"):
        ChunkEntry.of_permuted("u8", index["u8"], (1, 0, 2, 3))


def test_chunker_refuses_tensor_names_with_the_padding_prefix(tmp_path):
    import torch

    from layerstream.format.safetensors import PADDING_PREFIX
    from layerstream.format.writer import ChunkEntry, write_chunk

    entry = ChunkEntry.of_tensor(f"{PADDING_PREFIX}0", torch.zeros(3))
    with pytest.raises(ValueError, match="reserved"):
        write_chunk(tmp_path / "x.safetensors", [entry], {})


@pytest.mark.parametrize(
    ("name", "overrides", "prefixes"),
    [
        ("albert", {}, ["encoder.albert_layer_groups.0"]),
        ("albert", {"num_hidden_groups": 2}, [f"encoder.albert_layer_groups.{i}" for i in (0, 1)]),
        ("llama", {"num_hidden_layers": 1}, ["model.layers.0"]),
        ("distilbert", {"n_layers": 1}, ["transformer.layer.0"]),
    ],
)
def test_blocks_in_lists_of_one_are_found(name, overrides, prefixes):
    """ALBERT's shared group and one-layer models sit in ModuleLists of length 1; a
    model without transformers' no-split marks (ALBERT, DistilBERT) gets its largest list."""
    from architectures import ARCHITECTURES
    from transformers import AutoConfig

    from layerstream.engine.skeleton import block_prefixes, build_skeleton

    config = dict(ARCHITECTURES[name], **overrides)
    architecture = config.pop("architectures")[0]
    model = build_skeleton(
        AutoConfig.for_model(config.pop("model_type"), **config),
        architecture,
        "float32",
        buffers=False,
    )
    assert block_prefixes(model) == prefixes


def test_random_init_keeps_the_dtype_its_config_declares(tmp_path):
    """A config.json that says "dtype": "bfloat16" gets a bfloat16 checkpoint (and store),
    as the release it stands for; without one, float32."""
    from layerstream.chunker.presets import write_random_checkpoint

    base = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=320,
    )
    for declared, stored in (("bfloat16", "bfloat16"), (None, "float32")):
        config = dict(base, **({"dtype": declared} if declared else {}))
        (tmp_path / "config.json").write_text(json.dumps(config))
        source = write_random_checkpoint(str(tmp_path / "config.json"), tmp_path / f"m-{stored}")
        manifest = chunk_checkpoint(source, tmp_path / f"s-{stored}", "m", progress=False)
        assert manifest.dtype == stored


def _damaged_checkpoints(source: Path) -> dict[str, bytes]:
    """Ways a downloaded safetensors file is damaged: its header length, its JSON, a
    tensor's dtype or offsets, the file cut short; and a tensor transposed."""
    import struct

    path = next(source.glob("*.safetensors"))
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    keys = [k for k in header if k != "__metadata__"]
    wide = next(k for k in keys if len(set(header[k]["shape"])) == 2)

    def rewritten(key: str, **entry) -> bytes:
        edited = {**header, key: {**header[key], **entry}}
        text = json.dumps(edited).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text + raw[8 + n :]

    begin, end = header[keys[0]]["data_offsets"]
    return {
        "header length past the end": struct.pack("<Q", 1 << 40) + raw[8:],
        "fewer than 8 bytes": raw[:4],
        "header not JSON": raw[:8] + b"[" + raw[9 : 8 + n] + raw[8 + n :],
        "cut short": raw[: len(raw) // 2],
        "offsets past the end": rewritten(keys[0], data_offsets=[begin, end + 10**9]),
        "unknown dtype": rewritten(keys[0], dtype="Q9"),
        "transposed": rewritten(wide, shape=header[wide]["shape"][::-1]),
    }


def test_a_damaged_checkpoint_is_one_clear_error_naming_the_file(tmp_path, caplog):
    """Each used to end in a raw OSError or SafetensorError traceback naming neither the file
    nor the fix; a transposed tensor was reported as having no values."""
    from layerstream.chunker import cli
    from layerstream.chunker.presets import write_random_checkpoint

    source = write_random_checkpoint("tiny-llama", tmp_path / "source")
    for case, data in _damaged_checkpoints(source).items():
        damaged = tmp_path / case.replace(" ", "-")
        shutil.copytree(source, damaged)
        next(damaged.glob("*.safetensors")).write_bytes(data)
        caplog.clear()
        argv = ["chunk", str(damaged), str(tmp_path / "out" / damaged.name), "--name", "x"]
        assert cli.main([*argv, "--quiet"]) == 1, case
        message = caplog.records[-1].getMessage()
        if case == "transposed":
            assert "has shape" in message and "do not match" in message, message
        else:
            assert "model.safetensors" in message and "download it again" in message, message
        assert not (tmp_path / "out" / damaged.name).exists(), case
