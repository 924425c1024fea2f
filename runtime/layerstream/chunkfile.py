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

from .errors import ChunkIntegrityError
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
class TensorSlot:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the chunk file
    end: int


def parse_layout(info: ChunkInfo, buffer: torch.Tensor) -> list[TensorSlot]:
    """Where each tensor of the safetensors file held in ``buffer`` lies, checked against the
    file's size and the manifest's tensor list."""
    size = buffer.numel()
    header_len = int.from_bytes(bytes(buffer[:8].numpy()), "little") if size >= 8 else -1
    if header_len < 2 or 8 + header_len > size:
        raise ChunkIntegrityError(f"chunk {info.name} ({info.file}) is not a safetensors file")
    header = json.loads(bytes(buffer[8 : 8 + header_len].numpy()))
    header.pop("__metadata__", None)
    base = 8 + header_len
    layout = []
    for key, entry in header.items():
        if key.startswith(PADDING_PREFIX):
            continue
        dtype = _DTYPES.get(entry["dtype"])
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if (
            dtype is None
            or not 0 <= begin <= end <= size - base
            or end - begin != math.prod(shape) * dtype.itemsize
        ):
            raise ChunkIntegrityError(
                f"chunk {info.name}: tensor {key} has a bad dtype, shape or offsets"
            )
        layout.append(TensorSlot(key, dtype, shape, base + begin, base + end))
    missing = set(info.tensors) - {t.key for t in layout}
    if missing:
        raise ChunkIntegrityError(
            f"chunk {info.name} lacks tensors the manifest lists: {sorted(missing)[:5]}"
        )
    return layout


def tensors_from_layout(layout: list[TensorSlot], buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """Named tensor views of ``buffer`` (a misaligned tensor, from a hand-made file, is copied)."""
    out: dict[str, torch.Tensor] = {}
    for t in layout:
        raw = buffer[t.begin : t.end]
        if t.begin % t.dtype.itemsize:
            raw = raw.clone()
        out[t.key] = raw.view(t.dtype).view(t.shape)
    return out
