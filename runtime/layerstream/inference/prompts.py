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

import logging
from dataclasses import dataclass

import jinja2

from ..errors import InvalidRequest

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


def chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The ids of a chat rendered with the model's own template, the assistant's turn
    opened (``add_generation_prompt``). Control tokens typed into a message
    (``<|im_start|>``, ...) are encoded as the text they are, never as the tokens that
    would forge a turn (transformers' ``sanitize_control_tokens``)."""
    try:
        ids = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
            sanitize_control_tokens=True,
        )
    except jinja2.TemplateError as exc:
        # templates refuse what they cannot render with raise_exception(...)
        raise InvalidRequest(f"the model's chat template refused these messages: {exc}") from None
    if not ids:
        raise InvalidRequest("the chat renders to no tokens")
    return list(ids)
