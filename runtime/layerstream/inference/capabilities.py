"""What a loaded model can do, as the request contract sees it: its modes, vocabulary,
context length and hidden-state indexes."""

from __future__ import annotations

import logging

from ..engine.engine import Engine
from ..engine.skeleton import context_length
from .layout import LayoutUnknown, hidden_layout
from .request import ModelCapabilities
from .types import Mode

log = logging.getLogger(__name__)


def capabilities(engine: Engine) -> ModelCapabilities:
    """The model's contract. Learning the hidden-state layout runs the model once on the
    meta device (no I/O, no memory; see docs/design-notes-serving.md), so call this off the
    event loop."""
    model = engine.model
    modes = [Mode.TOKENS] if model.can_generate() else []
    num_layers = 0
    unavailable = None
    # the base model maps ids to states, unless it is an encoder-decoder (it wants decoder
    # ids too); its blocks may lie in several lists (Funnel: one per stage)
    if not getattr(model.config, "is_encoder_decoder", False):
        try:
            # hidden states 0..num_layers, numbered as transformers' output_hidden_states
            num_layers = hidden_layout(engine).count - 1
            modes.append(Mode.HIDDEN_STATES)
        except LayoutUnknown as exc:
            unavailable = f"its hidden-state layout could not be learned: {exc}"
            log.warning(
                "%s (%s) serves no hidden_states mode: %s",
                engine.manifest.name,
                engine.manifest.architecture,
                str(exc),  # a log record keeps its arguments
            )
        modes.append(Mode.EMBEDDING)
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelCapabilities(
        modes=tuple(modes),
        default_mode=Mode.TOKENS if Mode.TOKENS in modes else Mode.EMBEDDING,
        vocab_size=int(text_config.vocab_size),
        context_length=context_length(config),
        num_layers=num_layers,
        has_pooler=getattr(model.base_model, "pooler", None) is not None,
        has_tokenizer=engine.tokenizer is not None,
        has_chat_template=bool(getattr(engine.tokenizer, "chat_template", None)),
        hidden_size=getattr(text_config, "hidden_size", None),
        hidden_states_unavailable=unavailable,
    )
