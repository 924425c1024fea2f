"""Memory a request's sequence may take beside the weights: its KV cache, estimated per
token from the model's config, so that admission can keep the requests in flight within
the ``kv_cache_budget`` (serving/scheduler.py)."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from ..engine.sysinfo import available_memory
from ..errors import SettingsError
from ..units import format_size, parse_size
from .prompts import chat_bytes
from .request import Request
from .types import Mode

AUTO = "auto"
AUTO_CONTEXT = 4096  # tokens per sequence for "auto" when the model states no context
AUTO_MEMORY_SHARE = 4  # "auto" takes at most 1/4 of the memory available at load
PROMPT_SPECIALS = 16  # tokens a tokenizer may add to a text prompt (BOS, EOS, [CLS], ...)


def kv_bytes_per_token(config: PretrainedConfig, blocks: int, dtype: str) -> int:
    """Keys and values of one token in every block: 2 x blocks x KV heads x head size x
    the dtype's bytes (the hidden size where the config names no heads; for encoder-
    decoders every block is counted, an over-estimate)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None)
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or getattr(text, "d_kv", None)
    if head_dim is None and hidden and heads:
        head_dim = hidden // heads
    width = kv_heads * head_dim if kv_heads and head_dim else hidden
    if not width:
        raise SettingsError(
            f"cannot estimate the KV cache of a {type(config).__name__}: its config has no "
            "hidden_size or attention heads"
        )
    return 2 * blocks * int(width) * getattr(torch, dtype).itemsize


def request_tokens(request: Request, context: int | None, chat_overhead: int = 0) -> int:
    """What the request's sequence may grow to: its prompt plus the tokens it may generate.
    A text prompt is not tokenized yet (that happens on its worker thread): its UTF-8
    length plus a few special tokens bounds its token count; a chat's, its text plus
    ``chat_overhead`` bytes of template per message (prompts.chat_overhead). No sequence
    outgrows the context (a longer one is refused once tokenized)."""
    if request.input_ids is not None:
        prompt = len(request.input_ids)
    elif request.messages is not None:
        prompt = chat_bytes(request.messages, chat_overhead, request.tools) + PROMPT_SPECIALS
    else:
        assert request.prompt is not None  # the protocol sets one of the three
        prompt = len(request.prompt.encode()) + PROMPT_SPECIALS
    tokens = prompt + (request.max_new_tokens if request.mode is Mode.TOKENS else 0)
    return tokens if context is None else min(tokens, context)


def request_kv_bytes(
    request: Request, per_token: int, context: int | None, chat_overhead: int = 0
) -> int:
    """The KV cache the request's sequence may grow to (``request_tokens``)."""
    return request_tokens(request, context, chat_overhead) * per_token


def request_output_bytes(
    request: Request, hidden_size: int | None, context: int | None, chat_overhead: int = 0
) -> int:
    """What a hidden-states or embedding request's answer holds until its client has read it:
    float32 states of ``hidden_size`` per token, each selected state twice at most (as
    computed, and stacked for a unary answer), the last state and the embedding. Token
    answers are a few bytes per token: 0."""
    if request.mode is Mode.TOKENS or hidden_size is None:
        return 0
    states = 2 * len(request.layers) + 1
    return (states * request_tokens(request, context, chat_overhead) + 1) * hidden_size * 4


def resolve_kv_budget(spec: str, per_token: int, max_active: int, context: int | None) -> int:
    """``kv_cache_budget`` in bytes; "auto": ``max_active`` sequences of the full context,
    at most a quarter of the memory available now."""
    if spec == AUTO:
        full = full_kv_budget(per_token, max_active, context)
        return max(min(full, available_memory() // AUTO_MEMORY_SHARE), per_token)
    try:
        return parse_size(spec)
    except ValueError as exc:
        raise SettingsError(f"kv_cache_budget: {exc}") from exc


def full_kv_budget(per_token: int, max_active: int, context: int | None) -> int:
    """``max_active`` sequences of the full context: "auto" before its cap."""
    return max_active * (context or AUTO_CONTEXT) * per_token


def describe(nbytes: int, per_token: int) -> str:
    return f"{format_size(nbytes)} ({nbytes // max(per_token, 1)} tokens)"
