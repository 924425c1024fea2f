"""Tools: declared to the model through its chat template, called in its answer.

The ``tools`` go to the model's chat template (``apply_chat_template(tools=...)``), the way
the model was trained to read them. What ``tool_choice`` does:

- ``"required"``, or a named tool: the answer is held to a call by a grammar (the JSON
  ``{"name": ..., "arguments": {...}}`` of one declared tool, its arguments valid against
  the tool's ``parameters``): it is always a call;
- ``"auto"`` (the default with tools): the model answers freely; an answer that is one such
  JSON object naming a declared tool, with valid arguments (alone, or inside
  ``<tool_call>...</tool_call>`` as Hermes-style templates ask), is returned as a call, any
  other answer as text. A model whose template does not show it the tools will rarely call
  one: ``required`` or a named tool do not depend on it;
- ``"none"``: the answer is text.

A call is returned as OpenAI's ``tool_calls`` (``finish_reason`` ``tool_calls``), its
``arguments`` a JSON string.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ...errors import InvalidRequest
from ...inference.constraints import grammar
from ..parameters import show
from .errors import invalid

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_WRAPPED = re.compile(r"^\s*<tool_call>\s*(.*?)\s*</tool_call>\s*$", re.DOTALL)


@dataclass(frozen=True)
class Tools:
    declared: list[dict[str, Any]]  # OpenAI's tools, as the template reads them
    choice: str  # "auto", "none", "required", or the name of the tool that must be called
    grammar: str | None  # the grammar of a call, where one must be made

    @property
    def must_call(self) -> bool:
        return self.grammar is not None

    def parameters(self, name: str) -> dict[str, Any] | None:
        for tool in self.declared:
            if tool["function"]["name"] == name:
                return tool["function"].get("parameters", {"type": "object"})
        return None


def parse_tools(body: dict[str, Any]) -> Tools | None:
    """The request's ``tools`` and ``tool_choice``, checked (a 400 names the field)."""
    declared, choice = body.get("tools"), body.get("tool_choice")
    if declared is None or declared == []:
        if choice not in (None, "none"):
            raise invalid(f"tool_choice {show(choice)} needs tools", "tool_choice")
        return None
    if not isinstance(declared, list):
        raise invalid("tools must be a list of {'type': 'function', 'function': {...}}", "tools")
    tools = [_tool(i, tool) for i, tool in enumerate(declared)]
    names = [tool["function"]["name"] for tool in tools]
    if len(set(names)) != len(names):
        raise invalid("two tools have one name", "tools")
    choice = "auto" if choice is None else choice
    if isinstance(choice, dict):
        function = choice.get("function") if choice.get("type") == "function" else None
        named = function.get("name") if isinstance(function, dict) else None
        if named not in names:
            raise invalid(
                f"tool_choice {show(choice)} must name one of the tools ({', '.join(names)})",
                "tool_choice",
            )
        choice = named
    elif choice not in ("auto", "none", "required"):
        raise invalid(
            f"tool_choice must be auto, none, required or a named tool, got {show(choice)}",
            "tool_choice",
        )
    called = names if choice == "required" else [] if choice in ("auto", "none") else [choice]
    compiled = None
    if called:
        calls = [_call_schema(tool) for tool in tools if tool["function"]["name"] in called]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        try:
            compiled = grammar(schema)
        except InvalidRequest as error:
            raise invalid(error.message, "tools") from None
    return Tools(declared=tools, choice=choice, grammar=compiled)


def _tool(index: int, tool: Any) -> dict[str, Any]:
    where = f"tools[{index}]"
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or tool.get("type") != "function":
        raise invalid(f"{where} must be like {{'type': 'function', 'function': {{...}}}}", "tools")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise invalid(f"{where}.function.name must be 1 to 64 of a-z A-Z 0-9 _ -", "tools")
    unknown = set(function) - {"name", "description", "parameters", "strict"}
    if unknown:
        raise invalid(f"{where}.function has unknown key(s) {sorted(unknown)}", "tools")
    parameters = function.get("parameters", {"type": "object"})
    if not isinstance(parameters, dict):
        raise invalid(f"{where}.function.parameters must be a JSON schema object", "tools")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise invalid(f"{where}.function.description must be a string", "tools")
    out = {"name": name, "parameters": parameters}
    if description is not None:
        out["description"] = description
    return {"type": "function", "function": out}


def _call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": function["parameters"]},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def as_call(tools: Tools, text: str) -> dict[str, Any] | None:
    """The tool call ``text`` is, as OpenAI returns it; None where it is text (or, under
    ``none``, always)."""
    if tools.choice == "none":
        return None
    wrapped = _WRAPPED.match(text)
    try:
        value = json.loads(wrapped.group(1) if wrapped else text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or set(value) - {"name", "arguments", "parameters"}:
        return None
    name, arguments = value.get("name"), value.get("arguments", value.get("parameters"))
    if not isinstance(name, str) or not isinstance(arguments, dict):
        return None
    schema = tools.parameters(name)
    if schema is None or not _valid(arguments, schema):
        return None
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def _valid(arguments: dict[str, Any], schema: dict[str, Any]) -> bool:
    """Whether ``arguments`` match ``schema``: llguidance, which held a required call to it,
    judges a free answer too."""
    import llguidance

    try:
        compiled = grammar(schema)
    except InvalidRequest:
        return False
    matcher = llguidance.LLMatcher(_byte_tokenizer(), compiled)
    text = list(json.dumps(arguments, separators=(",", ":"), ensure_ascii=False).encode())
    # validate_tokens counts what the grammar accepts without erring on the rest
    if matcher.validate_tokens(text) != len(text):
        return False
    return matcher.consume_tokens(text) and matcher.is_accepting()


@functools.cache
def _byte_tokenizer():
    import llguidance

    return llguidance.LLTokenizer("byte")
