"""MXFP4 checkpoints as gpt-oss ships them: the store keeps the 4-bit experts and their
scales, and serves what from_pretrained of the same checkpoint computes on a CPU (which
dequantizes them at load), streamed whole or expert by expert.

The expert-streaming tests poison every byte the engine did not read, dequantized room
included: an output equal to from_pretrained's proves an unread expert is never used."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from architectures import (
    ARCHITECTURES,
    PROMPT,
    compare_generation,
    compare_hidden_states,
    reference_model,
)
from safetensors.torch import load_file
from test_exactness import assert_same_generation, generate_both
from test_experts import IMPLEMENTATIONS, STEPS, assert_together_as_solo, expert_engine

from layerstream.chunker.convert import ChunkerError, chunk_checkpoint
from layerstream.chunker.presets import write_random_checkpoint
from layerstream.chunker.quantize import write_random_mxfp4_checkpoint
from layerstream.engine.engine import Engine, EngineOptions
from layerstream.errors import ManifestError, SettingsError
from layerstream.format import quantization
from layerstream.format.manifest import Manifest
from layerstream.format.quantization import Mxfp4
from layerstream.stores import open_store


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory) -> tuple[Path, Path]:
    """(the MXFP4 checkpoint, its store): gpt-oss's layout at 8 experts, top-2."""
    root = tmp_path_factory.mktemp("mxfp4")
    (root / "config.json").write_text(json.dumps(ARCHITECTURES["gpt_oss"]))
    plain = write_random_checkpoint(
        str(root / "config.json"), root / "plain", weight_scale=8.0, dtype="bfloat16"
    )
    checkpoint = write_random_mxfp4_checkpoint(plain, root / "mxfp4")
    chunk_checkpoint(checkpoint, root / "store", "gpt-oss", progress=False)
    return checkpoint, root / "store"


def _budget(store: Path) -> int:
    """Room for the rest, every block's base and two streaming buffers (each with its block
    dequantized): the experts stream."""
    manifest = Manifest.from_json((store / "manifest.json").read_text())
    largest = max(manifest.chunks[b.chunk].memory_bytes for b in manifest.blocks)
    return manifest.rest_bytes + 3 * largest


def test_the_store_keeps_the_4_bit_experts_and_their_scales(gpt_oss):
    checkpoint, store = gpt_oss
    manifest = Manifest.from_json((store / "manifest.json").read_text())
    assert manifest.quantization == Mxfp4()
    source = load_file(checkpoint / "model.safetensors")
    block = manifest.chunks[manifest.blocks[0].chunk]
    chunk = load_file(store / block.file)
    key = "model.layers.0.mlp.experts.gate_up_proj"
    assert block.quantized == sorted([key, key.replace("gate_up", "down")])
    # the checkpoint's bytes, each expert's transposed as transformers transposes its values
    assert torch.equal(chunk[key], source[key + "_blocks"].permute(0, 2, 3, 1))
    assert torch.equal(chunk[key + "_scales"], source[key + "_scales"].permute(0, 2, 1))
    # an expert read alone brings its scales: they are part of its group
    (group,) = block.experts.groups
    assert key + "_scales" in group.tensors
    # the store holds a quarter of bfloat16's bytes for the experts, and a little more
    dequantized = block.dequantized_bytes
    stored = sum(chunk[k].numel() + chunk[k + "_scales"].numel() for k in block.quantized)
    assert stored / dequantized == pytest.approx(0.25 * (1 + 1 / 16))


def test_a_store_of_4_bit_blocks_in_the_checkpoints_order_is_refused(gpt_oss):
    """An earlier layerstream kept the blocks as the checkpoint orders them: read in this
    store's order they would be other values, so such a store is refused, not served."""
    _, store = gpt_oss
    data = json.loads((store / "manifest.json").read_text())
    assert data["quantization"] == {"method": "mxfp4", "layout": "transposed"}
    data["quantization"] = {"method": "mxfp4"}
    with pytest.raises(ManifestError, match=r"checkpoint's order.*re-run the chunker"):
        Manifest.from_json(json.dumps(data))


def test_dequantizing_allocates_nothing_the_size_of_the_experts(monkeypatch):
    """Into its destination, MXFP4 dequantization allocates nothing per piece (its index,
    values' indices and scales are a thread's scratch, made once): as fp8's, never a fresh
    mapping per piece under the engine's fixed mmap threshold."""
    from test_quantized import allocated_bytes

    fmt = Mxfp4()
    blocks = torch.randint(0, 256, (4, 8, 16, 512), dtype=torch.uint8)  # [E, A/32, 16, B]
    scales = torch.randint(120, 130, (4, 8, 512), dtype=torch.uint8)
    out = torch.empty(fmt.dequantized_shape(tuple(blocks.shape)), dtype=torch.bfloat16)
    for piece in (quantization.PIECE, 16 * 512 * 2):  # an expert whole, a group a piece
        monkeypatch.setattr(quantization, "PIECE", piece)
        monkeypatch.setattr(quantization, "_scratch", threading.local())
        assert allocated_bytes(lambda: fmt.dequantize(blocks, scales, torch.bfloat16, out)) < 1024


@pytest.mark.parametrize("piece", [quantization.PIECE, 1])
def test_each_expert_dequantized_alone_equals_transformers_on_the_whole_tensor(monkeypatch, piece):
    """Every byte value and every scale, bit for bit in each dtype, sliced by expert as a
    lease does, and in pieces of rows (down to one) as the engine bounds its working
    memory."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    monkeypatch.setattr(quantization, "PIECE", piece)

    fmt = Mxfp4()
    shape = (4, 64, 96)  # [E, A, B]: the checkpoint's [E, B, A/32, 16]
    blocks = torch.arange(256, dtype=torch.uint8).repeat(4 * 96 * 2 * 16 // 256)
    blocks = blocks[torch.randperm(blocks.numel())].view(fmt.checkpoint_shape(shape))
    # every scale, 0 (2^-127) and 255 (NaN) included
    scales = torch.randint(0, 256, fmt.checkpoint_scale_shape(shape), dtype=torch.uint8)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        assert want.shape == shape
        bits = {2: torch.int16, 4: torch.int32}[dtype.itemsize]
        # as the chunker stores them (each expert transposed: Mxfp4.stored_order)
        stored = blocks.permute(fmt.stored_order(4)).contiguous()
        stored_scales = scales.permute(fmt.stored_order(3)).contiguous()
        got = fmt.dequantize(stored, stored_scales, dtype)
        assert torch.equal(got.view(bits), want.view(bits))
        out = torch.full(shape, float("nan"), dtype=dtype)
        for e in (2, 0, 3, 1):
            fmt.dequantize(stored[e : e + 1], stored_scales[e : e + 1], dtype, out[e : e + 1])
        assert torch.equal(out.view(bits), want.view(bits))


@pytest.mark.parametrize("budget", ["100%", "25%"])
def test_whole_blocks_are_exact_to_from_pretrained(gpt_oss, budget):
    checkpoint, store = gpt_oss
    reference = reference_model(checkpoint)
    engine = Engine(
        open_store(str(store)), EngineOptions(memory_budget=budget, expert_streaming="off")
    )
    try:
        assert engine.plan.fully_resident == (budget == "100%")
        generation = compare_generation(engine, reference, STEPS)
        assert generation.ids_equal and generation.step_diffs == [0.0] * STEPS
        hidden = compare_hidden_states(engine, reference)
        assert hidden.diffs == [0.0] * hidden.expected
    finally:
        engine.close()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_streamed_4_bit_experts_are_exact_and_only_the_routed_are_read(gpt_oss, impl):
    """Each routed expert's 4-bit values and scales read and dequantized alone, the
    unread ones NaN in both their stored bytes and their dequantized room."""
    checkpoint, store = gpt_oss
    reference = reference_model(checkpoint)
    reference.set_experts_implementation(impl)
    engine = expert_engine(store, _budget(store))
    try:
        engine.model.set_experts_implementation(impl)
        assert engine.parts, "the experts must stream one by one"
        generation = compare_generation(engine, reference, STEPS)
        assert generation.ids_equal and generation.step_diffs == [0.0] * STEPS
        hidden = compare_hidden_states(engine, reference)
        assert hidden.diffs == [0.0] * hidden.expected
        stats = engine.streamer.stats
        (size,) = {
            p.expert_bytes(0, e) for p in engine.parts.values() for e in range(p.groups[0].count)
        }
        assert stats.expert_bytes == stats.experts_read * size
        assert stats.experts_read > 0
        assert stats.dequantize_s > 0
    finally:
        engine.close()


def test_sampling_and_concurrent_requests_stay_exact(gpt_oss):
    """Seeded sampling equals from_pretrained's, and requests sharing installs (each
    expert read and dequantized once, whoever routed to it) each get their solo output."""
    checkpoint, store = gpt_oss
    reference = reference_model(checkpoint)
    engine = expert_engine(store, _budget(store), compute_slots=2)
    try:
        sampling = dict(do_sample=True, top_k=20, temperature=0.8, seed=7)
        assert_same_generation(*generate_both(engine, reference, **sampling))
        assert_together_as_solo(engine, [PROMPT, PROMPT[::-1], PROMPT[2:]])
    finally:
        engine.close()


GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def _outside_the_experts(tensors: dict[str, torch.Tensor]) -> None:
    rows, cols = tensors.pop(Q_PROJ).shape
    tensors[Q_PROJ + "_blocks"] = torch.zeros(rows, cols // 32, 16, dtype=torch.uint8)
    tensors[Q_PROJ + "_scales"] = torch.zeros(rows, cols // 32, dtype=torch.uint8)


def _signed_blocks(tensors: dict[str, torch.Tensor]) -> None:
    tensors[GATE_UP + "_blocks"] = tensors[GATE_UP + "_blocks"].view(torch.int8)


def _float_scales(tensors: dict[str, torch.Tensor]) -> None:
    tensors[GATE_UP + "_scales"] = tensors[GATE_UP + "_scales"].float()


def _plain_experts(tensors: dict[str, torch.Tensor]) -> None:
    """Every 4-bit tensor replaced by a plain one (config.json still says mxfp4)."""
    for key in [k for k in tensors if k.endswith(("_blocks", "_scales"))]:
        blocks = tensors.pop(key)
        if key.endswith("_blocks"):
            stem = key.removesuffix("_blocks")
            e, b, g, _ = blocks.shape
            tensors[stem] = torch.zeros(e, g * 32, b, dtype=torch.bfloat16)


def _wrong_shape(tensors: dict[str, torch.Tensor]) -> None:
    blocks = tensors[GATE_UP + "_blocks"]
    tensors[GATE_UP + "_blocks"] = blocks[:, :, :1].contiguous()
    tensors[GATE_UP + "_scales"] = tensors[GATE_UP + "_scales"][:, :, :1].contiguous()


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        # only the experts' gate_up_proj and down_proj are what transformers' loader reads
        (_outside_the_experts, r"q_proj\.weight_blocks"),
        (_wrong_shape, r"gate_up_proj_blocks is torch\.uint8 \[8, 128, 1, 16\]; mxfp4"),
        (lambda t: t.pop(GATE_UP + "_scales"), r"gate_up_proj_blocks has no .*_scales beside"),
        (lambda t: t.pop(GATE_UP + "_blocks"), r"gate_up_proj_scales has no torch\.uint8"),
        (_signed_blocks, r"gate_up_proj_blocks is torch\.int8; mxfp4 .* as torch\.uint8"),
        (_plain_experts, r"says mxfp4, but the checkpoint holds no `_scales` tensors"),
        (_float_scales, r"mxfp4 with scales in \['torch\.float32', 'torch\.uint8'\]"),
    ],
)
def test_a_damaged_mxfp4_checkpoint_is_one_clear_error_naming_the_tensor(
    gpt_oss, tmp_path, damage, words
):
    from safetensors.torch import save_file

    checkpoint, _ = gpt_oss
    tensors = load_file(checkpoint / "model.safetensors")
    damage(tensors)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (checkpoint / name).exists():
            (bad / name).write_bytes((checkpoint / name).read_bytes())
    with pytest.raises(ChunkerError, match=words) as error:
        chunk_checkpoint(bad, tmp_path / "store", "bad", progress=False)
    assert "fp8" not in str(error.value) and "weight_block_size" not in str(error.value)
    assert not (tmp_path / "store" / "manifest.json").exists()


def test_experts_alone_at_a_budget_that_streams_no_block_says_so(gpt_oss, tmp_path):
    _, store = gpt_oss
    with pytest.raises(SettingsError, match="streams no block at this budget"):
        Engine(open_store(str(store)), EngineOptions(memory_budget="100%", expert_streaming="on"))
    # paths as strings are fine for the checkpoint writer too
    plain = tmp_path / "plain"
    (tmp_path / "config.json").write_text(json.dumps(ARCHITECTURES["gpt_oss"]))
    write_random_checkpoint(str(tmp_path / "config.json"), plain, dtype="bfloat16")
    assert write_random_mxfp4_checkpoint(str(plain), str(tmp_path / "mx")).is_dir()


def test_an_mxfp4_model_served_by_mlserver_streams_its_checkpoints_tokens(gpt_oss, tmp_path):
    """`mlserver start` on the MXFP4 store, 4-bit experts streamed one by one: greedy
    tokens over SSE and gRPC are from_pretrained's, and the metadata names the format."""
    import httpx
    from mlserver_proc import ModelSpec, serve

    from layerstream_client import Final, GRPCClient, SSEClient, Token

    checkpoint, store = gpt_oss
    reference = reference_model(checkpoint)
    prompt = torch.tensor([PROMPT])
    with torch.inference_mode():
        out = reference.generate(
            prompt, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(prompt)
        )
    expected = out[0, len(PROMPT) :].tolist()
    settings = {"memory_budget": str(_budget(store)), "expert_streaming": "on", "torch_threads": 1}
    with serve(tmp_path / "repo", [ModelSpec("oss", store, settings)]) as server:
        metadata = httpx.get(f"{server.http_url}/v2/models/oss", timeout=30).json()
        assert metadata["parameters"]["stored_format"] == Mxfp4().describe()
        for client in (SSEClient(server.http_url, 60.0), GRPCClient(server.grpc_target, 60.0)):
            events = list(client.generate("oss", input_ids=PROMPT, max_new_tokens=8))
            final = events[-1]
            assert isinstance(final, Final) and final.error is None
            assert [e.token_id for e in events if isinstance(e, Token)] == expected
            assert final.stats["experts_read"] > 0


@pytest.mark.parametrize(
    ("budget", "places"), [("50%", (False, True, False)), ("75%", (True, False, True))]
)
def test_the_expert_cache_keeps_4_bit_experts_dequantized(gpt_oss, budget, places):
    """A hit uses the expert as it was dequantized (and its plain slices), where it lies or
    copied: no read, no dequantization, and the output stays from_pretrained's with every
    unread byte NaN, whichever way each pass computes (each finds what the one before kept,
    the other way)."""
    checkpoint, store = gpt_oss
    reference = reference_model(checkpoint)
    engine = expert_engine(store, budget, expert_prefetch=False, expert_cache_in_place=True)
    try:
        assert engine.plan.expert_cache > 0 and engine.plan.streamed
        engine.wait_pinned()
        hits = []
        for in_place in places:
            engine.placement.in_place = in_place
            before = engine.streamer.stats.snapshot()
            generation = compare_generation(engine, reference, STEPS)
            assert generation.ids_equal and generation.step_diffs == [0.0] * STEPS
            hits.append(engine.streamer.stats.since(before).expert_cache_hits)
        assert all(hits[1:])
        # a kept expert is its dequantized slices and its biases, not its 4-bit bytes
        part = next(iter(engine.parts.values()))
        kept = engine.streamer._reader.cache.slot_bytes
        assert kept > 3 * part.expert_bytes(0, 0)
    finally:
        engine.close()


def test_misses_read_beside_copies_are_dequantized_in_the_requests_mode(gpt_oss):
    """A server runs each request in inference mode, and the tensors its installs make are
    inference tensors: the missed experts read while the kept ones are copied (on a thread
    of their own) are dequantized into them in that mode too (outside it, torch refuses an
    in-place write into them: a request failed so under `mlserver start`)."""
    checkpoint, store = gpt_oss
    reference = reference_model(checkpoint)
    engine = expert_engine(
        store, "50%", read_ahead=0, expert_prefetch=False, expert_cache_in_place=False
    )
    try:
        assert engine.plan.expert_cache > 0
        before = engine.streamer.stats.snapshot()
        for _ in range(2):  # the second finds what the first kept, and misses the rest
            with torch.inference_mode():
                generation = compare_generation(engine, reference, STEPS)
            assert generation.ids_equal and generation.step_diffs == [0.0] * STEPS
        stats = engine.streamer.stats.since(before)
        assert stats.expert_cache_hits > 0 and stats.experts_read > 0
    finally:
        engine.close()
