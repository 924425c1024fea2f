"""The chunker's writer threads: chunk files into the sink's staging folder, recorded for the
manifest."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from ..format.manifest import ChunkInfo
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

    def submit(self, name: str, entries: list[ChunkEntry], label: str) -> Future[ChunkInfo]:
        """Queue one chunk (``label``: its block's prefix, or "rest"); returns once at most
        WORKERS chunks are still being written (so progress shows written chunks, and a
        failure stops the chunker early)."""
        future = self._pool.submit(self._write, name, entries, label)
        self._pending[name] = future
        running = [f for f in self._pending.values() if not f.done()]
        if len(running) > self.WORKERS:
            running[0].result()
        return future

    def _write(self, name: str, entries: list[ChunkEntry], label: str) -> ChunkInfo:
        file = f"{name}.safetensors"
        # "scope" is the metadata key every chunk written so far carries: renaming it would
        # change the bytes (and sha256) of chunks of unchanged checkpoints.
        metadata = {"scope": label, "format": "pt"}
        size, sha256 = write_chunk(self.sink.staging / file, entries, metadata)
        self.sink.file_done(file)
        return ChunkInfo(
            name=name, file=file, bytes=size, sha256=sha256, tensors=sorted(e.key for e in entries)
        )

    def finish(self) -> dict[str, ChunkInfo]:
        """Every chunk's info, in submission order; the first failure is raised."""
        try:
            return {name: future.result() for name, future in self._pending.items()}
        finally:
            self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
