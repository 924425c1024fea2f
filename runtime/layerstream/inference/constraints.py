"""Output constrained to a JSON schema, with llguidance (MIT, no dependencies of its own).

Before each token is chosen, a logits processor sets the score of every token the grammar
does not allow next to minus infinity (llguidance computes the allowed set as a bitmask in
microseconds); a stopping criterion ends the generation once the grammar is complete. The
processor comes before transformers' sampling warpers, so temperature, top-k and top-p act
on the allowed tokens only. Each request has its own matcher; the tokenizer's llguidance
view is built once per tokenizer.

JSON is generated compactly (no whitespace between tokens of the grammar): the model is not
given room to wander in whitespace, and the output is what ``json.dumps(...,
separators=(",", ":"))`` would print.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria

from ..errors import InvalidRequest

# llguidance's own options, in the schema: compact output
_COMPACT = {"whitespace_flexible": False}
ANY_OBJECT: dict[str, Any] = {"type": "object"}

_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def grammar(schema: dict[str, Any]) -> str:
    """The llguidance grammar of ``schema``; InvalidRequest naming what is wrong with it."""
    import llguidance

    if not isinstance(schema, dict):
        raise InvalidRequest("a JSON schema must be a JSON object")
    compiled = llguidance.LLMatcher.grammar_from_json_schema({**schema, "x-guidance": _COMPACT})
    error = llguidance.LLMatcher.validate_grammar(compiled)
    if error:
        raise InvalidRequest(f"the JSON schema cannot be used: {error}")
    return compiled


def _llg_tokenizer(tokenizer: Any, eos: int | list[int] | None) -> Any:
    import llguidance.hf

    with _LOCK:
        known = _TOKENIZERS.get(tokenizer)
        if known is None:
            known = llguidance.hf.from_tokenizer(tokenizer, eos_token=eos)
            _TOKENIZERS[tokenizer] = known
        return known


class JsonConstraint(LogitsProcessor):
    """Masks the scores of the tokens the grammar does not allow next (one request's)."""

    def __init__(self, compiled: str, tokenizer: Any, eos: int | list[int] | None, prompt: int):
        import llguidance
        import llguidance.torch

        self._torch = llguidance.torch
        self.matcher = llguidance.LLMatcher(_llg_tokenizer(tokenizer, eos), compiled)
        self.prompt = prompt  # prompt length: the ids after it are the generated ones
        self.consumed = 0
        self.mask = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.catch_up(input_ids)
        if self.mask is None:
            self.mask = self._torch.allocate_token_bitmask(1, scores.shape[-1])
        self._torch.fill_next_token_bitmask(self.matcher, self.mask, 0)
        self._torch.apply_token_bitmask_inplace(scores, self.mask)
        return scores

    def catch_up(self, input_ids: torch.LongTensor) -> None:
        """Give the matcher the generated tokens it has not seen."""
        for token in input_ids[0, self.prompt + self.consumed :].tolist():
            if not self.matcher.consume_token(token):
                error = self.matcher.get_error()
                raise RuntimeError(f"the grammar refused a token its mask allowed: {error}")
            self.consumed += 1

    def done(self) -> bool:
        """Whether the grammar is complete (or can take nothing more)."""
        return self.matcher.is_stopped()


class GrammarDone(StoppingCriteria):
    """Ends the generation once the last chosen token completed the grammar."""

    def __init__(self, constraint: JsonConstraint):
        self.constraint = constraint

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs
    ) -> torch.BoolTensor:
        # the token just chosen, which the processor would only see at the next step
        self.constraint.catch_up(input_ids)
        done = self.constraint.done()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool)
