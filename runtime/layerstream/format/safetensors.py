"""Turn the bytes of one safetensors chunk into tensors without copying them.

The whole file is in one uint8 buffer (read into it, or mapped with its pages populated, so
the real I/O happens on the reading thread rather than as page faults during compute) and
every tensor is a view of that buffer. safetensors pads its header to 8 bytes and orders
tensors by alignment, so the views are aligned; a misaligned tensor (a hand-made file) is
copied instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..errors import ChunkIntegrityError
from .header import HeaderError, Problem, TensorEntry, decode_header
from .header import header_length as _header_length
from .manifest import ChunkInfo
from .quantization import Quantization

__all__ = ["TensorEntry"]  # re-exported: the engine's name for a chunk's tensor

# Chunk files place every tensor at a multiple of TENSOR_ALIGNMENT bytes from the file's
# start: the CPU kernels' rounding depends on a weight's address mod 64, so tensors aligned
# like a fresh torch allocation's give the very numbers of a from_pretrained model. The
# safetensors format allows no gaps between tensors, so the gaps are U8 tensors whose keys
# start with PADDING_PREFIX; readers skip them.
TENSOR_ALIGNMENT = 64
PADDING_PREFIX = "__layerstream_padding_"


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


HEADER_PROBE = 64 << 10  # bytes read first for a header; a longer one costs a second read


def header_length(info: ChunkInfo, first8: bytes, size: int) -> int:
    """The safetensors header's length from a file's first 8 bytes, checked against its size."""
    try:
        return _header_length(first8, size)
    except HeaderError as exc:
        raise _chunk_error(info, exc) from None


def parse_header(info: ChunkInfo, head: bytes, size: int) -> list[TensorEntry]:
    """Where each tensor of a safetensors file of ``size`` bytes lies, from ``head`` (its
    first bytes, header included), checked against the size and the manifest's tensor list.
    Padding entries are left out."""
    try:
        header = decode_header(head, size)
    except HeaderError as exc:
        raise _chunk_error(info, exc) from exc.__cause__
    for key in header.unknown_dtypes:
        if not key.startswith(PADDING_PREFIX):
            raise _chunk_error(info, HeaderError(Problem.ENTRY, key=key))
    layout = [t for t in header.entries if not t.key.startswith(PADDING_PREFIX)]
    missing = set(info.tensors) - {t.key for t in layout}
    if missing:
        raise ChunkIntegrityError(
            f"chunk {info.name} lacks tensors the manifest lists: {sorted(missing)[:5]}"
        )
    return layout


def _chunk_error(info: ChunkInfo, exc: HeaderError) -> ChunkIntegrityError:
    """A header problem worded for a chunk file: which chunk, and the fix."""
    where = f"chunk {info.name} ({info.file})"
    if exc.problem is Problem.LENGTH:
        text = f"{where} is not a safetensors file ({exc.detail}); re-run the chunker"
    elif exc.problem is Problem.JSON and exc.detail:
        text = f"{where} has a damaged header ({exc.detail}); re-run the chunker"
    elif exc.problem is Problem.JSON:
        text = f"{where} has a damaged header"
    else:
        text = f"{where}: tensor {exc.key} has a bad dtype, shape or offsets; re-run the chunker"
    return ChunkIntegrityError(text)


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
    # keys held quantized, with their scales (format/quantization.py): the dtype and shape
    # each is dequantized to when its chunk is loaded, and how
    quantized: dict[str, TensorSpec] = field(default_factory=dict)
    quantization: Quantization | None = None


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
