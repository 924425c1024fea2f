"""Every check a chunk's bytes pass before a tensor views them, in one place.

- the size, always; the sha256 as ``VerifyMode`` says (once per store version by default);
- a chunk that fails is read once more from the origin (``refetch_once``, also used for
  headers and side files), and one that still fails on a local store is recorded as damage
  in ``ChunkHealth``, which takes the model out of readiness;
- a chunk's safetensors header is parsed and checked against what its module needs once per
  version, not on every token.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from ..errors import ChunkIntegrityError
from ..format.manifest import ChunkInfo
from ..format.parts import Range, span, verify_part
from ..format.quantization import Quantization, aligned
from ..format.safetensors import (
    ChunkSpec,
    TensorEntry,
    check_layout,
    parse_layout,
    tensors_from_layout,
    verify,
)
from ..stores import CachingStore, ChunkStore, MappableStore
from ..words import Word
from .dequantization import Dequantization, Job
from .held import HeldLayout
from .stats import StreamStats

log = logging.getLogger(__name__)
T = TypeVar("T")


class VerifyMode(Word):
    """When a chunk's sha256 is checked (the ``verify_checksums`` setting)."""

    # the first time a chunk is read, and again whenever the store reports another version
    # of it (a local file rewritten in place); remote stores report no version, so bytes
    # that crossed a network are hashed on every read
    ONCE = "once"
    # every read: costs a core's worth of sha256 per streamed byte
    ALWAYS = "always"
    # sizes only (local stores only: serving's settings refuse it for remote ones)
    OFF = "off"

    @classmethod
    def parse(cls, value: str) -> VerifyMode:
        try:
            return cls(value)
        except ValueError:
            modes = ", ".join(mode.value for mode in cls)
            raise ValueError(f"verify_checksums must be one of {modes}") from None


class ChunkHealth:
    """Thread-safe record of verified chunk versions and of damaged chunks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._verified: dict[str, str] = {}  # chunk name -> store version whose sha256 passed
        # chunk name -> the error, and the store version found damaged (None: unknown)
        self._damaged: dict[str, tuple[ChunkIntegrityError, str | None]] = {}

    def is_verified(self, chunk: str, version: str | None) -> bool:
        with self._lock:
            return version is not None and self._verified.get(chunk) == version

    def passed(self, chunk: str, version: str | None) -> None:
        with self._lock:
            if version is not None:
                self._verified[chunk] = version
            self._damaged.pop(chunk, None)

    def part_passed(self, chunk: str, version: str | None) -> None:
        """A part of ``chunk`` passed its check (expert streaming): a chunk found damaged
        is whole again once a part of another version of its file passes (the damaged
        version's other parts are not vouched for by this one)."""
        with self._lock:
            damaged = self._damaged.get(chunk)
            if damaged is not None and version is not None and damaged[1] != version:
                del self._damaged[chunk]

    def failed(self, chunk: str, error: ChunkIntegrityError, version: str | None = None) -> None:
        """``chunk`` (at store ``version``) is damaged in the store (not in transit): the
        model is unusable until a verified version of it replaces it (or the model is
        reloaded)."""
        with self._lock:
            self._verified.pop(chunk, None)
            first = not self._damaged
            self._damaged[chunk] = (error, version)
        if first:
            log.error("model unusable, no longer ready: %s", error.message)

    @property
    def damage(self) -> ChunkIntegrityError | None:
        with self._lock:
            return next((error for error, _ in self._damaged.values()), None)

    def damaged(self) -> dict[str, str | None]:
        """Each damaged chunk and the store version found damaged (None: unknown)."""
        with self._lock:
            return {chunk: version for chunk, (_, version) in self._damaged.items()}


def refetch_once(
    store: ChunkStore,
    name: str,
    read: Callable[[], T],
    on_retry: Callable[[ChunkIntegrityError], None] | None = None,
) -> T:
    """``read()``; if its bytes fail an integrity check (corrupted in transit, a damaged
    disk-cache entry), drop any cached copy of ``name`` and read once more from the origin,
    then give up."""
    try:
        return read()
    except ChunkIntegrityError as exc:
        log.warning("%s; reading %s once more from %s", exc.message, name, store.uri)
        if isinstance(store, CachingStore):
            store.invalidate(name)
        if on_retry is not None:
            on_retry(exc)
    return read()


class ChunkChecks:
    """Checks chunk bytes for the readers (on any thread) and counts what they read."""

    def __init__(
        self,
        store: ChunkStore,
        mode: VerifyMode,
        specs: dict[str, ChunkSpec],
    ):
        self.store = store
        self.mode = mode
        self.specs = specs  # what each chunk must hold (from the model built on meta)
        self.stats = StreamStats()
        self.health = ChunkHealth()
        self._lock = threading.Lock()  # the I/O threads count into ``stats`` too
        self._apart = threading.local()  # set on a thread whose reads count apart
        # chunk name -> (store version, parsed header): a streamed block's header is parsed
        # once, not on every token (less Python on the I/O thread, less GIL for compute)
        self._layouts: dict[str, tuple[str, list[TensorEntry]]] = {}
        # (chunk name, part) -> store version whose sha256 passed: with verify "once", a
        # part read alone is hashed once per version too
        self._parts_verified: dict[tuple[str, str], str] = {}

    def check(
        self,
        info: ChunkInfo,
        data: torch.Tensor,
        version: str | None,
        start: float,
        verified: bool = False,
        always: bool = False,
    ) -> None:
        """Count a read and check its bytes: the size always, the sha256 unless the store
        verified them (``verified``) or this version of the file passed before (``always``
        overrides that: for a copy made after the file was checked)."""
        read_done = time.perf_counter()
        must = always and self.mode is not VerifyMode.OFF
        if (
            data.numel() != info.bytes
            or must
            or (not verified and self._must_verify(info, version))
        ):
            verify(info, data, self.store.uri)
            self.health.passed(info.name, version)
            with self._lock:
                self.stats.chunks_verified += 1
        with self._lock:
            if self._counted_apart(data.numel()):
                return
            self.stats.bytes_read += data.numel()
            self.stats.chunks_read += 1
            self.stats.read_s += read_done - start

    def _counted_apart(self, size: int) -> bool:
        """The lock held: a read made inside ``counted_apart`` is counted there, alone."""
        if not getattr(self._apart, "on", False):
            return False
        self.stats.pinned_bytes_read += size
        return True

    @contextlib.contextmanager
    def counted_apart(self) -> Iterator[None]:
        """The reads this thread makes meanwhile count as ``pinned_bytes_read`` (the
        background fill's), not as bytes read for the requests in flight."""
        self._apart.on = True
        try:
            yield
        finally:
            self._apart.on = False

    def check_parts(
        self,
        info: ChunkInfo,
        data: torch.Tensor,
        version: str | None,
        start: float,
        parts: list[tuple[str, list[Range], str]],
        experts: int = 0,
        verified: bool = False,
    ) -> None:
        """Count a ranged read of ``info`` into ``data`` (laid out like the file) and check
        each (name, ranges, sha256) part it read, unless the store checked them
        (``verified``: the disk cache does) or this version of the whole chunk passed its
        check before. ``experts``: how many of the parts are experts (else the read is the
        chunk's base)."""
        read_done = time.perf_counter()
        if not verified and self._must_verify(info, version):
            for what, ranges, digest in parts:
                if self.mode is VerifyMode.ONCE and self._part_verified(info, what, version):
                    continue
                verify_part(info, what, data, ranges, digest)
                if version is not None:
                    with self._lock:
                        self._parts_verified[(info.name, what)] = version
        self.health.part_passed(info.name, version)
        got = sum(span(ranges) for _, ranges, _ in parts)
        with self._lock:
            if self._counted_apart(got):
                return
            self.stats.bytes_read += got
            self.stats.read_s += read_done - start
            if experts:
                self.stats.experts_read += experts
                self.stats.expert_bytes += got
            else:
                self.stats.chunks_read += 1

    def count_cache_hits(self, experts: int) -> None:
        """Experts found kept in memory (the expert cache) instead of read."""
        with self._lock:
            self.stats.expert_cache_hits += experts

    def count_predictions(self, predicted: int, used: int, routed: int) -> None:
        """A released install's guesses: experts read ahead on a guess, those of them its
        routers chose, and all its routers chose."""
        with self._lock:
            self.stats.experts_predicted += predicted
            self.stats.experts_predicted_used += used
            self.stats.experts_routed_predicted += routed

    def _part_verified(self, info: ChunkInfo, what: str, version: str | None) -> bool:
        with self._lock:
            return version is not None and self._parts_verified.get((info.name, what)) == version

    def _must_verify(self, info: ChunkInfo, version: str | None) -> bool:
        if self.mode is VerifyMode.OFF:
            return False
        if self.mode is VerifyMode.ALWAYS:
            return True
        return not self.health.is_verified(info.name, version)

    def dequantization(
        self,
        info: ChunkInfo,
        data: torch.Tensor,
        version: str | None,
        into: torch.Tensor | None = None,
    ) -> Dequantization | None:
        """The work of dequantizing the quantized tensors of ``data`` (checked bytes of
        ``info``) into ``into`` (bytes with ``info.dequantized_room``, each tensor on a
        64-byte boundary) or memory of their own; None for a plain chunk."""
        spec = self.specs.get(info.name)
        if spec is None or not spec.quantized:
            return None
        return self._dequantization(
            spec, tensors_from_layout(self.layout(info, data, version), data), into
        )

    def _dequantization(
        self, spec: ChunkSpec, views: dict[str, torch.Tensor], into: torch.Tensor | None
    ) -> Dequantization:
        quant = spec.quantization
        assert quant is not None
        targets = self._targets(spec, into) if into is not None else {}
        jobs = [
            Job(key, views[key], views[quant.scale_key(key)], want.dtype, targets.get(key), quant)
            for key, want in spec.quantized.items()
        ]
        return Dequantization(jobs, self.count_dequantize)

    def dequantized_targets(self, info: ChunkInfo, into: torch.Tensor) -> dict[str, torch.Tensor]:
        """Where each quantized tensor of ``info`` goes dequantized in ``into`` (bytes with
        ``info.dequantized_room``): by key, each from a 64-byte boundary."""
        spec = self.specs.get(info.name)
        return {} if spec is None else self._targets(spec, into)

    @staticmethod
    def _targets(spec: ChunkSpec, into: torch.Tensor) -> dict[str, torch.Tensor]:
        targets, offset = {}, 0
        for key, want in spec.quantized.items():
            size = math.prod(want.shape) * want.dtype.itemsize
            targets[key] = into[offset : offset + size].view(want.dtype).view(want.shape)
            offset = aligned(offset + size)
        return targets

    def quantization(self, info: ChunkInfo) -> Quantization | None:
        """How ``info``'s quantized tensors are stored (None for a plain chunk)."""
        spec = self.specs.get(info.name)
        return None if spec is None or not spec.quantized else spec.quantization

    def count_dequantize(self, seconds: float) -> None:
        with self._lock:
            self.stats.dequantize_s += seconds

    def tensors(
        self,
        info: ChunkInfo,
        data: torch.Tensor,
        version: str | None,
        dequantized: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Views of ``data`` (checked bytes of ``info``) as the tensors its header lists; a
        quantized chunk's with its ``dequantized`` tensors in place of the quantized ones
        and their scales (dequantized now if not given)."""
        tensors = tensors_from_layout(self.layout(info, data, version), data)
        spec = self.specs.get(info.name)
        if spec is None or not spec.quantized:
            return tensors
        if dequantized is None:
            dequantized = self._dequantization(spec, tensors, None).finish()
        assert spec.quantization is not None
        for key in spec.quantized:
            del tensors[spec.quantization.scale_key(key)]
        tensors.update(dequantized)
        return tensors

    def held(
        self, info: ChunkInfo, data: torch.Tensor, version: str | None
    ) -> dict[str, torch.Tensor]:
        """The tensors of ``data`` (checked bytes of quantized ``info``) to hold for good, in
        memory of their own, its quantized tensors dequantized without their values and
        scales (held.py): ``data`` is not kept. A plain chunk is held as ``tensors`` gives it."""
        spec = self.specs[info.name]
        layout = self.layout(info, data, version)
        return HeldLayout.of(layout, spec, list(spec.quantized)).copy(data, spec)

    def layout(self, info: ChunkInfo, data: torch.Tensor, version: str | None) -> list[TensorEntry]:
        """The tensors ``data`` (checked bytes of ``info``, header included) holds, checked
        against what the module needs once per version."""
        cached = self._layouts.get(info.name)
        if cached is None or version is None or cached[0] != version:
            layout = parse_layout(info, data)
            spec = self.specs.get(info.name)
            if spec is not None:
                check_layout(info, layout, spec)
            if version is not None:
                self._layouts[info.name] = (version, layout)
        else:
            layout = cached[1]
        return layout

    def refetching(self, info: ChunkInfo, read: Callable[[], T]) -> T:
        """``read()``, once more from the origin if its bytes fail their check; a local
        chunk that still fails is damaged in the store, and the model with it."""

        def counted(exc: ChunkIntegrityError) -> None:
            with self._lock:
                self.stats.refetches += 1

        try:
            return refetch_once(self.store, info.file, read, counted)
        except ChunkIntegrityError as exc:
            # read twice from a local file system and still wrong: the file itself is
            # damaged, not a transfer (remote stores are read afresh by the next request)
            if isinstance(self.store, MappableStore):
                self.health.failed(info.name, exc, self._version_now(info))
            raise

    def _version_now(self, info: ChunkInfo) -> str | None:
        assert isinstance(self.store, MappableStore)
        try:
            return self.store.version(info.file)
        except Exception:  # gone or unreadable: unknown, so no later version can tell it apart
            return None
