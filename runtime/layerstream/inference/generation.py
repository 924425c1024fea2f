"""Token generation: transformers' ``generate`` with a streamer that emits one event per token.

Text is decoded incrementally (a token that ends inside a multi-byte character adds no
text until the character is complete) and held back while it could be the start of a stop
string, so a stop string never reaches the client.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from ..engine.engine import Engine
from ..errors import ShuttingDown
from .constraints import GrammarDone, JsonConstraint
from .logprobs import ScoresSeen, token_logprobs, warp_here
from .request import Request
from .sampling import GiveRandomBack, RequestRandom, TakeRandom
from .types import Cancelled, Emit, FinalEvent, FinishReason, RequestStats, TokenEvent

# the most bytes a character takes in UTF-8
MAX_CHAR_BYTES = 4


class IncrementalDecoder:
    """Text deltas of a growing id sequence (the prefix-offset method of TGI/vLLM).

    Text that ends in U+FFFD is held back: it may be a character whose bytes have not all
    come. Bytes that never form a character (a random-init model's, a model's mistakes)
    end every text in U+FFFD, and all of it was held back to the end of the answer. So the
    text up to the last three tokens that add text is sent once it is a prefix of the whole
    text: a character is at most four bytes and each such token adds at least one, so what
    comes before them decodes the same whatever tokens follow."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self._adds_text: dict[int, bool] = {}  # token id -> whether it decodes to anything

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self.tokenizer is None:
            return ""
        return self._advance(final=False)

    def flush(self) -> str:
        """Text still held back at the end (an incomplete character decodes as U+FFFD, as
        ``tokenizer.decode`` shows it): the deltas then add up to the full decode."""
        if self.tokenizer is None or self.read_offset == len(self.ids):
            return ""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        """The text the ids after ``read_offset`` add; held back (``""``) while it ends in an
        incomplete character, unless this is the end."""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        text = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return self._settled(prefix, text)
        if not final and len(text) <= len(prefix):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix) :]

    def _settled(self, prefix: str, text: str) -> str:
        """The text before the last MAX_CHAR_BYTES - 1 tokens that add text, where it is a
        prefix of ``text`` (the class docstring says why it cannot change); else ``""``."""
        settled, adding = len(self.ids), 0
        while settled > self.read_offset and adding < MAX_CHAR_BYTES - 1:
            settled -= 1
            adding += self._adds(self.ids[settled])
        if adding < MAX_CHAR_BYTES - 1 or settled <= self.read_offset:
            return ""
        head = self.tokenizer.decode(
            self.ids[self.prefix_offset : settled], skip_special_tokens=True
        )
        if len(head) <= len(prefix) or not text.startswith(head):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, settled
        return head[len(prefix) :]

    def _adds(self, token_id: int) -> bool:
        known = self._adds_text.get(token_id)
        if known is None:
            known = bool(self.tokenizer.decode([token_id], skip_special_tokens=True))
            self._adds_text[token_id] = known
        return known


class StopMatcher:
    """Cuts the text at the first stop string; holds back a possible stop-string prefix."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.sent = ""
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        if not self.stops:
            return delta
        self.pending += delta
        full = self.sent + self.pending
        window = max(len(self.sent) - max(len(s) for s in self.stops), 0)
        hits = [i for i in (full.find(s, window) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(min(hits) - len(self.sent))
        hold = max(
            (n for s in self.stops for n in range(1, len(s)) if full.endswith(s[:n])), default=0
        )
        return self._release(len(self.pending) - hold)

    def _release(self, n: int) -> str:
        out, self.pending = self.pending[:n], self.pending[n:]
        self.sent += out
        return out

    def flush(self) -> str:
        if self.stopped:
            return ""
        return self._release(len(self.pending))


class _EventStreamer(BaseStreamer):
    """transformers calls put() with the prompt first, then with each new token."""

    def __init__(
        self,
        tokenizer,
        stops: list[str],
        emit: Emit,
        on_token: Callable[[], None] = lambda: None,
        scores: ScoresSeen | None = None,
        top_logprobs: int = 0,
    ):
        self.scores = scores  # the scores each token is chosen from, where logprobs are asked
        self.top_logprobs = top_logprobs
        self.decoder = IncrementalDecoder(tokenizer)
        self.matcher = StopMatcher(stops)
        self.emit = emit
        self.on_token = on_token  # counts the token in its sweep, for the metrics
        self.first_token_at: float | None = None
        self.tokens = 0
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if self.matcher.stopped:
            return  # generate may finish the step in which a stop string completed
        for token_id in value.reshape(-1).tolist():
            text = self.matcher.feed(self.decoder.add(token_id))
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self.tokens += 1
            self.on_token()
            if self.scores is None or self.scores.last is None:
                self.emit(TokenEvent(token_id=token_id, text=text))
                continue
            logprob, top = token_logprobs(self.scores.last[0], token_id, self.top_logprobs)
            self.emit(TokenEvent(token_id, text, logprob=logprob, top_logprobs=top))

    def end(self) -> None:
        pass


class _StopWhen(StoppingCriteria):
    def __init__(self, condition: Callable[[], bool]):
        self.condition = condition

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs
    ) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.condition(), dtype=torch.bool)


def generation_config(engine: Engine, request: Request) -> GenerationConfig:
    config = GenerationConfig.from_dict(engine.generation_config.to_dict())
    config.max_new_tokens = request.max_new_tokens
    config.max_length = None
    for name in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty"):
        value = getattr(request, name)
        if value is not None:
            setattr(config, name, value)
    restricts = (
        request.temperature is not None,
        request.top_p is not None and request.top_p < 1,
        request.top_k is not None and request.top_k > 0,
    )
    if request.do_sample is None and any(restricts):
        # a temperature, or a top_p / top_k that restricts, is a request to sample: on a
        # model whose generation config decodes greedily it would otherwise be ignored, and
        # read as honoured; top_p 1 and top_k 0 ask for nothing (OpenAI clients send top_p 1)
        config.do_sample = True
    if config.pad_token_id is None and config.eos_token_id is not None:
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return config


def run_generation(
    engine: Engine,
    request: Request,
    input_ids: list[int],
    emit: Emit,
    cancelled: Cancelled,
) -> FinalEvent:
    """Generate on the request's worker thread, emitting a TokenEvent per token; return the
    last event."""
    config = generation_config(engine, request)
    ids = torch.tensor([input_ids], dtype=torch.long)
    processors = LogitsProcessorList()
    criteria = StoppingCriteriaList()
    random = RequestRandom(request.seed)
    if config.do_sample:
        processors.append(TakeRandom(random))
        criteria.append(GiveRandomBack(random))
    constraint = None
    if request.grammar is not None:
        constraint = JsonConstraint(
            request.grammar, engine.tokenizer, config.eos_token_id, len(input_ids)
        )
        processors.append(constraint)
        criteria.append(GrammarDone(constraint))
    scores = None
    if request.logprobs is not None:
        config = warp_here(config, processors)
        scores = ScoresSeen()
        processors.append(scores)
    streamer = None
    try:
        with engine.request(cancelled) as ctx, random.around():
            rider = ctx.rider
            streamer = _EventStreamer(
                engine.tokenizer,
                request.stop,
                emit,
                lambda: engine.sweeps.note_token(rider),
                scores,
                request.logprobs or 0,
            )
            criteria.append(_StopWhen(lambda: streamer.matcher.stopped or cancelled()))
            output = engine.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                generation_config=config,
                streamer=streamer,
                logits_processor=processors,
                stopping_criteria=criteria,
            )
    except ShuttingDown:
        if streamer is None:  # stopped before it began: nothing to end
            raise
        # the server's drain is over: the tokens sent stand, and the final event says why
        # (unless a stop string had ended it already)
        ending = generation_end(streamer, [], set())
        if ending.finish_reason is FinishReason.LENGTH:
            ending = Ending(FinishReason.SHUTDOWN, ending.text)
    else:
        eos = config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        ending = generation_end(streamer, output[0, ids.shape[1] :].tolist(), eos_ids)
        if constraint is not None and constraint.done():  # the grammar is complete
            ending = Ending(FinishReason.STOP, ending.text)
    stats = RequestStats.measure(ctx, len(input_ids), streamer.tokens, streamer.first_token_at)
    return FinalEvent(finish_reason=ending.finish_reason, stats=stats, text=ending.text)


@dataclass(frozen=True)
class Ending:
    """How generation ended: why, and the text held back until then."""

    finish_reason: FinishReason
    text: str


def generation_end(streamer: _EventStreamer, new_ids: list[int], eos_ids: set[int]) -> Ending:
    """The text still held back, and why generation ended: the final event's content."""
    # the held-back text may complete a stop string too: flushed before the reason is read
    tail = "" if streamer.matcher.stopped else streamer.matcher.feed(streamer.decoder.flush())
    ended = streamer.matcher.stopped or (bool(new_ids) and new_ids[-1] in eos_ids)
    reason = FinishReason.STOP if ended else FinishReason.LENGTH
    return Ending(finish_reason=reason, text=tail + streamer.matcher.flush())
