"""Output constrained to a JSON schema (inference/constraints.py): every answer of a
random-init model parses and validates against its schema, whatever the schema's shape
(nested objects, enums, arrays, numbers, bounded strings), greedy and sampled."""

from __future__ import annotations

import json

import jsonschema
import pytest
from conftest import CONFIGS

from layerstream.chunker.convert import chunk_checkpoint
from layerstream.chunker.presets import write_random_checkpoint
from layerstream.engine.engine import Engine, EngineOptions
from layerstream.errors import InvalidRequest
from layerstream.inference.constraints import grammar
from layerstream.inference.generation import run_generation
from layerstream.inference.request import Request
from layerstream.inference.types import FinishReason
from layerstream.stores import open_store

IDS = [5, 17, 99, 3, 250, 7, 42, 130]
# bounded: a random-init model would spend its max_new_tokens inside an unbounded number or
# string (the answer then ends with finish_reason length, and is not whole JSON)
WORD = {"type": "string", "maxLength": 6}
SMALL = {"type": "integer", "minimum": -99, "maximum": 99}
SCHEMAS = [
    {
        "type": "object",
        "properties": {"name": WORD, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue"]},
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        },
        "required": ["colour", "ok", "tags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {"x": SMALL, "y": SMALL},
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "label": WORD,
        },
        "required": ["point", "label"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "items": {"type": "integer", "minimum": -9, "maximum": 9},
        "minItems": 1,
        "maxItems": 4,
    },
    {
        "type": "object",
        "properties": {
            "kind": {"const": "event"},
            "scores": {
                "type": "array",
                "items": {"type": "number", "enum": [0, 0.5, 1]},
                "maxItems": 2,
            },
        },
        "required": ["kind", "scores"],
        "additionalProperties": False,
    },
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    # what is tested is the grammar, not the blocks: the fixture llama cut to two of them
    # answers the same kind of text at a sixth of the compute (fifty answers take seconds)
    root = tmp_path_factory.mktemp("constraints")
    (root / "config.json").write_text(json.dumps(CONFIGS["llama"] | {"num_hidden_layers": 2}))
    source = write_random_checkpoint(str(root / "config.json"), root / "source")
    chunk_checkpoint(source, root / "chunks", "llama", progress=False)
    engine = Engine(open_store(str(root / "chunks")), EngineOptions("100%"))
    yield engine
    engine.close()


def answer(engine: Engine, schema: dict, seed: int | None) -> tuple[str, FinishReason]:
    sampled = {"do_sample": True, "temperature": 1.0, "seed": seed} if seed is not None else {}
    request = Request(
        mode="tokens",
        max_new_tokens=120,
        grammar=grammar(schema),
        **(sampled or {"do_sample": False}),
    )
    events: list = []
    final = run_generation(engine, request, IDS, events.append, lambda: False)
    return "".join(e.text for e in events) + final.text, final.finish_reason


def test_fifty_answers_validate_against_their_schemas(engine):
    valid = 0
    for k in range(50):
        schema = SCHEMAS[k % len(SCHEMAS)]
        text, reason = answer(engine, schema, seed=None if k < len(SCHEMAS) else k)
        jsonschema.validate(json.loads(text), schema)
        assert reason is FinishReason.STOP, (text, reason)
        valid += 1
    assert valid == 50


def test_an_unusable_schema_is_refused():
    with pytest.raises(InvalidRequest, match="cannot be used"):
        grammar({"type": "no-such-type"})
    with pytest.raises(InvalidRequest, match="must be a JSON object"):
        grammar(["not", "a", "schema"])
