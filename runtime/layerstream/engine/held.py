"""What a quantized chunk holds once pinned for good: its plain tensors in memory of their
own, each at the offset mod 64 it has in the chunk (transformers' CPU kernels round by a
weight's address: docs/exactness.md), and each quantized tensor dequantized from a 64-byte
boundary like a fresh allocation of from_pretrained's, without its stored values and
scales. Every token computes with a pinned tensor, so dequantizing it once beats keeping
its stored bytes to dequantize again, and the stored bytes are not kept beside it.

A pinned block holds its chunk this way, and so does a pinned base (expert streaming: the
chunk without its experts, expert_reader.py)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch

from ..format.manifest import ChunkInfo, Manifest
from ..format.quantization import DEQUANTIZED_ALIGNMENT, Quantization, aligned
from ..format.safetensors import ChunkSpec, TensorEntry, TensorSpec, tensors_from_layout

ALIGN = 64  # a held plain tensor keeps its file offset modulo this


@dataclass(frozen=True)
class HeldLayout:
    """Where a held chunk's tensors go in its memory: the plain ones (``held``, at
    ``offsets``), then each quantized one dequantized from a 64-byte boundary (``dequantized``:
    by key, its offset); ``stored``: the quantized ones' values and scales in the chunk,
    dropped once dequantized."""

    held: list[TensorEntry]
    offsets: list[int]
    dequantized: dict[str, int]
    stored: list[TensorEntry]
    nbytes: int

    @classmethod
    def of(
        cls,
        layout: list[TensorEntry],
        spec: ChunkSpec | None,
        quantized: Collection[str],
        left_out: Collection[str] = (),
    ) -> HeldLayout:
        """``layout``'s tensors but those ``left_out``, the ``quantized`` ones dequantized."""
        quant = None if spec is None else spec.quantization
        dropped = set(quantized) | {quant.scale_key(k) for k in quantized if quant is not None}
        held = [t for t in layout if t.key not in left_out and t.key not in dropped]
        offsets, end = [], 0
        for t in held:
            offset = end + (t.begin - end) % ALIGN  # the same residue mod ALIGN as in the file
            offsets.append(offset)
            end = offset + t.nbytes
        dequantized = {}
        for key in quantized:
            assert spec is not None
            want = spec.quantized[key]
            dequantized[key] = end = aligned(end)
            end += math.prod(want.shape) * want.dtype.itemsize
        stored = [t for t in layout if t.key in dropped]
        return cls(held, offsets, dequantized, stored, end)

    def copy(self, data: torch.Tensor, spec: ChunkSpec | None) -> dict[str, torch.Tensor]:
        """The tensors of ``data`` (a buffer holding the chunk's checked bytes at their file
        offsets) in memory of their own, laid out as planned."""
        memory = torch.empty(self.nbytes, dtype=torch.uint8)
        placed = []
        for t, offset in zip(self.held, self.offsets, strict=True):
            memory[offset : offset + t.nbytes] = data[t.begin : t.end]
            placed.append(dataclasses.replace(t, begin=offset, end=offset + t.nbytes))
        tensors = tensors_from_layout(placed, memory)
        if self.dequantized:
            assert spec is not None and spec.quantization is not None
            quant = spec.quantization
            stored = tensors_from_layout(self.stored, data)
            for key, offset in self.dequantized.items():
                want = spec.quantized[key]
                size = math.prod(want.shape) * want.dtype.itemsize
                out = memory[offset : offset + size].view(want.dtype).view(want.shape)
                quant.dequantize(stored[key], stored[quant.scale_key(key)], want.dtype, out)
                tensors[key] = out
        return tensors


def held_bytes(
    nbytes: int,
    quantized: Collection[str],
    shapes: Mapping[str, TensorSpec],
    quant: Quantization | None,
) -> int:
    """What ``nbytes`` of a chunk (header included) hold once pinned, with its ``quantized``
    tensors (``shapes``: by key, each one's dtype and shape dequantized) held dequantized and
    their values and scales dropped (HeldLayout)."""
    if not quantized:
        return nbytes
    assert quant is not None
    held = nbytes + DEQUANTIZED_ALIGNMENT
    for key in quantized:
        shape = tuple(shapes[key].shape)
        held += aligned(math.prod(shape) * shapes[key].dtype.itemsize)
        held -= quant.stored_bytes(shape)
    return held


@dataclass(frozen=True)
class HeldSizes:
    """What each chunk holds pinned: the non-block chunks together, and each block's; and
    ``staging``, the largest quantized chunk's stored bytes: a quantized chunk is read
    whole before it is dequantized into what it holds, one at a time where no streaming
    buffer takes it (readers.py)."""

    rest: int
    blocks: tuple[int, ...]
    staging: int = 0

    @property
    def total(self) -> int:
        """The whole model in memory, read in: what a percentage memory_budget is a share
        of."""
        return self.rest + sum(self.blocks) + self.staging

    @classmethod
    def of(cls, manifest: Manifest, shapes: Mapping[str, TensorSpec]) -> HeldSizes:
        """From ``manifest`` and, for a quantized store, ``shapes`` (by key, each quantized
        tensor's dtype and shape dequantized: its model's)."""

        def held(info: ChunkInfo) -> int:
            return held_bytes(info.bytes, info.quantized or (), shapes, manifest.quantization)

        return cls(
            sum(held(manifest.chunks[name]) for name in manifest.rest),
            tuple(held(manifest.chunks[b.chunk]) for b in manifest.blocks),
            max((c.bytes for c in manifest.chunks.values() if c.quantized), default=0),
        )
