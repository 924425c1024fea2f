"""The safetensors header, for every reader in layerstream: the dtype table and the parser.

Both chunk files (read by the engine) and source checkpoints (indexed by the chunker) go
through ``decode_header``, so the two can never disagree on what a file holds. The parser
reports what is wrong (``HeaderError``); each caller words the error for its own reader.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: its code in the header and the torch dtype it maps to."""

    code: str
    torch: torch.dtype

    @property
    def itemsize(self) -> int:
        return self.torch.itemsize


# Every safetensors dtype that maps to a torch dtype whole bytes wide (the sub-byte F4/F6
# codes do not): a chunk may hold any tensor a checkpoint may, e.g. fp8 weights or uint
# buffers.
DTYPES = (
    DType("F64", torch.float64),
    DType("F32", torch.float32),
    DType("F16", torch.float16),
    DType("BF16", torch.bfloat16),
    DType("F8_E4M3", torch.float8_e4m3fn),
    DType("F8_E5M2", torch.float8_e5m2),
    DType("I64", torch.int64),
    DType("I32", torch.int32),
    DType("I16", torch.int16),
    DType("I8", torch.int8),
    DType("U64", torch.uint64),
    DType("U32", torch.uint32),
    DType("U16", torch.uint16),
    DType("U8", torch.uint8),
    DType("BOOL", torch.bool),
)
BY_CODE = {d.code: d for d in DTYPES}
BY_TORCH = {d.torch: d for d in DTYPES}


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of ``dtype``; ValueError for one safetensors cannot hold."""
    found = BY_TORCH.get(dtype)
    if found is None:
        raise ValueError(f"safetensors has no dtype for {dtype}")
    return found.code


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor of a safetensors file lies."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class Problem(enum.Enum):
    LENGTH = "not a safetensors file"  # the first 8 bytes do not fit the file
    JSON = "damaged header"  # not JSON, or not a JSON object
    ENTRY = "bad dtype, shape or offsets"  # of one tensor


class HeaderError(ValueError):
    """A header that does not describe a readable safetensors file of the size at hand.
    ``detail`` says what was found (may be empty), ``key`` names the tensor of an ENTRY
    problem."""

    def __init__(self, problem: Problem, detail: str = "", key: str | None = None):
        what = detail or (f"tensor {key}" if key is not None else "")
        super().__init__(f"{problem.value} ({what})" if what else problem.value)
        self.problem = problem
        self.detail = detail
        self.key = key


@dataclass(frozen=True)
class Header:
    """A decoded header: the tensors of known dtypes, and the keys whose dtype code is not
    in ``DTYPES`` (well-formed JSON otherwise; their sizes cannot be checked)."""

    length: int  # of the JSON text; the data starts at 8 + length
    entries: list[TensorEntry]
    unknown_dtypes: dict[str, str]  # key -> dtype code


def header_length(first8: bytes, size: int) -> int:
    """The JSON header's length from a file's first 8 bytes, checked against its size."""
    if len(first8) < 8:
        raise HeaderError(Problem.LENGTH, f"{size} bytes, fewer than the 8 of a header length")
    length = int.from_bytes(first8, "little")
    if length < 2 or 8 + length > size:
        raise HeaderError(Problem.LENGTH, f"header length {length} in a file of {size} bytes")
    return length


def decode_header(head: bytes, size: int) -> Header:
    """The tensors of a safetensors file of ``size`` bytes, from ``head`` (its first bytes,
    header included; ValueError when too short): each one's entry checked to lie inside
    the file and to hold exactly its shape's bytes."""
    length = header_length(head[:8], size)
    if len(head) < 8 + length:
        raise ValueError(f"decode_header needs the first {8 + length} bytes")
    try:
        header = json.loads(head[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError(Problem.JSON, str(exc)) from exc
    if not isinstance(header, dict):
        raise HeaderError(Problem.JSON)
    header.pop("__metadata__", None)
    base = 8 + length
    entries, unknown = [], {}
    for key, raw in header.items():
        code = raw.get("dtype") if isinstance(raw, dict) else None
        if isinstance(code, str) and code not in BY_CODE:
            unknown[key] = code
            continue
        entry = _entry(key, raw, base, size)
        if entry is None:
            raise HeaderError(Problem.ENTRY, key=key)
        entries.append(entry)
    return Header(length, entries, unknown)


def _entry(key: str, raw: object, base: int, size: int) -> TensorEntry | None:
    """One header entry, or None when it is malformed or reaches outside the file."""
    if not isinstance(raw, dict):
        return None
    dtype = BY_CODE.get(raw.get("dtype"))  # type: ignore[arg-type]
    offsets, shape = raw.get("data_offsets"), raw.get("shape")
    if (
        dtype is None
        or not isinstance(offsets, list)
        or len(offsets) != 2
        or not isinstance(shape, list)
        or not all(type(v) is int and v >= 0 for v in [*offsets, *shape])
    ):
        return None
    begin, end = offsets
    if not begin <= end <= size - base or end - begin != math.prod(shape) * dtype.itemsize:
        return None
    return TensorEntry(key, dtype.torch, tuple(shape), base + begin, base + end)
