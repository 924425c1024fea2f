"""A block chunk as parts that can be read alone: its base (every byte outside the experts,
header included) and each expert of each experts module.

Expert e of a tensor ``[count, ...]`` is its e-th slice along the first dimension: one
contiguous byte range, since safetensors stores tensors row-major. An expert's part is its
slices of every tensor of its group, in file order; each part has its own sha256 in the
manifest, so a part read alone is checked alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..errors import ChunkIntegrityError
from .header import TensorEntry
from .manifest import ChunkInfo, ExpertGroup

Range = tuple[int, int]  # (offset in the file, length)


def coalesce(ranges: list[Range]) -> list[Range]:
    """Sorted, with ranges that touch or overlap merged (one read each)."""
    out: list[Range] = []
    for offset, length in sorted(ranges):
        if out and offset <= out[-1][0] + out[-1][1]:
            start, size = out[-1]
            out[-1] = (start, max(size, offset + length - start))
        else:
            out.append((offset, length))
    return out


def span(ranges: list[Range]) -> int:
    return sum(length for _, length in ranges)


@dataclass(frozen=True)
class ChunkParts:
    """Where a chunk's base and each expert lie (from its header), with their digests."""

    info: ChunkInfo  # with its experts listed
    base: list[Range]
    experts: list[list[list[Range]]]  # [group][expert] -> ranges

    @property
    def groups(self) -> list[ExpertGroup]:
        assert self.info.experts is not None
        return self.info.experts.groups

    @property
    def base_sha256(self) -> str:
        assert self.info.experts is not None
        return self.info.experts.base_sha256

    @property
    def base_bytes(self) -> int:
        return span(self.base)

    def expert_bytes(self, group: int, expert: int) -> int:
        return span(self.experts[group][expert])


def expert_slices(entry: TensorEntry, count: int) -> list[Range]:
    stride = entry.nbytes // count
    return [(entry.begin + e * stride, stride) for e in range(count)]


def chunk_parts(info: ChunkInfo, layout: list[TensorEntry]) -> ChunkParts:
    """``info``'s parts, from its parsed header; a header that does not hold the manifest's
    experts as it says is an integrity error."""
    assert info.experts is not None
    entries = {t.key: t for t in layout}
    taken: list[Range] = []
    experts: list[list[list[Range]]] = []
    for group in info.experts.groups:
        per_expert: list[list[Range]] = [[] for _ in range(group.count)]
        for key in group.tensors:
            entry = entries.get(key)
            if entry is None or not entry.shape or entry.shape[0] != group.count:
                raise ChunkIntegrityError(
                    f"chunk {info.name} ({info.file}): tensor {key} does not hold "
                    f"{group.count} experts as the manifest says; re-run the chunker"
                )
            for e, piece in enumerate(expert_slices(entry, group.count)):
                per_expert[e].append(piece)
                taken.append(piece)
        experts.append([sorted(r) for r in per_expert])
    base: list[Range] = []
    position = 0
    for offset, length in coalesce(taken):
        if offset > position:
            base.append((position, offset - position))
        position = offset + length
    if position < info.bytes:
        base.append((position, info.bytes - position))
    listed = info.experts.base_bytes
    if listed is not None and listed != span(base):
        raise ChunkIntegrityError(
            f"chunk {info.name} ({info.file}): its header leaves {span(base)} bytes outside "
            f"its experts, the manifest says {listed}; re-run the chunker"
        )
    return ChunkParts(info, base, experts)


def sha256_of_ranges(buffer: torch.Tensor | memoryview, ranges: list[Range]) -> str:
    """sha256 of ``buffer``'s bytes at ``ranges`` (file offsets into a chunk-sized buffer),
    concatenated in the order given."""
    view = memoryview(buffer.numpy()) if isinstance(buffer, torch.Tensor) else buffer
    digest = hashlib.sha256()
    for offset, length in ranges:
        digest.update(view[offset : offset + length])
    return digest.hexdigest()


def verify_part(
    info: ChunkInfo, what: str, buffer: torch.Tensor, ranges: list[Range], expected: str
) -> None:
    """Raise ChunkIntegrityError unless ``buffer`` holds the part's bytes at ``ranges``."""
    digest = sha256_of_ranges(buffer, ranges)
    if digest != expected:
        raise ChunkIntegrityError(
            f"chunk {info.name} ({info.file}), {what}, failed its sha256 check: expected "
            f"{expected[:12]}…, got {digest[:12]}…; re-run the chunker or check the store"
        )
