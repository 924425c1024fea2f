"""Log probabilities of generated tokens, from the very scores each token was chosen from.

transformers' ``generate`` applies the caller's logits processors, then (when it samples) its
own warpers (temperature, top-k, top-p, ...), then picks the token from the result. A
processor of the caller's therefore sees the scores before the warpers. To see the scores
the token is chosen from, a request that asks for log probabilities gets the warpers built
here, in transformers' order, as processors of its own, its generation config's warpers set
to values that add none, and a last processor that keeps the scores: the same scores in the
same order, so the same tokens, and each token's log probability is ``log_softmax`` of the
scores it was drawn from.
"""

from __future__ import annotations

import copy

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitNormalization,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from ..errors import InvalidRequest

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs


class ScoresSeen(LogitsProcessor):
    """The last processor: keeps the scores the next token is chosen from."""

    def __init__(self) -> None:
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.last = scores
        return scores


def warp_here(config: GenerationConfig, processors: LogitsProcessorList) -> GenerationConfig:
    """Append to ``processors`` what transformers would append after them (its warpers when it
    samples, the final normalization), in its order; return ``config`` with those set so that
    transformers adds none."""
    if config.watermarking_config is not None:
        raise InvalidRequest("log probabilities are not served for a watermarking model")
    config = copy.deepcopy(config)
    if config.do_sample:
        keep = 1  # one sequence per request, no beams
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_h is not None:
            processors.append(TopHLogitsWarper(top_h=config.top_h))
        if config.top_k is not None and config.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=keep))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=keep))
        if config.min_p is not None:
            processors.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=keep))
        if config.typical_p is not None and config.typical_p < 1.0:
            processors.append(TypicalLogitsWarper(mass=config.typical_p, min_tokens_to_keep=keep))
        if config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0:
            processors.append(
                EpsilonLogitsWarper(epsilon=config.epsilon_cutoff, min_tokens_to_keep=keep)
            )
        if config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0:
            processors.append(
                EtaLogitsWarper(epsilon=config.eta_cutoff, min_tokens_to_keep=keep, device="cpu")
            )
        config.temperature, config.top_k, config.top_p = 1.0, 0, 1.0
        config.top_h = config.min_p = None
        config.typical_p, config.epsilon_cutoff, config.eta_cutoff = 1.0, 0.0, 0.0
    if config.renormalize_logits:
        processors.append(LogitNormalization())
        config.renormalize_logits = False
    return config


def token_logprobs(
    scores: torch.Tensor, token_id: int, top: int
) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The log probability of ``token_id`` under ``scores`` (one row), and the ``top`` most
    likely tokens' (most likely first)."""
    logprobs = torch.log_softmax(scores.float(), dim=-1)
    best: tuple[tuple[int, float], ...] = ()
    if top:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
        best = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return float(logprobs[token_id]), best
