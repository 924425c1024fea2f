"""How long a prompt may be before anything tokenizes it, and tokenizing it (a chat with the
model's own template).

Tokenizing costs memory in proportion to the text (the tokenizer's encoding keeps offsets,
words and masks per token) and the allocator keeps much of it, so a prompt too long for the
model must be refused before it is tokenized (docs/design-notes-serving.md has the
numbers). The prompt's UTF-8 size is checked first (inputs.py), against a limit computed
once at load:

    context length x the longest token of the vocabulary, in UTF-8 bytes (+ one token)

Every token stands for at most that many bytes of text, so a prompt over the limit needs
more tokens than the context holds. That reasoning assumes the tokens cover the text, true
for byte-level BPE and SentencePiece; a tokenizer that drops text (a normalizer deleting
characters, WordPiece's one [UNK] for a whole over-long word) could fit a longer prompt,
which the limit refuses: the ``max_prompt_bytes`` setting overrides it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import jinja2

from ..errors import InvalidRequest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

NO_CONTEXT_LIMIT = 1 << 20  # bytes, for a model that declares no context length


def longest_token_bytes(tokenizer) -> int:
    """The UTF-8 size of the longest vocabulary entry, as the vocabulary spells it (byte-level
    and SentencePiece markers count, so this over-estimates: the limit errs on the long side)."""
    vocab = tokenizer.get_vocab()
    if not vocab:
        raise ValueError("the tokenizer has an empty vocabulary")
    return max(len(token.encode("utf-8", "surrogatepass")) for token in vocab)


@dataclass(frozen=True)
class PromptLimit:
    """The most UTF-8 bytes a prompt may have, and why, for the error that refuses one."""

    max_bytes: int
    reason: str


def prompt_byte_limit(
    tokenizer, context_length: int | None, setting: int | str
) -> PromptLimit | None:
    """The prompt limit of a model (None when it has no tokenizer: prompts are refused)."""
    if setting != "auto":
        return PromptLimit(int(setting), "the max_prompt_bytes setting")
    if tokenizer is None:
        return None
    if context_length is None:
        return PromptLimit(
            NO_CONTEXT_LIMIT, "max_prompt_bytes 'auto' for a model without a context length"
        )
    longest = longest_token_bytes(tokenizer)
    limit = PromptLimit(
        (context_length + 1) * longest,
        f"a context of {context_length} tokens, none longer than {longest} bytes; "
        "the max_prompt_bytes setting overrides it",
    )
    log.info("prompts over %d bytes are refused unread (%s)", limit.max_bytes, limit.reason)
    return limit


def tokenize(tokenizer, prompt: str) -> list[int]:
    """The prompt's ids, as the model's tokenizer gives them (special tokens included)."""
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise InvalidRequest("the prompt tokenizes to nothing")
    return ids


# probe chats for chat_overhead: one to three turns, in the orders templates accept
_PROBES = (
    ("user",),
    ("system", "user"),
    ("user", "assistant", "user"),
    ("system", "user", "assistant", "user"),
)
FALLBACK_CHAT_OVERHEAD = 4096  # bytes per message, where no probe renders


def chat_overhead(tokenizer: PreTrainedTokenizerBase) -> int:
    """What the model's chat template adds around a chat, per message, in UTF-8 bytes: an
    upper bound that a chat's KV estimate adds to its text before it is tokenized (on its
    worker thread, as prompts are). Measured on empty probe chats, the fixed part (BOS, a
    default system prompt, the generation prompt) counted in full for every message."""
    per_message = 0
    for roles in _PROBES:
        chat = [{"role": role, "content": ""} for role in roles]
        try:
            text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        except (jinja2.TemplateError, ValueError, TypeError):
            continue  # a template that refuses this order of turns
        per_message = max(per_message, -(-len(str(text).encode("utf-8")) // len(roles)))
    if not per_message:
        log.warning(
            "the chat template renders none of the probe chats; each message of a chat is "
            "counted as %d bytes of template in its KV estimate",
            FALLBACK_CHAT_OVERHEAD,
        )
        return FALLBACK_CHAT_OVERHEAD
    return per_message


def chat_bytes(messages: list[dict], overhead: int, tools: list[dict] | None = None) -> int:
    """A bound on the UTF-8 size of ``messages`` rendered: their text (a turn's tool calls
    and the tools as JSON) plus the template's ``overhead`` per message (chat_overhead)."""
    text = 0
    for m in messages:
        text += len(m["content"].encode()) + len(m.get("name", "").encode())
        text += len(m.get("tool_call_id", "").encode())
        if "tool_calls" in m:
            text += len(json.dumps(m["tool_calls"], ensure_ascii=False).encode())
    if tools:
        text += len(json.dumps(tools, ensure_ascii=False).encode())
    return text + overhead * len(messages)


def chat_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict] | None = None
) -> list[int]:
    """The ids of a chat rendered with the model's own template, the assistant's turn
    opened (``add_generation_prompt``). Control tokens typed into a message
    (``<|im_start|>``, ...) are encoded as the text they are, never as the tokens that
    would forge a turn (transformers' ``sanitize_control_tokens``)."""
    try:
        ids = tokenizer.apply_chat_template(
            messages,
            tools=tools,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
            sanitize_control_tokens=True,
        )
    except jinja2.TemplateError as exc:
        # templates refuse what they cannot render with raise_exception(...)
        raise InvalidRequest(f"the model's chat template refused these messages: {exc}") from None
    except ValueError as exc:
        # transformers' own refusals of a conversation, e.g. a control token in a message
        # that the tokenizer also produces from plain text, so it cannot be kept as text
        raise InvalidRequest(f"the chat cannot be rendered: {exc}") from None
    if not ids:
        raise InvalidRequest("the chat renders to no tokens")
    return list(ids)
