"""The chunker's writer threads: chunk files into the sink's staging folder, recorded for the
manifest."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ..engine.experts import ExpertsModule
from ..format.manifest import ChunkExperts, ChunkInfo, ExpertGroup
from ..format.parts import chunk_parts, sha256_of_ranges
from ..format.safetensors import parse_layout
from ..format.writer import ChunkEntry, write_chunk
from .sinks import Sink


class ChunkWriter:
    """Writes chunks on two threads at once: a file's sha256 is sequential and runs at one
    core's speed, so hashing two files at a time is what lets the chunker keep up with the
    disk (docs/design-notes-storage.md)."""

    WORKERS = 2

    def __init__(self, sink: Sink):
        self.sink = sink
        self._pool = ThreadPoolExecutor(self.WORKERS, thread_name_prefix="layerstream-chunk")
        self._pending: dict[str, Future[ChunkInfo]] = {}

    def submit(
        self,
        name: str,
        entries: list[ChunkEntry],
        label: str,
        experts: list[ExpertsModule] | None = None,
        quantized: list[str] | None = None,
        dequantized_bytes: int = 0,
    ) -> Future[ChunkInfo]:
        """Queue one chunk (``label``: its block's prefix, or "rest"; ``experts``: the block's
        experts modules; ``quantized``: its keys stored quantized, ``dequantized_bytes``
        their size dequantized); returns once at most WORKERS chunks are still being written
        (so progress shows written chunks, and a failure stops the chunker early)."""
        future = self._pool.submit(
            self._write, name, entries, label, experts or [], quantized or None, dequantized_bytes
        )
        self._pending[name] = future
        running = [f for f in self._pending.values() if not f.done()]
        if len(running) > self.WORKERS:
            running[0].result()
        return future

    def _write(
        self,
        name: str,
        entries: list[ChunkEntry],
        label: str,
        experts: list[ExpertsModule],
        quantized: list[str] | None,
        dequantized_bytes: int,
    ) -> ChunkInfo:
        file = f"{name}.safetensors"
        # "scope" is the metadata key every chunk written so far carries: renaming it would
        # change the bytes (and sha256) of chunks of unchanged checkpoints.
        metadata = {"scope": label, "format": "pt"}
        size, sha256 = write_chunk(self.sink.staging / file, entries, metadata)
        info = ChunkInfo(
            name=name,
            file=file,
            bytes=size,
            sha256=sha256,
            tensors=sorted(e.key for e in entries),
            quantized=quantized,
            dequantized_bytes=dequantized_bytes if quantized else 0,
        )
        if experts:
            info = with_expert_digests(info, self.sink.staging / file, experts)
        self.sink.file_done(file)
        return info

    def finish(self) -> dict[str, ChunkInfo]:
        """Every chunk's info, in submission order; the first failure is raised."""
        try:
            return {name: future.result() for name, future in self._pending.items()}
        finally:
            self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def with_expert_digests(info: ChunkInfo, path: Path, experts: list[ExpertsModule]) -> ChunkInfo:
    """``info`` with its experts' parts and their digests, from the written file."""
    groups = [ExpertGroup(m.name, m.count, sorted(m.tensors), []) for m in experts]
    draft = ChunkInfo(**{**vars(info), "experts": ChunkExperts("", groups)})
    data = torch.from_file(str(path), size=info.bytes, dtype=torch.uint8)
    parts = chunk_parts(draft, parse_layout(draft, data))
    digests = [[sha256_of_ranges(data, ranges) for ranges in group] for group in parts.experts]
    groups = [
        ExpertGroup(g.module, g.count, g.tensors, d) for g, d in zip(groups, digests, strict=True)
    ]
    base = sha256_of_ranges(data, parts.base)
    experts = ChunkExperts(base, groups, parts.base_bytes)
    return ChunkInfo(**{**vars(info), "experts": experts})
