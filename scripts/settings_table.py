#!/usr/bin/env python3
"""Render the settings table of docs/settings.md from LayerStreamSettings' field descriptions.

    .venv/bin/python scripts/settings_table.py --write docs/settings.md   # rewrite the section
    .venv/bin/python scripts/settings_table.py                            # print the table

The table sits between ``<!-- settings:begin -->`` and ``<!-- settings:end -->``;
tests/test_docs.py fails when it differs from what this renders. The descriptions in
``runtime/layerstream/serving/settings.py`` are the source: edit those, never the table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le
from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from layerstream.serving.settings import LayerStreamSettings, Shown

BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"
NAMES = {int: "integer", float: "number", str: "string", bool: "`true`, `false`"}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _bounds(metadata: list[Any]) -> str:
    # pydantic keeps Field(ge=...) inside an Annotated type as a FieldInfo of its own
    found = [m for part in metadata for m in getattr(part, "metadata", [part])]
    ge = next((m.ge for m in found if isinstance(m, Ge)), None)
    gt = next((m.gt for m in found if isinstance(m, Gt)), None)
    le = next((m.le for m in found if isinstance(m, Le)), None)
    if ge is not None and le is not None:
        return f"{_number(ge)}–{_number(le)}"
    parts = [
        f"≥ {_number(ge)}" if ge is not None else "",
        f"> {_number(gt)}" if gt is not None else "",
    ]
    parts.append(f"≤ {_number(le)}" if le is not None else "")
    return ", ".join(p for p in parts if p)


def value_form(annotation: Any, metadata: list[Any]) -> str:
    """A value's form in words: its type or shown form, its bounds, its literal choices."""
    if get_origin(annotation) is Annotated:
        inner, *extra = get_args(annotation)
        return value_form(inner, [*extra, *metadata])
    if get_origin(annotation) in (Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        text = " or ".join(value_form(a, []) for a in options)
        return text + (" or none" if len(options) < len(get_args(annotation)) else "")
    if get_origin(annotation) is Literal:
        return ", ".join(f"`{choice}`" for choice in get_args(annotation))
    shown = next((m.text for m in metadata if isinstance(m, Shown)), None)
    name = shown or NAMES.get(annotation)
    if name is None:
        name = "secret string" if annotation is SecretStr else "JSON object of strings"
    bounds = _bounds(metadata)
    return f"{name}, {bounds}" if bounds and shown else f"{name} {bounds}".strip()


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory else field.default
    if value is None or value is PydanticUndefined:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{_number(value)}`"
    return f"`{json.dumps(value) if isinstance(value, dict) else value}`"


def settings_table() -> str:
    """The markdown table of every setting: name, value form, default, description."""
    rows = ["| setting | value | default | meaning |", "|---|---|---|---|"]
    for name, field in LayerStreamSettings.model_fields.items():
        cells = (f"`{name}`", value_form(field.annotation, field.metadata), default_text(field))
        meaning = (field.description or "").replace("|", "\\|")
        rows.append("| " + " | ".join((*cells, meaning)) + " |")
    return "\n".join(rows) + "\n"


def render_into(document: str) -> str:
    """``document`` with its settings section replaced by the table."""
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(document):
        raise ValueError(f"no {BEGIN} ... {END} section to render the settings table into")
    return pattern.sub(lambda _: f"{BEGIN}\n{settings_table()}{END}", document)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="rewrite this file's settings section")
    args = parser.parse_args(argv)
    if args.write:
        args.write.write_text(render_into(args.write.read_text()))
    else:
        sys.stdout.write(settings_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
