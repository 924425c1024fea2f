"""Write safetensors chunk files as a stream of bytes, hashed on the way out.

A chunk's tensors come either as byte ranges of a source safetensors file (copied without
ever becoming tensors, so memory stays at one staging buffer whatever the block size) or
as in-memory tensors (the chunker's conversion path). Bytes are gathered into a staging
buffer and written in large writes at offsets that are multiples of its size; the kernel
then keeps the file in the page cache as large folios, which the runtime maps with 2 MiB
page-table entries. The sha256 is computed from the staging buffer while it is written,
so nothing is read back. Every tensor starts 64-byte aligned in the file (header padding,
then padding entries between tensors: ``_aligned``), so the runtime computes with weights
aligned like those of a from_pretrained model.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import os
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .header import decode_header, dtype_code, header_length
from .safetensors import PADDING_PREFIX, TENSOR_ALIGNMENT

STAGING_BYTES = 8 << 20  # a multiple of 2 MiB: every write starts on a huge-page boundary


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a source safetensors file, by position: never loaded as a tensor.
    ``dtype`` is None for a dtype outside ``header.DTYPES``: such a tensor is never copied
    as bytes (the chunker converts it through transformers)."""

    path: Path
    key: str
    dtype: torch.dtype | None
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the first byte
    nbytes: int


@dataclass(frozen=True)
class PermutedSource:
    """A source tensor written with its dimensions permuted by ``order``, which keeps the
    first one first: each of its slices is a byte range of the source, read and permuted
    alone, so memory stays at one slice (one expert)."""

    source: SourceTensor
    order: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape[axis] for axis in self.order)


def read_safetensors_index(path: Path) -> dict[str, SourceTensor]:
    """Where each tensor of a safetensors file lies, from its header alone (HeaderError when
    the header does not describe the file)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        first8 = f.read(8)
        head = first8 + f.read(header_length(first8, size))
    header = decode_header(head, size)
    out = {
        t.key: SourceTensor(path, t.key, t.dtype, t.shape, t.begin, t.nbytes)
        for t in header.entries
    }
    for key in header.unknown_dtypes:
        out[key] = SourceTensor(path, key, None, (), 0, 0)
    return out


@dataclass(frozen=True)
class ChunkEntry:
    """A tensor to write under ``key``: bytes from a source file, or an in-memory tensor."""

    key: str
    dtype: torch.dtype  # one of header.DTYPES
    shape: tuple[int, ...]
    nbytes: int
    source: SourceTensor | PermutedSource | torch.Tensor
    residue: int = 0  # where it starts, modulo TENSOR_ALIGNMENT (see ``_aligned``)

    @classmethod
    def of_tensor(cls, key: str, tensor: torch.Tensor, residue: int = 0) -> ChunkEntry:
        tensor = tensor.detach().contiguous()
        shape = tuple(tensor.shape)
        return cls(key, tensor.dtype, shape, tensor.numel() * tensor.itemsize, tensor, residue)

    @classmethod
    def of_source(cls, key: str, source: SourceTensor) -> ChunkEntry:
        if source.dtype is None:
            raise ValueError(f"tensor {source.key} of {source.path}: a dtype chunks cannot hold")
        residue = source.offset % TENSOR_ALIGNMENT
        return cls(key, source.dtype, source.shape, source.nbytes, source, residue)

    @classmethod
    def of_permuted(cls, key: str, source: SourceTensor, order: tuple[int, ...]) -> ChunkEntry:
        if source.dtype is None:
            raise ValueError(f"tensor {source.key} of {source.path}: a dtype chunks cannot hold")
        if order[0] != 0 or sorted(order) != list(range(len(source.shape))):
            raise ValueError(f"tensor {source.key}: {order} does not keep the first dimension")
        permuted = PermutedSource(source, order)
        return cls(key, source.dtype, permuted.shape, source.nbytes, permuted)


def _aligned(entries: list[ChunkEntry]) -> list[ChunkEntry]:
    """``entries`` with a zero-filled U8 padding entry before every tensor that would not
    start where a from_pretrained model holds it, modulo TENSOR_ALIGNMENT: a CPU kernel
    that handles unaligned rows apart rounds differently (AVX-512 MKL does, on a GEMV; see
    docs/exactness.md). from_pretrained keeps a tensor it needs to change in no way as a
    view of the mapped checkpoint, at its file offset; any other tensor is a fresh torch
    allocation, 64-byte aligned. So a tensor copied from the source keeps its source
    offset's residue, and a converted one starts on a multiple. The header is padded to
    that multiple too (see ``_header``), so file offsets are addresses modulo 64 in a
    mapping or a fresh buffer. safetensors allows no gaps between tensors, so the gaps are
    tensors of their own, which layerstream's reader skips."""
    out: list[ChunkEntry] = []
    offset = 0
    for e in entries:
        gap = (e.residue - offset) % TENSOR_ALIGNMENT
        if gap:
            key = f"{PADDING_PREFIX}{len(out)}"
            zeros = torch.zeros(gap, dtype=torch.uint8)
            out.append(ChunkEntry(key, torch.uint8, (gap,), gap, zeros))
            offset += gap
        out.append(e)
        offset += e.nbytes
    return out


def _header(entries: list[ChunkEntry], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        header[e.key] = {
            "dtype": dtype_code(e.dtype),
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    # safetensors accepts trailing spaces in the header: the data starts 64-byte aligned
    raw += b" " * (-(8 + len(raw)) % TENSOR_ALIGNMENT)
    return len(raw).to_bytes(8, "little") + raw


class _Staging:
    """Fills a fixed buffer, writes it whole and hashes it meanwhile (hashlib and os.write
    both release the GIL, so the two run on two cores)."""

    def __init__(self, fd: int, hasher: ThreadPoolExecutor):
        self.fd = fd
        self.buffer = memoryview(bytearray(STAGING_BYTES))
        self.fill = 0
        self.written = 0
        self.digest = hashlib.sha256()
        self._hasher = hasher

    def room(self) -> memoryview:
        return self.buffer[self.fill :]

    def advance(self, n: int) -> None:
        self.fill += n
        if self.fill == len(self.buffer):
            self.flush()

    def put(self, data: memoryview) -> None:
        while len(data):
            n = min(len(data), len(self.buffer) - self.fill)
            self.buffer[self.fill : self.fill + n] = data[:n]
            data = data[n:]
            self.advance(n)

    def flush(self) -> None:
        if not self.fill:
            return
        view = self.buffer[: self.fill]
        hashing = self._hasher.submit(self.digest.update, view)
        done = 0
        while done < len(view):
            done += os.write(self.fd, view[done:])
        hashing.result()
        self.written += self.fill
        self.fill = 0


def _copy_range(staging: _Staging, source: SourceTensor, fd: int) -> None:
    """Read ``source``'s bytes straight into the staging buffer (no intermediate copy)."""
    position, left = source.offset, source.nbytes
    while left:
        room = staging.room()
        n = os.preadv(fd, [room[: min(left, len(room))]], position)
        if n == 0:
            raise OSError(f"{source.path} ended inside tensor {source.key}")
        position += n
        left -= n
        staging.advance(n)


def _copy_permuted(staging: _Staging, permuted: PermutedSource, fd: int) -> None:
    """Read ``permuted``'s source a slice of its first dimension at a time, and put each
    slice permuted into the staging buffer."""
    source = permuted.source
    assert source.dtype is not None
    count = source.shape[0]
    if not count:
        return
    size = source.nbytes // count
    raw = bytearray(size)
    view = memoryview(raw)
    inner = [axis - 1 for axis in permuted.order[1:]]
    for i in range(count):
        done = 0
        while done < size:
            n = os.preadv(fd, [view[done:]], source.offset + i * size + done)
            if n == 0:
                raise OSError(f"{source.path} ended inside tensor {source.key}")
            done += n
        values = torch.frombuffer(raw, dtype=torch.uint8).view(source.dtype)
        moved = values.view(source.shape[1:]).permute(inner).contiguous()
        staging.put(memoryview(moved.view(-1).view(torch.uint8).numpy()))


def write_chunk(
    path: Path, entries: Iterable[ChunkEntry], metadata: dict[str, str]
) -> tuple[int, str]:
    """Write a safetensors file at ``path`` (via a temporary name, then a rename); return its
    size and sha256. Tensors are laid out largest item size first, like safetensors, each
    at a multiple of TENSOR_ALIGNMENT bytes (``_aligned``). The data is on its way to disk
    but not yet durable: ``sync_files`` waits for it before the manifest is written."""
    ordered = sorted(entries, key=lambda e: (-e.dtype.itemsize, e.key))
    for e in ordered:
        dtype_code(e.dtype)  # ValueError for a dtype safetensors cannot hold
        want = e.dtype.itemsize * math.prod(e.shape)
        if want != e.nbytes:
            raise ValueError(f"tensor {e.key}: {e.nbytes} bytes for shape {e.shape} {e.dtype}")
        if e.key.startswith(PADDING_PREFIX):
            raise ValueError(f"tensor {e.key}: the name prefix {PADDING_PREFIX} is reserved")
    ordered = _aligned(ordered)
    tmp = path.with_name(f".{path.name}.tmp")
    sources: dict[Path, int] = {}
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="layerstream-sha256") as hasher:
            staging = _Staging(fd, hasher)
            staging.put(memoryview(_header(ordered, metadata)))
            for e in ordered:
                if isinstance(e.source, (SourceTensor, PermutedSource)):
                    source = e.source if isinstance(e.source, SourceTensor) else e.source.source
                    if source.path not in sources:
                        sources[source.path] = os.open(source.path, os.O_RDONLY)
                    if isinstance(e.source, PermutedSource):
                        _copy_permuted(staging, e.source, sources[source.path])
                    else:
                        _copy_range(staging, e.source, sources[source.path])
                elif e.nbytes:
                    staging.put(memoryview(e.source.reshape(-1).view(torch.uint8).numpy()))
            staging.flush()
        _start_writeback(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
        for src_fd in sources.values():
            os.close(src_fd)
    os.replace(tmp, path)
    return staging.written, staging.digest.hexdigest()


_SYNC_FILE_RANGE_WRITE = 2
_libc: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _libc = ctypes.CDLL(None, use_errno=True)


def _start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages to disk without waiting (Linux sync_file_range),
    so the disk works while the next chunks are hashed. fdatasync per chunk would instead
    force a journal commit that stalls the other writers."""
    if _libc is None or not hasattr(_libc, "sync_file_range"):
        return
    _libc.sync_file_range(
        ctypes.c_int(fd),
        ctypes.c_int64(0),
        ctypes.c_int64(0),
        ctypes.c_uint(_SYNC_FILE_RANGE_WRITE),
    )  # advisory: an error here only means fdatasync in sync_files does all the work


def sync_files(paths: Iterable[Path]) -> None:
    """Make the files and their directory entries durable."""
    directories = set()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        directories.add(path.parent)
    for directory in directories:
        _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically and durably: temp file, fsync, rename, fsync the directory.
    The chunker writes the manifest this way after ``sync_files`` on every chunk, so a crash
    never leaves a manifest naming chunks that are not on disk."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_directory(path.parent)


def sha256_file(path: Path) -> str:
    """sha256 of a (small) side file: config, tokenizer files."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
