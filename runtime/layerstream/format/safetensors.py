"""Turn the bytes of one safetensors chunk into tensors without copying them.

The whole file is in one uint8 buffer (read into it, or mapped with its pages populated, so
the real I/O happens on the reading thread rather than as page faults during compute) and
every tensor is a view of that buffer. safetensors pads its header to 8 bytes and orders
tensors by alignment, so the views are aligned; a misaligned tensor (a hand-made file) is
copied instead.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch

from ..errors import ChunkIntegrityError
from .manifest import ChunkInfo

# Chunk files place every tensor at a multiple of TENSOR_ALIGNMENT bytes from the file's
# start: the CPU kernels' rounding depends on a weight's address mod 64, so tensors aligned
# like a fresh torch allocation's give the very numbers of a from_pretrained model. The
# safetensors format allows no gaps between tensors, so the gaps are U8 tensors whose keys
# start with PADDING_PREFIX; readers skip them.
TENSOR_ALIGNMENT = 64
PADDING_PREFIX = "__layerstream_padding_"

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def sha256_of(buffer: torch.Tensor) -> str:
    """sha256 of a uint8 tensor's bytes; hashlib releases the GIL for large inputs."""
    return hashlib.sha256(memoryview(buffer.numpy())).hexdigest()


def verify(info: ChunkInfo, buffer: torch.Tensor, store: str = "") -> None:
    """Raise ChunkIntegrityError unless ``buffer`` holds exactly the manifest's bytes."""
    where = f" in {store}" if store else ""
    if buffer.numel() != info.bytes:
        raise ChunkIntegrityError(
            f"chunk {info.name} ({info.file}{where}) has {buffer.numel()} bytes, the manifest says "
            f"{info.bytes}; the store is truncated or was modified: re-run the chunker"
        )
    digest = sha256_of(buffer)
    if digest != info.sha256:
        raise ChunkIntegrityError(
            f"chunk {info.name} ({info.file}{where}) failed its sha256 check: expected "
            f"{info.sha256[:12]}…, got {digest[:12]}…; re-run the chunker or check the store"
        )


@dataclass(frozen=True)
class TensorEntry:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the chunk file
    end: int


HEADER_PROBE = 64 << 10  # bytes read first for a header; a longer one costs a second read


def header_length(info: ChunkInfo, first8: bytes, size: int) -> int:
    """The safetensors header's length from a file's first 8 bytes, checked against its size."""
    length = int.from_bytes(first8, "little") if len(first8) == 8 else -1
    if length < 2 or 8 + length > size:
        raise ChunkIntegrityError(
            f"chunk {info.name} ({info.file}) is not a safetensors file (header length "
            f"{length} in a file of {size} bytes); re-run the chunker"
        )
    return length


def parse_header(info: ChunkInfo, head: bytes, size: int) -> list[TensorEntry]:
    """Where each tensor of a safetensors file of ``size`` bytes lies, from ``head`` (its
    first bytes, header included), checked against the size and the manifest's tensor list.
    Padding entries are left out."""
    length = header_length(info, head[:8], size)
    if len(head) < 8 + length:
        raise ValueError(f"parse_header needs the first {8 + length} bytes")
    try:
        header = json.loads(head[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChunkIntegrityError(
            f"chunk {info.name} ({info.file}) has a damaged header ({exc}); re-run the chunker"
        ) from exc
    if not isinstance(header, dict):
        raise ChunkIntegrityError(f"chunk {info.name} ({info.file}) has a damaged header")
    header.pop("__metadata__", None)
    base = 8 + length
    layout = []
    for key, entry in header.items():
        if key.startswith(PADDING_PREFIX):
            continue
        slot = _slot(key, entry, base, size)
        if slot is None:
            raise ChunkIntegrityError(
                f"chunk {info.name} ({info.file}): tensor {key} has a bad dtype, shape or "
                "offsets; re-run the chunker"
            )
        layout.append(slot)
    missing = set(info.tensors) - {t.key for t in layout}
    if missing:
        raise ChunkIntegrityError(
            f"chunk {info.name} lacks tensors the manifest lists: {sorted(missing)[:5]}"
        )
    return layout


def _slot(key: str, entry: object, base: int, size: int) -> TensorEntry | None:
    """One header entry as a TensorEntry, or None when it is malformed or out of the file."""
    if not isinstance(entry, dict):
        return None
    dtype = _DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    offsets, shape = entry.get("data_offsets"), entry.get("shape")
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
    return TensorEntry(key, dtype, tuple(shape), base + begin, base + end)


def parse_layout(info: ChunkInfo, buffer: torch.Tensor) -> list[TensorEntry]:
    """``parse_header`` of a whole chunk file held in ``buffer``."""
    size = buffer.numel()
    length = header_length(info, bytes(buffer[:8].numpy()) if size >= 8 else b"", size)
    return parse_header(info, bytes(buffer[: 8 + length].numpy()), size)


@dataclass(frozen=True)
class TensorSpec:
    """What the model built from the config needs in one place: dtype and shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ChunkSpec:
    """The tensors a chunk may hold (state-dict keys), and, for a block's chunk, the groups of
    keys of which one must be present (keys tied within the block share one tensor)."""

    tensors: dict[str, TensorSpec]
    required: tuple[frozenset[str], ...] = ()


def check_layout(info: ChunkInfo, layout: list[TensorEntry], spec: ChunkSpec) -> None:
    """Refuse a chunk whose tensors are not the ones the model needs: a chunk of another model
    (or another config) with a consistent sha256 would otherwise load, report ready and fail
    every request with a shape error."""
    present = set()
    for t in layout:
        want = spec.tensors.get(t.key)
        if want is None:
            raise ChunkIntegrityError(
                f"chunk {info.name} ({info.file}) holds tensor {t.key}, which the model built "
                "from config.json does not have there; the chunks do not belong to this "
                "config: re-run the chunker"
            )
        if (t.dtype, t.shape) != (want.dtype, want.shape):
            raise ChunkIntegrityError(
                f"chunk {info.name} ({info.file}): tensor {t.key} is {_describe(t.dtype, t.shape)}"
                f", the model built from config.json needs {_describe(want.dtype, want.shape)}; "
                "the chunks do not belong to this config: re-run the chunker"
            )
        present.add(t.key)
    missing = [sorted(group)[0] for group in spec.required if not group & present]
    if missing:
        raise ChunkIntegrityError(
            f"chunk {info.name} ({info.file}) lacks tensors the model needs: {missing[:5]}; "
            "re-run the chunker"
        )


def _describe(dtype: torch.dtype, shape: tuple[int, ...]) -> str:
    return f"{list(shape)} {str(dtype).removeprefix('torch.')}"


def tensors_from_layout(layout: list[TensorEntry], buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """Named tensor views of ``buffer`` (a misaligned tensor, from a hand-made file, is copied)."""
    out: dict[str, torch.Tensor] = {}
    for t in layout:
        raw = buffer[t.begin : t.end]
        if t.begin % t.dtype.itemsize:
            raw = raw.clone()
        out[t.key] = raw.view(t.dtype).view(t.shape)
    return out
