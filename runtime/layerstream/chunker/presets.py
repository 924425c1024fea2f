"""Random-init demo models and a working local tokenizer, for machines without the Hub.

``layerstream chunk --random-init tiny-llama`` (a preset) or ``--random-init config.json``
builds the model from its config with a fixed seed and trains a small byte-level BPE
tokenizer on a built-in text, so the chunked model can be served and prompted end to end
offline. The weights are random: the text it generates is gibberish, but every path
(tokenize, stream, generate, decode) is the real one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerFast

from ..engine.skeleton import TORCH_DTYPES, context_length
from .sizing import config_from_json

log = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
CLS, SEP, MASK = "[CLS]", "[SEP]", "[MASK]"
# A small chat template for the generative demos, so that the ``messages`` input and the
# OpenAI chat endpoint work on them as on a real chat model: each turn opens with its role
# and closes with EOS, and the generation prompt opens the assistant's turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# the tiny decoder and encoder presets' common shape
_TINY: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    vocab_size=512,
    max_position_embeddings=256,
)

# name -> (model_type, config kwargs). Small enough for tests; "llama-demo" is the quick start.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-gpt2": (
        "gpt2",
        dict(
            n_embd=64,
            n_layer=4,
            n_head=4,
            vocab_size=512,
            n_positions=256,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "tiny-llama": (
        "llama",
        _TINY | dict(num_key_value_heads=2, tie_word_embeddings=False),
    ),
    "tiny-qwen2": ("qwen2", _TINY | dict(num_key_value_heads=2)),
    "tiny-bert": ("bert", _TINY),
    # ~300 MB fp32: the memory test and quick benchmark runs
    "llama-300m": (
        "llama",
        dict(
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=4,
            vocab_size=4096,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        ),
    ),
    # ~1 GB fp32 (24 blocks of 45 MB): the streaming benchmark's model
    "llama-1b": (
        "llama",
        dict(
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=4,
            vocab_size=4096,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        ),
    ),
    # ~4 GB fp32 (22 blocks of 180 MB): the chunker benchmark's large model
    "llama-4b": (
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=16,
            num_key_value_heads=4,
            vocab_size=4096,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        ),
    ),
    # mixture-of-experts shapes of current releases, a few GB in bfloat16: the expert
    # streaming benchmark's models (Qwen3-MoE: 64 experts, top-8; Mixtral: 8, top-2)
    "qwen3-moe-2b": (
        "qwen3_moe",
        dict(
            hidden_size=1024,
            intermediate_size=2048,
            moe_intermediate_size=256,
            num_experts=64,
            num_experts_per_tok=8,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=64,
            vocab_size=4096,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        ),
    ),
    # gpt-oss's layout (32 experts, top-4, MXFP4 as released: benchmarks/streaming.py's
    # "mxfp4" dtype writes such a checkpoint of it)
    "gpt-oss-2b": (
        "gpt_oss",
        dict(
            hidden_size=1024,
            intermediate_size=512,
            num_local_experts=32,
            num_experts_per_tok=4,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=64,
            vocab_size=4096,
            max_position_embeddings=512,
            layer_types=["sliding_attention", "full_attention"] * 8,
            sliding_window=128,
            tie_word_embeddings=False,
        ),
    ),
    "mixtral-1b": (
        "mixtral",
        dict(
            hidden_size=1024,
            intermediate_size=1536,
            num_local_experts=8,
            num_experts_per_tok=2,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=4,
            vocab_size=4096,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        ),
    ),
    "llama-demo": (
        "llama",
        dict(
            hidden_size=512,
            intermediate_size=1024,
            num_hidden_layers=16,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=4096,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
        ),
    ),
}

_ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "bert": "BertModel",
}

_CORPUS = """\
Once upon a time there was a small model that did not fit in memory. It was served one layer
at a time, streamed from a chunk store, and it answered every request exactly as the full
model would have. The quick brown fox jumps over the lazy dog. Layer streaming trades memory
for bandwidth: a block is read just before it runs and released right after. Tokens stream
back to the client over server-sent events or gRPC, one event per token, while the next
block is already being read. Hidden states stream too, one event per layer. The weights are
checked against their sha256 before use, and a chunk that fails the check is an error, never
a wrong answer. 0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' " @ # $ % & _ ~
"""


def random_init_config(spec: str) -> PretrainedConfig:
    """A preset name, or a path to a config.json (a Hugging Face model config)."""
    if spec in PRESETS:
        model_type, kwargs = PRESETS[spec]
        config = AutoConfig.for_model(model_type, **kwargs)
    elif Path(spec).is_file():
        config = config_from_json(Path(spec).read_text(), spec)
    else:
        raise ValueError(
            f"--random-init {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config file"
        )
    if not getattr(config, "architectures", None):
        default = _ARCHITECTURES.get(config.model_type)
        if default is None:
            raise ValueError(f"{spec}: set 'architectures' in the config (e.g. ['BertModel'])")
        config.architectures = [default]
    return config


def build_tokenizer(config: PretrainedConfig) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the built-in text; its vocabulary fits the model's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    encoder_only = not _is_causal(config)
    specials = [PAD, UNK, CLS, SEP, MASK] if encoder_only else [PAD, BOS, EOS, UNK]
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    if encoder_only:
        cls_id, sep_id = tok.token_to_id(CLS), tok.token_to_id(SEP)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{CLS} $A {SEP}",
            pair=f"{CLS} $A {SEP} $B {SEP}",
            special_tokens=[(CLS, cls_id), (SEP, sep_id)],
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token=PAD,
            unk_token=UNK,
            cls_token=CLS,
            sep_token=SEP,
            mask_token=MASK,
        )
    else:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
        )
        fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = context_length(config) or 1024
    if fast.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer vocabulary {fast.vocab_size} > model's {config.vocab_size}")
    return fast


def _is_causal(config: PretrainedConfig) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or [])


def write_random_checkpoint(
    spec: str,
    dest: Path,
    seed: int = 0,
    weight_scale: float = 1.0,
    dtype: str | None = None,
    perturb: float = 0.0,
) -> Path:
    """Save a random-init model + tokenizer with ``save_pretrained``; return ``dest``.
    ``dtype`` ("bfloat16", ...): saved in that dtype, as released checkpoints are; by
    default the one the config declares (``"dtype"``), else float32.

    ``weight_scale`` multiplies every weight matrix (parameters named ``*weight`` with two
    or more dimensions; norms, biases and state-space constants keep their init): at
    transformers' default init the logits are nearly flat and greedy decoding repeats one
    or two tokens, which makes "same ids" a weak check; at 8 they vary from token to token.
    ``perturb`` adds that much Gaussian noise to every 1-D parameter: at the default init
    norms are exactly 1 and biases 0, values any dtype holds exactly, which hides a tensor
    kept in the wrong dtype.
    """
    config = random_init_config(spec)
    if dtype is None:  # the dtype the config declares, as a release's checkpoint holds it
        declared = str(getattr(config, "dtype", None) or "").removeprefix("torch.")
        dtype = declared if declared in TORCH_DTYPES else None
    tokenizer = build_tokenizer(config)
    # The built-in text yields fewer BPE merges than a big vocabulary asks for; shrink the
    # model's vocabulary to the tokenizer's so every id it generates decodes to text.
    config.vocab_size = min(config.vocab_size, len(tokenizer))
    for attr, token in (("pad_token_id", PAD), ("bos_token_id", BOS), ("eos_token_id", EOS)):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token in tokenizer.get_vocab():
            setattr(config, attr, token_id)
    cls = getattr(transformers, config.architectures[0])
    torch.manual_seed(seed)
    model = cls(config)
    if weight_scale != 1.0:
        with torch.no_grad():
            for name, param in model.named_parameters():  # a tied weight is listed once
                if name.endswith("weight") and param.ndim >= 2:
                    param.mul_(weight_scale)
    if perturb:
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim == 1 and param.is_floating_point():
                    param.add_(torch.randn_like(param) * perturb)
    if dtype is not None:
        model = model.to(TORCH_DTYPES[dtype])
        model.config.dtype = TORCH_DTYPES[dtype]
    log.info(
        "random-init %s: %.1fM parameters", spec, sum(p.numel() for p in model.parameters()) / 1e6
    )
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest
