"""Quantized checkpoints: block-wise fp8 stored as released and served bit-identical to what
from_pretrained of the same checkpoint computes on a CPU; every other format refused."""

from __future__ import annotations

import json
import re
import shutil
import threading
import types
from functools import partial
from pathlib import Path

import httpx
import pytest
import torch
import transformers
from safetensors.torch import load_file
from test_exactness import assert_same_generation, generate_both

from layerstream.chunker.convert import ChunkerError, chunk_checkpoint
from layerstream.chunker.presets import write_random_checkpoint
from layerstream.chunker.quantize import write_fp8_checkpoint
from layerstream.chunker.sizing import config_from_json, size_model
from layerstream.engine.engine import Engine, EngineOptions
from layerstream.errors import ManifestError, SettingsError
from layerstream.format.manifest import Manifest
from layerstream.format.quantization import Fp8Blocks
from layerstream.stores import open_store

FP8_BLOCKS = Fp8Blocks((128, 128), "float32")
PROMPT = torch.tensor([[1, 5, 9, 13, 2, 7, 3, 11]])
# the shapes fp8 releases tile: 128 x 128 blocks of the linear weights
CONFIGS = {
    "llama": dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    ),
    "qwen3": dict(
        model_type="qwen3",
        architectures=["Qwen3ForCausalLM"],
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,  # k_proj and v_proj 128 x 128: quantized too
        head_dim=32,
        vocab_size=320,
        max_position_embeddings=128,
    ),
}


class Quantized(types.SimpleNamespace):
    plain: Path  # the bfloat16 checkpoint
    fp8: Path  # its block-wise fp8 checkpoint
    store: Path  # the fp8 checkpoint chunked


@pytest.fixture(scope="module")
def fp8_models(tmp_path_factory):
    built: dict[str, Quantized] = {}

    def make(name: str) -> Quantized:
        if name not in built:
            root = tmp_path_factory.mktemp(f"fp8-{name}")
            (root / "config.json").write_text(json.dumps(CONFIGS[name]))
            plain = write_random_checkpoint(
                str(root / "config.json"), root / "plain", weight_scale=8.0, dtype="bfloat16"
            )
            fp8 = write_fp8_checkpoint(plain, root / "fp8")
            chunk_checkpoint(fp8, root / "store", name, progress=False)
            built[name] = Quantized(plain=plain, fp8=fp8, store=root / "store")
        return built[name]

    return make


def reference(path: Path) -> transformers.PreTrainedModel:
    """from_pretrained on a CPU, which dequantizes an fp8 checkpoint at load."""
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


def assert_same_forward_and_greedy(engine: Engine, ref: transformers.PreTrainedModel):
    """Logits, every hidden state and greedy generation equal; the reference's output."""
    with engine.request():
        out = engine.model(PROMPT, output_hidden_states=True)
    with torch.inference_mode():
        theirs = ref(PROMPT, output_hidden_states=True)
    assert torch.equal(out.logits, theirs.logits)
    assert all(
        torch.equal(a, b) for a, b in zip(out.hidden_states, theirs.hidden_states, strict=True)
    )
    assert_same_generation(*generate_both(engine, ref, do_sample=False))
    return theirs


@pytest.mark.parametrize("reader", ["read", "mmap"])
@pytest.mark.parametrize("budget", ["25%", "100%"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp8_store_is_exact_to_from_pretrained_of_the_fp8_checkpoint(
    fp8_models, name, budget, reader
):
    model = fp8_models(name)
    ref = reference(model.fp8)
    engine = Engine(
        open_store(str(model.store)), EngineOptions(memory_budget=budget, reader=reader)
    )
    try:
        assert engine.plan.fully_resident == (budget == "100%")
        theirs = assert_same_forward_and_greedy(engine, ref)
        sampling = dict(do_sample=True, top_k=20, temperature=0.8, seed=7)
        assert_same_generation(*generate_both(engine, ref, **sampling))
        # and the answer is the fp8 model's, not the plain one's it was quantized from
        plain = reference(model.plain)
        with torch.inference_mode():
            assert not torch.equal(plain(PROMPT).logits, theirs.logits)
        if budget == "25%":
            assert engine.streamer.stats.dequantize_s > 0
    finally:
        engine.close()


def test_the_store_keeps_the_quantized_bytes_and_streams_them(fp8_models, tmp_path):
    model = fp8_models("qwen3")  # every linear weight of its blocks tiled
    manifest = Manifest.from_json((model.store / "manifest.json").read_text())
    assert manifest.quantization is not None
    assert manifest.quantization.weight_block_size == (128, 128)
    block = manifest.chunks[manifest.blocks[0].chunk]
    assert block.quantized and all(k.endswith(".weight") for k in block.quantized)
    header = load_file(model.store / block.file)
    for key in block.quantized:
        assert header[key].dtype == torch.float8_e4m3fn
        assert header[key + "_scale_inv"].dtype == torch.float32
    # the plain checkpoint chunked: its blocks are twice the fp8 ones' bytes, nearly (norms
    # and scales stay wider)
    chunk_checkpoint(model.plain, tmp_path / "plain", "plain", progress=False)
    plain = Manifest.from_json((tmp_path / "plain" / "manifest.json").read_text())
    assert sum(manifest.block_bytes) < 0.55 * sum(plain.block_bytes)
    # a streamed block reads its stored (fp8) bytes, and holds them dequantized while it runs
    engine = Engine(open_store(str(model.store)), EngineOptions(memory_budget="25%"))
    try:
        streamed = len(engine.plan.streamed)
        before = engine.streamer.stats.snapshot()
        with engine.request():
            engine.model(PROMPT)
        read = engine.streamer.stats.since(before)
        assert read.bytes_read == sum(manifest.block_bytes[j] for j in engine.plan.streamed)
        assert streamed >= len(manifest.blocks) // 2
        assert engine.plan.dequantized == max(
            manifest.chunks[b.chunk].dequantized_room for b in manifest.blocks
        )
        assert engine.plan.weight_bytes() <= engine.budget
    finally:
        engine.close()


@pytest.mark.parametrize(("budget", "reader"), [("100%", "read"), ("70%", "read"), ("70%", "mmap")])
def test_a_pinned_block_holds_its_tensors_dequantized_without_its_stored_bytes(
    fp8_models, budget, reader
):
    """Pinned, a block's fp8 weights are held in the compute dtype only: the memory its
    tensors lie in is what the plan counts for it, less than its fp8 chunk and its
    tensors dequantized together (all pinned at load, or some by the background fill), and
    the answers stay exact."""
    model = fp8_models("qwen3")
    manifest = Manifest.from_json((model.store / "manifest.json").read_text())
    engine = Engine(
        open_store(str(model.store)), EngineOptions(memory_budget=budget, reader=reader)
    )
    try:
        engine.wait_pinned()
        plan = engine.plan
        assert plan.resident and plan.fully_resident == (budget == "100%")
        for j in plan.resident:
            tensors = engine.model.get_submodule(engine.prefixes[j]).state_dict().values()
            assert all(t.dtype == torch.bfloat16 for t in tensors if t.is_floating_point())
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in tensors}
            held = sum(storage.nbytes() for storage in storages.values())
            info = manifest.chunks[manifest.blocks[j].chunk]
            assert info.dequantized_bytes < held <= plan.held[j] < info.memory_bytes
        assert plan.weight_bytes() <= engine.budget
        assert_same_forward_and_greedy(engine, reference(model.fp8))
    finally:
        engine.close()


@pytest.mark.parametrize("reader", ["read", "mmap"])
def test_quantized_chunks_are_pinned_one_at_a_time_within_the_budget(
    fp8_models, reader, monkeypatch
):
    """A quantized chunk is read whole before what it holds is dequantized from it. With no
    streaming buffer to read it through (every block pinned), the plan keeps room for one
    such chunk and the pins, four threads reading, take it one at a time; the mmap reader
    dequantizes straight from the mapping, with no copy of the chunk."""
    from layerstream.engine.checks import ChunkChecks
    from layerstream.engine.mapped import MappedReader

    model = fp8_models("llama")
    manifest = Manifest.from_json((model.store / "manifest.json").read_text())
    held, lock, running, most = ChunkChecks.held, threading.Lock(), [0], [0]

    def one_at_a_time(self, info, data, version):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            if info.quantized and reader == "read":
                threading.Event().wait(0.01)  # long enough for another pin to start
            return held(self, info, data, version)
        finally:
            with lock:
                running[0] -= 1

    copy = MappedReader._copy

    def no_copy(self, info):
        assert not info.quantized, f"{info.name} copied whole"
        return copy(self, info)

    monkeypatch.setattr(ChunkChecks, "held", one_at_a_time)
    monkeypatch.setattr(MappedReader, "_copy", no_copy)
    options = EngineOptions(memory_budget="100%", reader=reader, io_threads=4)
    engine = Engine(open_store(str(model.store)), options)
    try:
        engine.wait_pinned()
        plan = engine.plan
        assert plan.fully_resident and plan.staging == max(
            c.bytes for c in manifest.chunks.values() if c.quantized
        )
        assert plan.weight_bytes() <= engine.budget
        if reader == "read":
            assert most[0] == 1
        assert_same_forward_and_greedy(engine, reference(model.fp8))
    finally:
        engine.close()


def test_size_shows_the_dequantized_block(fp8_models):
    model = fp8_models("llama")
    manifest = Manifest.from_json((model.store / "manifest.json").read_text())
    config = config_from_json((model.store / "config.json").read_text())
    sizing = size_model(manifest, config, memory_budget="25%")
    terms = {term: nbytes for term, nbytes, _ in sizing.terms()}
    room = manifest.chunks["block_0000"].dequantized_room
    assert terms["dequantized blocks"] == room * sizing.buffer_count
    assert sizing.weights <= sizing.budget
    whole = size_model(manifest, config, memory_budget="100%")
    # pinned, a block holds its tensors dequantized, not its fp8 values and scales beside them
    chunks = manifest.chunks.values()
    dequantized = sum(c.dequantized_bytes for c in chunks)
    assert whole.pinned_blocks == len(manifest.blocks) and whole.pinned == whole.model_bytes
    assert dequantized < whole.pinned < sum(c.memory_bytes for c in chunks) - dequantized // 4


def _requantize(source: Path, dest: Path, config: dict) -> Path:
    """``source`` with its config's quantization_config replaced by ``config``."""
    shutil.copytree(source, dest)
    data = json.loads((dest / "config.json").read_text())
    data["quantization_config"] = config
    (dest / "config.json").write_text(json.dumps(data))
    return dest


@pytest.mark.parametrize(
    ("config", "words", "todo"),
    [
        (
            {"quant_method": "compressed-tensors"},
            "quant_method 'compressed-tensors'",
            r"CompressedTensorsConfig\(dequantize=True\)",
        ),
        ({"quant_method": "mxfp4"}, "says mxfp4, but the checkpoint holds no", "4-bit"),
        ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq'", "unquantized checkpoint"),
        ({"quant_method": "awq", "bits": 4}, "quant_method 'awq'", "unquantized checkpoint"),
        (
            {"quant_method": "bitsandbytes", "load_in_4bit": True},
            "'bitsandbytes'",
            r"\.dequantize\(\)",
        ),
        (
            {"quant_method": "fp8", "weight_block_size": None},
            "weight_block_size None",
            r"FineGrainedFP8Config\(dequantize=True\)",
        ),
        (
            {"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
            "scale_fmt 'ue8m0'",
            "FineGrainedFP8Config",
        ),
        (
            {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"},
            "activation_scheme 'static'",
            "FineGrainedFP8Config",
        ),
    ],
)
def test_formats_not_served_exactly_are_refused_by_name_with_what_to_do(
    fp8_models, tmp_path, config, words, todo
):
    source = _requantize(fp8_models("llama").fp8, tmp_path / "source", config)
    with pytest.raises(ChunkerError, match=words) as err:
        chunk_checkpoint(source, tmp_path / "store", "refused", progress=False)
    assert re.search(todo, str(err.value)), str(err.value)
    assert not (tmp_path / "store" / "manifest.json").exists()


def test_scales_off_the_block_grid_are_refused(fp8_models, tmp_path):
    # the config says 64 x 64 blocks, the scales are one per 128 x 128
    source = _requantize(
        fp8_models("llama").fp8,
        tmp_path / "source",
        {"quant_method": "fp8", "weight_block_size": [64, 64], "activation_scheme": "dynamic"},
    )
    with pytest.raises(ChunkerError, match=r"weight_scale_inv is .* \[1, 2\]; fp8 \(64x64 blocks"):
        chunk_checkpoint(source, tmp_path / "store", "refused", progress=False)


MOE_CONFIGS = {
    "qwen3_moe": dict(  # the Qwen3-MoE-FP8 layout: each expert's weights apart, fp8
        model_type="qwen3_moe",
        architectures=["Qwen3MoeForCausalLM"],
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        vocab_size=320,
        max_position_embeddings=128,
    ),
    "mixtral": dict(
        model_type="mixtral",
        architectures=["MixtralForCausalLM"],
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=320,
        max_position_embeddings=128,
    ),
}


@pytest.mark.parametrize(
    ("budget", "experts"),
    [("100%", "auto"), ("40%", "off"), ("40%", "on"), ("one buffer", "on")],
)
@pytest.mark.parametrize("name", sorted(MOE_CONFIGS))
def test_fp8_experts_are_fused_fp8_and_exact(tmp_path, name, budget, experts):
    """A mixture-of-experts checkpoint holds each expert's fp8 weights and scales apart,
    which transformers dequantizes and fuses at load: the store keeps the fused parameter
    fp8 with its scales fused alike, and serves what from_pretrained computes: whole
    blocks, or expert by expert (each read expert dequantized alone, the base's fp8
    attention weights with the base; every byte not read NaN)."""
    (tmp_path / "config.json").write_text(json.dumps(MOE_CONFIGS[name]))
    plain = write_random_checkpoint(
        str(tmp_path / "config.json"), tmp_path / "plain", weight_scale=8.0, dtype="bfloat16"
    )
    fp8 = write_fp8_checkpoint(plain, tmp_path / "fp8")
    keys = json.loads((fp8 / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(".experts.1." in k and k.endswith(".weight_scale_inv") for k in keys)
    manifest = chunk_checkpoint(fp8, tmp_path / "store", name, progress=False)
    block = manifest.chunks[manifest.blocks[0].chunk]
    experts_keys = [k for k in block.quantized or [] if ".experts." in k]
    assert experts_keys, block.quantized  # the fused experts parameters, stored fp8
    assert any(".self_attn." in k for k in block.quantized)  # and the attention's
    header = load_file(tmp_path / "store" / block.file)
    assert all(
        header[k].dtype == torch.float8_e4m3fn and header[k].dim() == 3 for k in experts_keys
    )
    ref = reference(fp8)
    tight = budget == "one buffer"  # no base pinned: each install reads and dequantizes it
    memory = max(manifest.chunks[b.chunk].memory_bytes for b in manifest.blocks)
    options = EngineOptions(
        memory_budget=manifest.rest_bytes + memory + 2**16 if tight else budget,
        read_ahead=0 if tight else 1,
        expert_streaming=experts,
        poison_unread_experts=True,
    )
    engine = Engine(open_store(str(tmp_path / "store")), options)
    try:
        assert bool(engine.parts) == (experts == "on")
        assert bool(engine.plan.pinned_bases) == (budget == "40%" and experts == "on")
        assert_same_forward_and_greedy(engine, ref)
        if experts == "on":
            assert engine.streamer.stats.experts_read > 0
        if engine.plan.pinned_bases:
            _assert_pinned_bases_hold_their_fp8_weights_dequantized(engine)
    finally:
        engine.close()


def _assert_pinned_bases_hold_their_fp8_weights_dequantized(engine: Engine) -> None:
    """Each pinned base holds its fp8 attention weights dequantized (no fp8 bytes, no
    scales), within what the plan counted for it; no install dequantizes them again."""
    if engine.fill is not None:
        engine.fill.wait()
    reader = engine.streamer._reader
    pinned: set[str] = set()
    for j, planned in engine.plan.pinned_bases.items():
        base = reader.bases[engine.manifest.blocks[j].chunk]
        pinned |= base.dequantized
        assert base.dequantized and base.nbytes <= planned
        assert all(".self_attn." in k for k in base.dequantized)
        assert all(t.dtype != torch.float8_e4m3fn for t in base.tensors.values())
        assert not any(k.endswith("_scale_inv") for k in base.tensors)
    from layerstream.engine.expert_reader import QuantizedExperts

    redone: list[str] = []
    original = QuantizedExperts.dequantize_base

    def dequantize_base(self):
        in_groups = {key for keys in self._keys for key in keys}
        redone.extend(k for k in self.targets if k not in in_groups)
        original(self)

    QuantizedExperts.dequantize_base = dequantize_base
    try:
        with engine.request():
            engine.model(torch.tensor([[3, 1, 4, 1, 5]]))
    finally:
        QuantizedExperts.dequantize_base = original
    assert not pinned & set(redone)  # only the bases not pinned are dequantized per install


def test_an_fp8_moe_store_is_sized_as_the_engine_plans_it(tmp_path):
    """`layerstream size` counts each pinned base with its fp8 weights dequantized, as the
    engine holds it: the same bases, bytes and expert cache."""
    from layerstream.chunker.sizing import config_from_json, size_model

    (tmp_path / "config.json").write_text(json.dumps(MOE_CONFIGS["qwen3_moe"]))
    plain = write_random_checkpoint(
        str(tmp_path / "config.json"), tmp_path / "plain", weight_scale=8.0, dtype="bfloat16"
    )
    manifest = chunk_checkpoint(
        write_fp8_checkpoint(plain, tmp_path / "fp8"), tmp_path / "store", "q", progress=False
    )
    config = config_from_json((tmp_path / "store" / "config.json").read_text())
    sizing = size_model(manifest, config, memory_budget="40%")
    engine = Engine(
        open_store(str(tmp_path / "store")),
        EngineOptions(memory_budget="40%", expert_streaming="on"),
    )
    try:
        plan = engine.plan
        assert sizing.based_blocks == len(plan.pinned_bases) > 0
        assert sizing.bases == sum(plan.pinned_bases.values())
        assert sizing.expert_cache == plan.expert_cache
        # a base held dequantized is bigger than its bytes in the chunk
        chunks = [manifest.chunks[manifest.blocks[j].chunk] for j in plan.pinned_bases]
        assert sizing.bases > sum(c.experts.base_bytes for c in chunks)
    finally:
        engine.close()


def test_an_fp8_store_chunked_before_experts_kept_their_scales_streams_whole(tmp_path):
    """A store whose expert groups do not list the experts' scales (an older chunker's)
    cannot read an expert alone with its scales: its blocks stream whole, and asking for
    experts alone says to re-run the chunker."""
    (tmp_path / "config.json").write_text(json.dumps(MOE_CONFIGS["qwen3_moe"]))
    plain = write_random_checkpoint(
        str(tmp_path / "config.json"), tmp_path / "plain", weight_scale=8.0, dtype="bfloat16"
    )
    fp8 = write_fp8_checkpoint(plain, tmp_path / "fp8")
    store = tmp_path / "store"
    chunk_checkpoint(fp8, store, "old", progress=False)
    data = json.loads((store / "manifest.json").read_text())
    for chunk in data["chunks"].values():
        for group in (chunk.get("experts") or {}).get("groups", []):
            group["tensors"] = [t for t in group["tensors"] if not t.endswith("_scale_inv")]
    (store / "manifest.json").write_text(json.dumps(data))
    engine = Engine(open_store(str(store)), EngineOptions(memory_budget="40%"))
    try:
        assert not engine.parts and engine.plan.streamed
        assert_same_forward_and_greedy(engine, reference(fp8))
    finally:
        engine.close()
    with pytest.raises(SettingsError, match="re-run the chunker"):
        Engine(open_store(str(store)), EngineOptions(memory_budget="40%", expert_streaming="on"))


def test_fp8_weights_transformers_splits_are_refused(tmp_path, monkeypatch):
    """Only stacking and concatenating converters keep the scales on the weights' grid; a
    weight fused any other way is refused, never stored wrong."""
    from layerstream.chunker import fused

    monkeypatch.setattr(fused, "FUSING_OPS", ("Concatenate",))  # stacking not taken
    (tmp_path / "config.json").write_text(json.dumps(MOE_CONFIGS["qwen3_moe"]))
    plain = write_random_checkpoint(str(tmp_path / "config.json"), tmp_path / "plain")
    fp8 = write_fp8_checkpoint(plain, tmp_path / "fp8")
    with pytest.raises(ChunkerError, match="cannot keep it quantized yet"):
        chunk_checkpoint(fp8, tmp_path / "store", "refused", progress=False)


def test_a_store_chunked_as_plain_from_a_quantized_checkpoint_is_refused(fp8_models, tmp_path):
    """Stores an earlier layerstream wrote from a quantized checkpoint hold its quantized
    weights read as plain ones; their config.json still says quantized."""
    model = fp8_models("llama")
    store = tmp_path / "store"
    chunk_checkpoint(model.plain, store, "plain", progress=False)
    data = json.loads((store / "config.json").read_text())
    data["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    text = json.dumps(data)
    (store / "config.json").write_text(text)
    manifest = json.loads((store / "manifest.json").read_text())
    import hashlib

    manifest["file_sha256"]["config.json"] = hashlib.sha256(text.encode()).hexdigest()
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"as plain ones.*Re-run the chunker"):
        Engine(open_store(str(store)), EngineOptions(memory_budget="25%"))


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda m: m.pop("quantization"), "do not agree"),
        (lambda m: m.update(format_version=2), "do not agree"),
        (lambda m: m["chunks"]["block_0001"].pop("dequantized_bytes"), "dequantized_bytes"),
        (lambda m: m["quantization"].update(method="int4"), "not a quantization"),
        (
            lambda m: m["chunks"]["block_0001"]["quantized"].append("model.norm.weight"),
            "quantized tensors it does not hold",
        ),
        (
            lambda m: m["chunks"]["block_0001"]["quantized"].append(
                "model.layers.1.input_layernorm.weight"
            ),
            "does not hold with their scales",
        ),
    ],
)
def test_edited_quantization_in_the_manifest_is_refused(fp8_models, edit, words):
    data = json.loads((fp8_models("llama").store / "manifest.json").read_text())
    edit(data)
    with pytest.raises(ManifestError, match=words):
        Manifest.from_json(json.dumps(data))


def test_a_wrong_dequantized_size_fails_the_load(fp8_models, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(fp8_models("llama").store, store)
    data = json.loads((store / "manifest.json").read_text())
    data["chunks"]["block_0002"]["dequantized_bytes"] -= 2
    (store / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="block_0002's quantized tensors take"):
        Engine(open_store(str(store)), EngineOptions(memory_budget="25%"))


def test_quantizing_needs_a_plain_checkpoint(fp8_models, tmp_path):
    with pytest.raises(ChunkerError, match=r"quantized already.*without --quantize"):
        write_fp8_checkpoint(fp8_models("llama").fp8, tmp_path / "again")


@pytest.mark.e2e
def test_an_fp8_model_served_by_mlserver_streams_its_checkpoints_tokens(fp8_models, tmp_path):
    """`mlserver start` on an fp8 store at 25%: greedy tokens over SSE and gRPC are
    from_pretrained's of the fp8 checkpoint, and the metadata names the stored format."""
    from mlserver_proc import ModelSpec, serve

    from layerstream_client import Final, GRPCClient, SSEClient, Token

    model = fp8_models("llama")
    ref = reference(model.fp8)
    ids = PROMPT[0].tolist()
    with torch.inference_mode():
        out = ref.generate(
            PROMPT, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(PROMPT)
        )
    expected = out[0, len(ids) :].tolist()
    spec = ModelSpec("fp8", model.store, {"memory_budget": "25%", "torch_threads": 1})
    with serve(tmp_path / "repo", [spec]) as server:
        metadata = httpx.get(f"{server.http_url}/v2/models/fp8", timeout=30).json()
        assert metadata["parameters"]["stored_format"] == "fp8 (128x128 blocks, float32 scales)"
        assert metadata["parameters"]["dtype"] == "bfloat16"
        for client in (SSEClient(server.http_url, 60.0), GRPCClient(server.grpc_target, 60.0)):
            events = list(client.generate("fp8", input_ids=ids, max_new_tokens=10))
            tokens = [e.token_id for e in events if isinstance(e, Token)]
            final = events[-1]
            assert isinstance(final, Final) and final.error is None
            assert tokens == expected
            assert final.stats["bytes_streamed"] > 0


# a piece: the whole tensor, whole block rows (200 rows cut to 128), part of a block row, and
# less than a row
@pytest.mark.parametrize("piece", [None, 200 * 256, 3 * 256, 100])
@pytest.mark.parametrize("flush", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_is_bit_identical_to_transformers_for_every_fp8_value(
    dtype, flush, piece, monkeypatch
):
    """Every byte (subnormals, ±0, NaN) against scales of every kind (a scale × 256 past
    float32 included), a tensor at once or a piece of it at a time: the fast path and its
    fallbacks equal transformers' routine."""
    from layerstream.format import quantization
    from layerstream.format.quantization import dequantize, dequantize_reference

    if piece is not None:
        monkeypatch.setattr(quantization, "FP8_PIECE", piece)
        monkeypatch.setattr(quantization, "_scratch", threading.local())

    every = torch.arange(256, dtype=torch.uint8)
    finite = every[(every & 0x7F) != 0x7F]
    scales = [
        torch.rand(2, 2) * 1e-2,
        torch.tensor([[1e-40, 2.0**-126], [3e38, 7.1e-3]]),  # subnormal, tiny, huge
        torch.tensor([[1.0, -0.5], [0.0, 2.0**-20]]),
    ]
    torch.set_flush_denormal(flush)
    try:
        for values in (finite, every):
            weight = values.repeat(256 * 256 // values.numel() + 1)[: 256 * 256]
            weight = weight[torch.randperm(weight.numel())].view(256, 256)
            weight = weight.view(torch.float8_e4m3fn)
            for scale in scales:
                for s in (scale, scale.to(torch.bfloat16)):
                    want = dequantize_reference(weight, s, dtype)
                    got = dequantize(weight, s, dtype)
                    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32}[dtype.itemsize]
                    assert torch.equal(got.view(bits), want.view(bits)), (values.numel(), s)
                    out = torch.empty(256, 256, dtype=dtype)
                    assert dequantize(weight, s, dtype, out=out) is out
                    assert torch.equal(out.view(bits), want.view(bits))
    finally:
        torch.set_flush_denormal(False)


def allocated_bytes(call) -> int:
    """The bytes torch allocates on this CPU while ``call`` runs (its second run: a thread's
    scratch is made once)."""
    from torch.profiler import ProfilerActivity, profile

    call()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantizing_allocates_nothing_the_size_of_the_weight(dtype, monkeypatch):
    """Into its destination, fp8 dequantization allocates only what its scales take, in
    whole block rows or in part of one: under the engine's fixed mmap threshold
    (engine/allocator.py) a temporary of a piece's size is a fresh mapping at every piece,
    which made it 5x slower beside compute."""
    from layerstream.format import quantization

    weight = torch.randn(1024, 512).mul_(100).clamp_(-440, 440).to(torch.float8_e4m3fn)
    scales = torch.rand(8, 4)
    out = torch.empty(1024, 512, dtype=dtype)
    for piece in (quantization.FP8_PIECE, 300 * 512, 40 * 512):  # whole, block rows, part
        monkeypatch.setattr(quantization, "FP8_PIECE", piece)
        monkeypatch.setattr(quantization, "_scratch", threading.local())
        call = partial(quantization.dequantize, weight, scales, dtype, out)
        assert allocated_bytes(call) < 1024, piece
        assert torch.equal(out, quantization.dequantize_reference(weight, scales, dtype))


def test_a_streamed_block_is_dequantized_into_its_streaming_buffer(fp8_models):
    """Dequantized on the reading thread into room beside the block's bytes in its pool
    buffer: no allocation per use, and within the budget's buffers."""
    model = fp8_models("qwen3")
    engine = Engine(open_store(str(model.store)), EngineOptions(memory_budget="25%"))
    try:
        pool = engine.streamer._reader.pool
        spans = [(b.data_ptr(), b.data_ptr() + b.numel()) for b in pool.buffers]
        seen: list[int] = []
        j = engine.plan.streamed[0]
        module = engine.model.get_submodule(engine.prefixes[j])
        weight = module.mlp.down_proj

        def record(mod, args) -> None:  # runs after the install hook
            seen.append(weight.weight.data_ptr())

        handle = module.register_forward_pre_hook(record)
        with engine.request():
            engine.model(PROMPT)
        handle.remove()
        assert seen and all(any(lo <= p < hi for lo, hi in spans) for p in seen)
        assert all(p % 64 == 0 for p in seen)
    finally:
        engine.close()


def _jobs(count: int):
    from layerstream.engine.dequantization import Job
    from layerstream.format.quantization import dequantize_reference

    jobs, want = [], {}
    for i in range(count):
        weight = (torch.randn(256, 128) * 100).to(torch.float8_e4m3fn)
        scales = torch.rand(2, 1) * 1e-3
        jobs.append(Job(f"w{i}", weight, scales, torch.bfloat16, None, FP8_BLOCKS))
        want[f"w{i}"] = dequantize_reference(weight, scales, torch.bfloat16)
    return jobs, want


def test_dequantization_is_shared_by_two_threads_each_tensor_once(monkeypatch):
    """The reading thread takes tensors from the first, the computing one from the last:
    between them every tensor is dequantized exactly once, and finish has them all."""
    import threading

    from layerstream.engine import dequantization

    jobs, want = _jobs(6)
    done: list[tuple[str, str]] = []
    real = Fp8Blocks.dequantize
    first_started, release_first = threading.Event(), threading.Event()

    def slow(self, weight, scales, dtype, out):
        name = threading.current_thread().name
        done.append((name, next(j.key for j in jobs if j.weight is weight)))
        if name == "reader" and len(done) == 1:
            first_started.set()
            assert release_first.wait(30)
        return real(self, weight, scales, dtype, out)

    monkeypatch.setattr(Fp8Blocks, "dequantize", slow)
    seconds: list[float] = []
    work = dequantization.Dequantization(jobs, seconds.append)
    reader = threading.Thread(target=work.work, name="reader")
    reader.start()
    assert first_started.wait(30)  # the reader holds w0; the computing thread takes the rest
    out_box: dict = {}

    def compute() -> None:
        out_box.update(work.finish())

    computer = threading.Thread(target=compute, name="compute")
    computer.start()
    for _ in range(3000):  # bounded: the computing thread's five tensors, then it waits
        if sum(1 for n, _ in done if n == "compute") == 5:
            break
        computer.join(0.01)
    assert computer.is_alive()  # finish waits for w0, which the reader still holds
    release_first.set()
    computer.join(30)
    reader.join(30)
    assert sorted(k for _, k in done) == sorted(want)  # each once
    assert [k for n, k in done if n == "reader"] == ["w0"]
    assert [k for n, k in done if n == "compute"] == ["w5", "w4", "w3", "w2", "w1"]
    assert all(torch.equal(out_box[k], v) for k, v in want.items())
    assert len(seconds) == 6


def test_a_closed_dequantization_waits_for_what_runs_and_starts_nothing(monkeypatch):
    """A lease given back while its block is being dequantized: close returns only once the
    running tensor is written (its room is reused next), and no other tensor starts."""
    import threading

    from layerstream.engine import dequantization

    jobs, _ = _jobs(3)
    started, go = threading.Event(), threading.Event()
    calls: list[int] = []

    def blocking(self, weight, scales, dtype, out):
        calls.append(1)
        started.set()
        assert go.wait(30)
        return weight.to(dtype)

    monkeypatch.setattr(Fp8Blocks, "dequantize", blocking)
    work = dequantization.Dequantization(jobs, lambda s: None)
    reader = threading.Thread(target=work.work)
    reader.start()
    assert started.wait(30)
    closer = threading.Thread(target=work.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # waits for the running tensor
    go.set()
    closer.join(30)
    reader.join(30)
    assert not closer.is_alive() and not reader.is_alive()
    assert len(calls) == 1  # nothing started after close


def test_a_failed_tensor_fails_the_block(monkeypatch):
    from layerstream.engine import dequantization

    jobs, _ = _jobs(2)

    def broken(*args):
        raise ValueError("bad scales")

    monkeypatch.setattr(Fp8Blocks, "dequantize", broken)
    work = dequantization.Dequantization(jobs, lambda s: None)
    work.work()
    with pytest.raises(ValueError, match="bad scales"):
        work.finish()
