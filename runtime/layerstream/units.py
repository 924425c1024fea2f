"""Human-friendly byte sizes: ``"512MiB"``, ``"2GB"``, ``"25%"`` (of a reference size)."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z%]*)\s*$")


def parse_size(value: str | int | float, reference: int | None = None) -> int:
    """Parse a byte size; a percentage needs ``reference`` (the size it is a share of).

    >>> parse_size("512MiB")
    536870912
    >>> parse_size("25%", reference=1000)
    250
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"size must not be negative: {value!r}")
        return int(value)
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"not a size: {value!r} (examples: 536870912, '512MiB', '2GB', '25%')")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit == "%":
        if reference is None:
            raise ValueError(f"{value!r} is a percentage, but there is nothing to take it of")
        return int(reference * number / 100)
    if unit not in _UNITS:
        choices = ", ".join(sorted(u for u in _UNITS if u))
        raise ValueError(f"unknown size unit {match.group(2)!r} in {value!r}; use one of {choices}")
    return int(number * _UNITS[unit])


def format_size(nbytes: float) -> str:
    """``1536 -> '1.5 KiB'``: for log lines and error messages."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
