"""Turn the bytes of one safetensors chunk into tensors without copying them.

The whole file is read into one uint8 buffer (one ``readinto``, so the real I/O happens in
the reading thread rather than as page faults during compute) and every tensor is a view
of that buffer. safetensors pads its header to 8 bytes and orders tensors by alignment, so
the views are aligned; a misaligned tensor (a hand-made file) is copied instead.
"""

from __future__ import annotations

import hashlib
import json

import torch

from .errors import ChunkIntegrityError
from .manifest import ChunkInfo

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


def tensors_from_buffer(info: ChunkInfo, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """Parse a safetensors file held in ``buffer`` into named tensor views."""
    size = buffer.numel()
    header_len = int.from_bytes(bytes(buffer[:8].numpy()), "little") if size >= 8 else -1
    if header_len < 2 or 8 + header_len > size:
        raise ChunkIntegrityError(f"chunk {info.name} ({info.file}) is not a safetensors file")
    header = json.loads(bytes(buffer[8 : 8 + header_len].numpy()))
    header.pop("__metadata__", None)
    base = 8 + header_len
    out: dict[str, torch.Tensor] = {}
    for key, entry in header.items():
        dtype = _DTYPES.get(entry["dtype"])
        begin, end = entry["data_offsets"]
        if dtype is None or not 0 <= begin <= end <= size - base:
            raise ChunkIntegrityError(f"chunk {info.name}: tensor {key} has a bad dtype or offsets")
        raw = buffer[base + begin : base + end]
        if (base + begin) % dtype.itemsize:
            raw = raw.clone()
        shape = entry["shape"]
        tensor = raw.view(dtype)
        out[key] = tensor.view(shape) if shape else tensor.view(())
    missing = set(info.tensors) - set(out)
    if missing:
        raise ChunkIntegrityError(
            f"chunk {info.name} lacks tensors the manifest lists: {sorted(missing)[:5]}"
        )
    return out
