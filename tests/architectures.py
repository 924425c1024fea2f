"""Small configs for 58 architectures transformers builds from a config, plus ALBERT with
two layer groups: the architecture sweep test (test_architectures.py) and the exactness
sweep benchmark (benchmarks/exactness_sweep.py) both use them.

Each has eight blocks (ALBERT: one shared group applied eight times; encoder-decoders: four
and four) of a hidden size of 64 (Mamba: 32), so a 25% budget leaves room for the non-block
weights and one streaming buffer and streams most blocks (not ALBERT's: its one shared
block is most of the model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import PreTrainedModel

from layerstream.chunker.convert import chunk_checkpoint
from layerstream.chunker.presets import write_random_checkpoint
from layerstream.engine.engine import Engine
from layerstream.inference.capabilities import capabilities
from layerstream.inference.hidden import run_hidden_states
from layerstream.inference.types import HiddenStateEvent
from layerstream.serving.protocol import Request

VOCAB = 320  # the test tokenizer's size (presets.build_tokenizer)
LAYERS = 8
_DECODER = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=128,
)
_GPT = dict(n_embd=64, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, n_positions=128)
_ENCODER = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    vocab_size=VOCAB,
    max_position_embeddings=130,
)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=64)
_SEQ2SEQ = dict(
    d_model=64,
    encoder_layers=4,
    decoder_layers=4,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=256,
    decoder_ffn_dim=256,
    vocab_size=VOCAB,
    max_position_embeddings=128,
)


def _arch(model_type: str, architecture: str, **kwargs: Any) -> dict[str, Any]:
    return dict(model_type=model_type, architectures=[architecture], **kwargs)


ARCHITECTURES: dict[str, dict[str, Any]] = {
    "gpt2": _arch("gpt2", "GPT2LMHeadModel", **_GPT),
    "gptj": _arch("gptj", "GPTJForCausalLM", **_GPT, rotary_dim=8),
    "gpt_neo": _arch(
        "gpt_neo",
        "GPTNeoForCausalLM",
        hidden_size=64,
        num_layers=LAYERS,
        num_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        attention_types=[[["global", "local"], LAYERS // 2]],
        window_size=8,
    ),
    "gpt_neox": _arch("gpt_neox", "GPTNeoXForCausalLM", **_DECODER),
    "gpt_bigcode": _arch("gpt_bigcode", "GPTBigCodeForCausalLM", **_GPT),
    "codegen": _arch("codegen", "CodeGenForCausalLM", **_GPT, n_ctx=128, rotary_dim=8),
    "bloom": _arch(
        "bloom", "BloomForCausalLM", hidden_size=64, n_layer=LAYERS, n_head=4, vocab_size=VOCAB
    ),
    "falcon": _arch(
        "falcon",
        "FalconForCausalLM",
        hidden_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        vocab_size=VOCAB,
    ),
    "mpt": _arch(
        "mpt",
        "MptForCausalLM",
        d_model=64,
        n_layers=LAYERS,
        n_heads=4,
        vocab_size=VOCAB,
        max_seq_len=128,
    ),
    "opt": _arch(
        "opt",
        "OPTForCausalLM",
        hidden_size=64,
        ffn_dim=256,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        word_embed_proj_dim=64,
    ),
    "llama": _arch("llama", "LlamaForCausalLM", **_DECODER),
    "mistral": _arch("mistral", "MistralForCausalLM", **_DECODER, sliding_window=16),
    "mixtral": _arch(
        "mixtral", "MixtralForCausalLM", **_DECODER, num_local_experts=4, num_experts_per_tok=2
    ),
    "qwen2": _arch("qwen2", "Qwen2ForCausalLM", **_DECODER),
    "qwen2_moe": _arch(
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        **_DECODER,
        **_MOE,
        num_experts=4,
        shared_expert_intermediate_size=64,
    ),
    "qwen3": _arch("qwen3", "Qwen3ForCausalLM", **_DECODER, head_dim=16),
    "qwen3_moe": _arch(
        "qwen3_moe", "Qwen3MoeForCausalLM", **_DECODER, **_MOE, head_dim=16, num_experts=4
    ),
    # mixture-of-experts releases' layouts at 8 experts, top-2 (expert streaming reads a
    # token's 2 of 8; test_experts.py)
    "gpt_oss": _arch(
        "gpt_oss",
        "GptOssForCausalLM",
        **{**_DECODER, "intermediate_size": 64},
        head_dim=16,
        num_local_experts=8,
        num_experts_per_tok=2,
    ),
    "olmoe": _arch(
        "olmoe",
        "OlmoeForCausalLM",
        **{**_DECODER, "intermediate_size": 64},
        num_experts=8,
        num_experts_per_tok=2,
    ),
    "granitemoe": _arch(
        "granitemoe",
        "GraniteMoeForCausalLM",
        **{**_DECODER, "intermediate_size": 64},
        num_local_experts=8,
        num_experts_per_tok=2,
    ),
    "phimoe": _arch(
        "phimoe",
        "PhimoeForCausalLM",
        **{**_DECODER, "intermediate_size": 64},
        num_local_experts=8,
        num_experts_per_tok=2,
    ),
    "gemma": _arch("gemma", "GemmaForCausalLM", **_DECODER, head_dim=16),
    "gemma2": _arch("gemma2", "Gemma2ForCausalLM", **_DECODER, head_dim=16),
    "gemma3_text": _arch("gemma3_text", "Gemma3ForCausalLM", **_DECODER, head_dim=16),
    "phi": _arch("phi", "PhiForCausalLM", **_DECODER),
    "phi3": _arch("phi3", "Phi3ForCausalLM", **_DECODER),
    "stablelm": _arch("stablelm", "StableLmForCausalLM", **_DECODER),
    "starcoder2": _arch("starcoder2", "Starcoder2ForCausalLM", **_DECODER),
    "olmo": _arch("olmo", "OlmoForCausalLM", **_DECODER),
    "olmo2": _arch("olmo2", "Olmo2ForCausalLM", **_DECODER),
    "cohere": _arch("cohere", "CohereForCausalLM", **_DECODER),
    "granite": _arch("granite", "GraniteForCausalLM", **_DECODER),
    "deepseek_v3": _arch(
        "deepseek_v3",
        "DeepseekV3ForCausalLM",
        **{**_DECODER, "num_key_value_heads": 4},
        **_MOE,
        n_routed_experts=4,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        head_dim=8,
        n_group=1,
        topk_group=1,
    ),
    # hidden 32: a dt_proj of rank 2, whose torch.matmul takes another kernel when the
    # weight's requires_grad differs from from_pretrained's (skeleton.build_skeleton)
    "mamba": _arch(
        "mamba",
        "MambaForCausalLM",
        hidden_size=32,
        num_hidden_layers=LAYERS,
        vocab_size=VOCAB,
        state_size=16,
        expand=2,
        conv_kernel=4,
    ),
    # hybrids: one list of blocks of two classes (attention and Mamba / linear attention)
    "jamba": _arch(
        "jamba",
        "JambaForCausalLM",
        **_DECODER,
        num_experts=4,
        num_experts_per_tok=2,
        expert_layer_period=2,
        expert_layer_offset=1,
        attn_layer_period=4,
        attn_layer_offset=2,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_dt_rank=8,
        use_mamba_kernels=False,
    ),
    "olmo_hybrid": _arch("olmo_hybrid", "OlmoHybridForCausalLM", **_DECODER),
    # one shared transformer with per-layer adapters, tied among the hybrid layers
    "zamba2": _arch(
        "zamba2",
        "Zamba2ForCausalLM",
        **{**_DECODER, "num_key_value_heads": 4},
        layers_block_type=["mamba", "mamba", "hybrid", "mamba"] * 2,
        num_mem_blocks=1,
        use_shared_attention_adapter=True,
        adapter_rank=8,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_headdim=16,
        mamba_ngroups=1,
        n_mamba_heads=8,
        use_mamba_kernels=False,
    ),
    # one transformer applied at several of its Mamba layers: weights tied among blocks
    "zamba": _arch(
        "zamba",
        "ZambaForCausalLM",
        **{**_DECODER, "num_key_value_heads": 4},
        attention_hidden_size=128,
        attention_head_dim=32,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_dt_rank=8,
        n_mamba_heads=2,
        use_mamba_kernels=False,
        attn_layer_period=3,
        attn_layer_offset=2,
    ),
    # writes to its weights on its first forward (engine/writes.py): served with every block
    # in memory, refused at a budget that streams any
    "rwkv": _arch(
        "rwkv",
        "RwkvForCausalLM",
        hidden_size=64,
        attention_hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=LAYERS,
        vocab_size=VOCAB,
        context_length=128,
        rescale_every=3,
    ),
    "recurrent_gemma": _arch(
        "recurrent_gemma",
        "RecurrentGemmaForCausalLM",
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=VOCAB,
        lru_width=64,
        attention_window_size=16,
        block_types=["recurrent", "attention"],
        head_dim=16,
    ),
    # their forwards read a value (.item()) that the meta pass answers (engine/writes.py)
    "biogpt": _arch(
        "biogpt", "BioGptForCausalLM", **{k: v for k, v in _DECODER.items() if "key" not in k}
    ),
    "roformer": _arch("roformer", "RoFormerModel", **_ENCODER),
    # its encoder's layers in one list per stage (a list of lists, which never runs)
    "funnel": _arch(
        "funnel",
        "FunnelModel",
        d_model=64,
        n_head=4,
        d_head=16,
        d_inner=256,
        block_sizes=[2, 2, 2],
        num_decoder_layers=2,
        vocab_size=VOCAB,
    ),
    # ESM-1b's layout: multiplies its embeddings' layer norm output by the attention mask
    "esm": _arch(
        "esm",
        "EsmModel",
        **_ENCODER,
        pad_token_id=1,
        mask_token_id=2,
        token_dropout=True,
        emb_layer_norm_before=True,
    ),
    # its router's nonzero(), which the meta pass takes as all non-zero (engine/writes.py)
    "dbrx": _arch(
        "dbrx",
        "DbrxForCausalLM",
        d_model=64,
        n_layers=LAYERS,
        n_heads=4,
        vocab_size=VOCAB,
        max_seq_len=128,
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
    ),
    # forwards that cannot run on the meta device (META_PASS_FAILS)
    "jetmoe": _arch(
        "jetmoe",
        "JetMoeForCausalLM",
        **{**_DECODER, "num_key_value_heads": 4},
        num_local_experts=4,
        num_experts_per_tok=2,
        kv_channels=16,
    ),
    "xlnet": _arch(
        "xlnet",
        "XLNetLMHeadModel",
        d_model=64,
        n_layer=LAYERS,
        n_head=4,
        d_inner=256,
        vocab_size=VOCAB,
    ),
    "bert": _arch("bert", "BertModel", **_ENCODER),
    "roberta": _arch("roberta", "RobertaModel", **_ENCODER),
    "distilbert": _arch(
        "distilbert",
        "DistilBertModel",
        dim=64,
        hidden_dim=256,
        n_layers=LAYERS,
        n_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    ),
    "electra": _arch("electra", "ElectraModel", **_ENCODER, embedding_size=32),
    "deberta_v2": _arch("deberta-v2", "DebertaV2Model", **_ENCODER),
    "xlm_roberta": _arch("xlm-roberta", "XLMRobertaModel", **_ENCODER),
    # as released: one shared layer group, applied num_hidden_layers times
    "albert": _arch("albert", "AlbertModel", **_ENCODER, embedding_size=32),
    "albert_2_groups": _arch(
        "albert", "AlbertModel", **_ENCODER, embedding_size=32, num_hidden_groups=2
    ),
    "t5": _arch(
        "t5",
        "T5ForConditionalGeneration",
        d_model=64,
        d_ff=256,
        num_layers=4,
        num_decoder_layers=4,
        num_heads=4,
        d_kv=16,
        vocab_size=VOCAB,
        decoder_start_token_id=0,
    ),
    "bart": _arch("bart", "BartForConditionalGeneration", **_SEQ2SEQ),
    "mbart": _arch("mbart", "MBartForConditionalGeneration", **_SEQ2SEQ),
    # its sinusoidal positions are never saved: from_pretrained computes them at init
    "marian": _arch(
        "marian", "MarianMTModel", **_SEQ2SEQ, decoder_start_token_id=0, pad_token_id=0
    ),
}


# Their forwards cannot run on the meta device (JetMoE copies routing values out of it,
# XLNet makes tensors on the CPU): whether they write to their weights is not known, and
# they serve no hidden_states mode, which their metadata says with the reason.
META_PASS_FAILS = {"jetmoe", "xlnet"}


# -- building and comparing (the sweep test asserts on these, the benchmark tabulates them) --

PROMPT = [5, 17, 99, 3, 250, 7, 42, 130, 11, 64]
WEIGHT_SCALE = 8.0  # at the default init greedy decoding repeats one token (presets.py)


def build(
    name: str,
    root: Path,
    weight_scale: float = WEIGHT_SCALE,
    config: dict[str, Any] | None = None,
    dtype: str | None = None,
    perturb: float = 0.0,
) -> tuple[Path, Path]:
    """A random-init checkpoint of ``name`` (or of ``config``, a variant of it), saved in
    ``dtype`` (default: float32) with its 1-D weights ``perturb``ed, and its chunk store,
    under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.json"
    path.write_text(json.dumps(config or ARCHITECTURES[name]))
    source = write_random_checkpoint(
        str(path), root / "source", weight_scale=weight_scale, dtype=dtype, perturb=perturb
    )
    store = root / "chunks"
    chunk_checkpoint(source, store, name, progress=False)
    return source, store


def reference_model(source: Path) -> PreTrainedModel:
    config = json.loads((source / "config.json").read_text())
    return getattr(transformers, config["architectures"][0]).from_pretrained(source).eval()


@dataclass
class Generation:
    ids_equal: bool
    distinct_ids: int  # distinct generated ids: a weak check when it is 1
    steps: int
    step_diffs: list[float]  # max |engine - reference| of the logits, per generated token

    @property
    def max_diff(self) -> float:
        return max(self.step_diffs)


def compare_generation(engine: Engine, reference: PreTrainedModel, steps: int) -> Generation:
    """Greedy decoding of PROMPT by both, every step's logits compared."""
    prompt = torch.tensor([PROMPT])
    kwargs = dict(
        max_new_tokens=steps,
        min_new_tokens=steps,  # an early EOS would shorten the comparison
        do_sample=False,
        attention_mask=torch.ones_like(prompt),
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with engine.request():
        mine = engine.model.generate(prompt, **kwargs)
    with torch.inference_mode():
        theirs = reference.generate(prompt, **kwargs)
    new = theirs.sequences[0, -steps:].tolist()
    return Generation(
        ids_equal=torch.equal(mine.sequences, theirs.sequences),
        distinct_ids=len(set(new)),
        steps=len(theirs.logits),
        step_diffs=[_diff(a, b) for a, b in zip(mine.logits, theirs.logits, strict=True)],
    )


@dataclass
class HiddenStates:
    count: int  # hidden states the runtime sent
    expected: int  # what output_hidden_states returns
    layers: list[int]  # the index each event carried, in order
    diffs: list[float]  # max |runtime - transformers| per index

    @property
    def max_diff(self) -> float:
        return max(self.diffs)


def compare_hidden_states(engine: Engine, reference: PreTrainedModel) -> HiddenStates:
    """Every hidden state the runtime streams vs ``output_hidden_states=True``."""
    caps = capabilities(engine)
    request = Request(mode="hidden_states", layers=list(range(caps.num_layers + 1)))
    events: list[HiddenStateEvent] = []
    run_hidden_states(engine, request, PROMPT, events.append, lambda: False)
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        states = reference.base_model(
            input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True
        ).hidden_states
    diffs = [
        float(np.abs(e.hidden_state - states[e.layer][0].float().numpy()).max())
        if e.layer < len(states)
        else float("inf")
        for e in events
    ]
    return HiddenStates(len(events), len(states), [e.layer for e in events], diffs)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()
