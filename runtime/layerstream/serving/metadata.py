"""The model's metadata (``GET /v2/models/{name}``, gRPC ``ModelMetadata``), from the loaded
model itself.

Generic V2 clients discover a model's inputs, outputs and parameters here. They are declared
at load from what the model can do, not read from model-settings.json: an orchestrator that
rewrites that file (Seldon's agent does) drops them, and a hand-written list can disagree
with the model. Parameters are ints and strings only (gRPC's InferParameter has no float or
list): lists travel as comma-separated strings.
"""

from __future__ import annotations

from mlserver.types import MetadataModelResponse, MetadataTensor, Parameters

from ..inference.request import ModelCapabilities
from ..inference.types import Mode
from .inputs import INPUT_IDS, MESSAGES, PROMPT
from .outputs import OUTPUTS
from .parameters import KNOWN_PARAMETERS

VARIABLE = -1  # a dimension whose size each request decides


def model_metadata(
    name: str,
    versions: list[str] | None,
    platform: str,
    caps: ModelCapabilities,
    dtype: str,
    architecture: str,
    max_new_tokens_limit: int,
    max_prompt_bytes: int | None,
    stored_format: str | None = None,
    pinned: tuple[int, int] = (0, 0),
) -> MetadataModelResponse:
    """What a client needs to call the model: its inputs (the prompt only where it has a
    tokenizer, messages only where that has a chat template), the outputs of the modes it
    serves, and the model's limits."""
    params: dict[str, int | str] = {
        "modes": ",".join(caps.modes),
        "default_mode": caps.default_mode.value,
        "request_parameters": ",".join(KNOWN_PARAMETERS),
        "architecture": architecture,
        "dtype": dtype,
        # how the store holds the weights a token reads: the dtype, or a quantized format
        "stored_format": stored_format or dtype,
        "vocab_size": caps.vocab_size,
        "max_new_tokens_limit": max_new_tokens_limit,
        # the bytes of the blocks the budget pins in memory now, and once the fill is done
        "pinned_bytes": pinned[0],
        "pinned_bytes_target": pinned[1],
    }
    if Mode.HIDDEN_STATES in caps.modes:
        params["hidden_state_layers"] = caps.num_layers + 1  # indexes 0..num_layers
    elif caps.hidden_states_unavailable is not None:
        params["hidden_states_unavailable"] = caps.hidden_states_unavailable
    if caps.context_length is not None:
        params["context_length"] = caps.context_length
    if caps.hidden_size is not None:
        params["hidden_size"] = caps.hidden_size
    if max_prompt_bytes is not None:
        params["max_prompt_bytes"] = max_prompt_bytes
    return MetadataModelResponse(
        name=name,
        versions=versions,
        platform=platform,
        inputs=_inputs(caps),
        outputs=_outputs(caps),
        parameters=Parameters(**params),
    )


def _tensor(name: str, datatype: str, shape: list[int], **params: int | str) -> MetadataTensor:
    return MetadataTensor(
        name=name, datatype=datatype, shape=shape, parameters=Parameters(**params)
    )


def _inputs(caps: ModelCapabilities) -> list[MetadataTensor]:
    inputs = []
    if caps.has_tokenizer:
        inputs.append(
            _tensor(PROMPT, "BYTES", [1], content_type="str", description="the prompt, UTF-8")
        )
    if caps.has_chat_template:
        inputs.append(
            _tensor(
                MESSAGES,
                "BYTES",
                [1],
                content_type="str",
                description='a chat as one JSON string: [{"role": "user", "content": "..."}], '
                "rendered with the model's chat template",
            )
        )
    inputs.append(
        _tensor(
            INPUT_IDS,
            "INT64",
            [VARIABLE],
            description=f"token ids, 0..{caps.vocab_size - 1}",
        )
    )
    return inputs


def _outputs(caps: ModelCapabilities) -> list[MetadataTensor]:
    sizes = {"1": 1, "hidden": caps.hidden_size or VARIABLE}
    return [
        _tensor(
            spec.name,
            spec.datatype,
            [sizes.get(dimension, VARIABLE) for dimension in spec.shape],
            modes=",".join(m for m in spec.modes if m in caps.modes),
            calls=",".join(spec.calls),
            description=spec.description,
        )
        for spec in OUTPUTS
        if any(m in caps.modes for m in spec.modes)
    ]
