"""The model's outputs: what each is, which requests produce it, and which a request asked for.

A V2 request may list the outputs it wants (``"outputs": [{"name": "text"}]``); only those
come back, and a name the model does not have is an error that lists the ones it has (a
typo would otherwise read as "the model produced nothing"). With no list, each event carries
its defaults. The final event of a stream carries every wanted output too, empty where the
request ended without more of it (a client that decodes ``outputs[0]`` of every event, as
MLServer's own streaming example does, never meets an event without outputs).

Output parameters that only choose the transport encoding (``binary_data``, from the
binary tensor extension tritonclient speaks) are accepted: MLServer answers in JSON, which
tritonclient reads as well.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlserver.types import InferenceRequest

from ..errors import InvalidRequest
from ..inference.types import Mode

STREAM, UNARY = "stream", "unary"  # the two calls: generate_stream/ModelStreamInfer, infer
# output parameters that choose an encoding, not a content
TRANSPORT_OUTPUT_PARAMETERS = ("binary_data",)


@dataclass(frozen=True)
class OutputSpec:
    name: str
    datatype: str
    shape: tuple[str, ...]  # dimension names, for the metadata: "1", "tokens", "hidden", ...
    modes: tuple[Mode, ...]
    calls: tuple[str, ...]
    description: str


OUTPUTS: tuple[OutputSpec, ...] = (
    OutputSpec(
        "text",
        "BYTES",
        ("1",),
        (Mode.TOKENS,),
        (STREAM, UNARY),
        "decoded text: of one token (stream), held back until the end (the final event), "
        "or all of it (infer)",
    ),
    OutputSpec("token_id", "INT64", ("1",), (Mode.TOKENS,), (STREAM,), "the generated token"),
    OutputSpec("token_ids", "INT64", ("tokens",), (Mode.TOKENS,), (UNARY,), "all generated ids"),
    OutputSpec(
        "hidden_state",
        "FP32",
        ("prompt_tokens", "hidden"),
        (Mode.HIDDEN_STATES,),
        (STREAM,),
        "one layer's hidden states (the layer is the event's 'layer' parameter)",
    ),
    OutputSpec(
        "hidden_states",
        "FP32",
        ("layers", "prompt_tokens", "hidden"),
        (Mode.HIDDEN_STATES,),
        (UNARY,),
        "the requested layers' hidden states, stacked (parameter 'layers' names them)",
    ),
    OutputSpec(
        "embedding",
        "FP32",
        ("hidden",),
        (Mode.HIDDEN_STATES, Mode.EMBEDDING),
        (STREAM, UNARY),
        "the pooled last hidden state (the final event)",
    ),
)
BY_NAME = {spec.name: spec for spec in OUTPUTS}
# the output of a stream's error event: the error, so a client that decodes outputs[0]
# shows it (its kind and message are parameters too)
ERROR_OUTPUT = "error"


def produced(mode: Mode, call: str) -> tuple[str, ...]:
    """The outputs a request of ``mode`` produces on ``call``, in their order."""
    return tuple(s.name for s in OUTPUTS if mode in s.modes and call in s.calls)


def requested_outputs(payload: InferenceRequest, mode: Mode, call: str) -> tuple[str, ...] | None:
    """The outputs the request asked for (None: it asked for none, so the defaults), each
    one this request produces."""
    if not payload.outputs:
        return None
    names: list[str] = []
    for item in payload.outputs:
        name = item.name
        if name not in BY_NAME:
            raise InvalidRequest(
                f"unknown output {name!r}; this model's outputs are "
                f"{', '.join(produced(mode, call))} for this request ({mode.value}, {call}); "
                "ask for those, or for none (all of them)"
            )
        if name not in produced(mode, call):
            raise InvalidRequest(
                f"output {name!r} is not produced by a {mode.value} request on {call} (it is "
                f"for {', '.join(BY_NAME[name].modes)} on {', '.join(BY_NAME[name].calls)}); "
                f"this request produces {', '.join(produced(mode, call))}"
            )
        extra = sorted(set(item.parameters.model_extra or {}) if item.parameters else ())
        unknown = [p for p in extra if p not in TRANSPORT_OUTPUT_PARAMETERS]
        if unknown:
            raise InvalidRequest(
                f"output {name!r} has unknown parameter(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(TRANSPORT_OUTPUT_PARAMETERS)}"
            )
        if name in names:
            raise InvalidRequest(f"output {name!r} is asked for twice")
        names.append(name)
    return tuple(names)
