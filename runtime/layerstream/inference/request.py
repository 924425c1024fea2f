"""What a request asks for and what the loaded model can do, independent of MLServer.

serving/protocol.py builds a ``Request`` from V2 inputs and parameters; inference/run.py
runs it. ``check_context`` is the one check both sides need: the protocol applies it to
ids as they arrive (a request that cannot fit never queues), run.py to every request once
its prompt is tokenized.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidRequest
from .types import Mode, Pooling


@dataclass(frozen=True)
class ModelCapabilities:
    modes: tuple[Mode, ...]
    default_mode: Mode
    vocab_size: int
    context_length: int | None
    num_layers: int  # hidden-state indexes run 0..num_layers
    has_pooler: bool = False
    has_tokenizer: bool = True
    has_chat_template: bool = False  # the tokenizer has one: the ``messages`` input works
    hidden_size: int | None = None  # the width of hidden states and embeddings
    # why a model with one stack of blocks serves no hidden_states mode (its layout is unknown)
    hidden_states_unavailable: str | None = None

    def __post_init__(self) -> None:
        # callers outside capabilities.py (tests, benchmarks) may pass the wire words
        object.__setattr__(self, "modes", tuple(Mode(m) for m in self.modes))
        object.__setattr__(self, "default_mode", Mode(self.default_mode))


@dataclass
class Request:
    mode: Mode
    prompt: str | None = None
    # a chat, rendered with the model's chat template and tokenized on the worker thread
    messages: list[dict[str, str]] | None = None
    input_ids: list[int] | None = None
    max_new_tokens: int = 64
    max_new_tokens_sent: bool = True  # False: the default_max_new_tokens setting's
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    do_sample: bool | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    # log probabilities of each token and of its ``logprobs`` most likely alternatives (None:
    # not asked for); set by the OpenAI routes, not a V2 parameter
    logprobs: int | None = None
    # an llguidance grammar (constraints.py) the output must follow; set by the OpenAI routes
    grammar: str | None = None
    # the tools a chat's template renders (OpenAI's ``tools``); set by the OpenAI routes
    tools: list[dict] | None = None
    stop: list[str] = field(default_factory=list)
    # normalised into 0..num_layers, in the request's order and count
    layers: list[int] = field(default_factory=list)
    pooling: Pooling = Pooling.MEAN
    timeout_us: int | None = None  # the request's own deadline, microseconds from arrival

    def __post_init__(self) -> None:
        # callers outside the protocol (tests, benchmarks) may pass the wire words
        self.mode = Mode(self.mode)
        self.pooling = Pooling(self.pooling)


def check_context(n_prompt: int, request: Request, caps: ModelCapabilities) -> None:
    """A prompt (plus the tokens to generate) must fit the model's context."""
    if caps.context_length is None:
        return
    generates = request.mode is Mode.TOKENS
    needed = n_prompt + (request.max_new_tokens if generates else 0)
    if needed > caps.context_length:
        extra = f" + max_new_tokens {request.max_new_tokens}" if generates else ""
        fix = "lower max_new_tokens"
        if generates and not request.max_new_tokens_sent:
            extra += " (the default: the request sent none)"
            fix = "send a lower max_new_tokens"
        raise InvalidRequest(
            f"prompt of {n_prompt} tokens{extra} exceeds the model's context of "
            f"{caps.context_length} tokens; shorten the prompt or {fix}"
        )


@dataclass(frozen=True)
class Extras:
    """What an OpenAI request asks beyond what V2 parameters say (the OpenAI routes set it
    on the request they make): log probabilities, a grammar, tools for the template."""

    logprobs: int | None = None
    grammar: str | None = None
    tools: list[dict] | None = None

    def apply(self, request: Request) -> None:
        if self == Extras():
            return
        if request.mode is not Mode.TOKENS:
            raise InvalidRequest("log probabilities, schemas and tools are for generated tokens")
        if self.tools is not None and request.messages is None:
            raise InvalidRequest("tools are rendered into a chat: send messages")
        request.logprobs, request.grammar, request.tools = self.logprobs, self.grammar, self.tools
