"""What a loaded model can do, as the request contract sees it: its modes, vocabulary,
context length and hidden-state indexes."""

from __future__ import annotations

from .engine import Engine
from .protocol import ModelCapabilities
from .skeleton import context_length


def capabilities(engine: Engine) -> ModelCapabilities:
    model = engine.model
    modes = ["tokens"] if model.can_generate() else []
    block_lists = {prefix.rsplit(".", 1)[0] for prefix in engine.prefixes}
    if len(block_lists) == 1:  # one stack of blocks: hidden state k is well defined
        modes += ["hidden_states", "embedding"]
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelCapabilities(
        modes=tuple(modes),
        default_mode="tokens" if "tokens" in modes else "embedding",
        vocab_size=int(text_config.vocab_size),
        context_length=context_length(config),
        num_layers=len(engine.prefixes),
        has_pooler=getattr(model.base_model, "pooler", None) is not None,
        has_tokenizer=engine.tokenizer is not None,
    )
