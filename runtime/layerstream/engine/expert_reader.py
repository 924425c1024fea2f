"""Expert streaming: a mixture-of-experts block is read as its base, then as the experts its
router chose.

A streamed block's buffer is laid out like its chunk file (format/parts.py). Its lease reads
the base (every byte outside the experts: header, attention, norms, router, shared experts)
like any block, ahead on an I/O thread; when the block's experts module is called, its
pre-forward hook (hooks.py) asks the lease for the routed experts, and the lease reads those
it has not read yet. Every request riding the install shares what was read, so each expert
is read at most once per install. An expert slice that was not read holds whatever the
buffer held before: transformers' experts implementations never touch an expert no token
was routed to (``poison`` fills such slices with NaN, which proves it in the tests).

Once the block's base is pinned and the plan has an expert cache, the experts it keeps
between installs lie in the block's home (expert_cache.py). An install computing in place
(placement.py) reads into the home and computes there, its pool buffer taken only as a
ticket that bounds the installs in flight (and so the experts read and not kept) as it
bounds them without homes; one copying computes in its buffer, the kept experts it routes
to copied in (while the missed ones are read), and those it reads that the cache keeps
copied home; but where the first experts an install routes to all lie kept in its home, it
computes there instead, with nothing to copy, until a later request on it routes to an
expert it lacks (``ExpertLease.missing``). While installs compute in place, the tickets'
memory is lent to the cache (``ExpertCache.lend``: the buffers whose pages are given back,
as the pool tells each time a buffer is taken), where every streamed block is such a
block of a plain store.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import torch

from ..errors import ChunkIntegrityError
from ..format.manifest import ChunkInfo
from ..format.parts import ChunkParts, Range, coalesce, span
from ..format.quantization import Quantization, aligned
from ..format.safetensors import ChunkSpec, TensorEntry, tensors_from_layout
from ..stores import CachingStore, ChunkStore, MappableStore, ReadResult
from ..stores.ranged import split
from .checks import ChunkChecks
from .expert_cache import POISON, ExpertCache, Home, Key, span_bytes
from .expert_plan import base_quantized
from .held import HeldLayout
from .placement import Placement
from .readers import Lease, PooledLease, PooledReader

log = logging.getLogger(__name__)
T = TypeVar("T")

PIECE = 1 << 20  # a local read of experts is split into reads of this size, run at once


@dataclass(frozen=True)
class PinnedBase:
    """A streamed block's base held for good, as a pinned chunk is held (held.py): its
    quantized tensors (fp8 attention weights) dequantized, without their stored values and
    scales; and where its expert tensors lie in the chunk."""

    version: str | None
    tensors: dict[str, torch.Tensor]
    experts: list[TensorEntry]
    nbytes: int  # the memory it holds
    dequantized: frozenset[str] = frozenset()  # keys of ``tensors`` held dequantized

    @classmethod
    def copy_of(
        cls,
        info: ChunkInfo,
        data: torch.Tensor,
        version: str | None,
        parts: ChunkParts,
        checks: ChunkChecks,
    ) -> PinnedBase:
        """From ``data``, a buffer holding the chunk's checked base at its file offsets."""
        layout = checks.layout(info, data, version)
        spec = checks.specs.get(info.name)
        expert_keys = {key for group in parts.groups for key in group.tensors}
        plan = HeldLayout.of(layout, spec, base_quantized(info), expert_keys)
        experts = [t for t in layout if t.key in expert_keys]
        tensors = plan.copy(data, spec)
        return cls(version, tensors, experts, plan.nbytes, frozenset(plan.dequantized))


def kept_bytes(spec: ChunkSpec, tensors: list[str]) -> int:
    """The memory the expert cache keeps of one expert of the group of ``tensors`` (``spec``:
    its chunk's): the pages of its slice of each tensor, a quantized one's dequantized,
    scales none."""
    scales = (
        {spec.quantization.scale_key(k) for k in spec.quantized} if spec.quantization else set()
    )
    total = 0
    for key in tensors:
        if key in scales:
            continue
        t = spec.quantized.get(key) or spec.tensors[key]
        total += span_bytes(math.prod(t.shape[1:]) * t.dtype.itemsize)
    return total


class QuantizedExperts:
    """A quantized block's tensors as its lease holds them: the stored values and scales
    (in its buffer, or its pinned base), each dequantized into room of its own: the base's
    when the lease is made, each expert's alone once read (every format's dequantization is
    per expert: format/quantization.py). Unread experts' rooms hold whatever was there,
    never read by the experts module. ``placed``: where the experts' plain tensors (biases)
    are computed on, when not where they are read (a home: each expert's copied there as it
    is dequantized)."""

    def __init__(
        self,
        quant: Quantization,
        stored: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        groups: list[list[str]],
        count: Callable[[float], None],
        placed: dict[str, torch.Tensor] | None = None,
    ):
        self.quant = quant
        self._stored = stored  # every tensor as stored: views of the buffer, or pinned
        self.targets = targets  # by quantized key: its dequantized tensor
        self._scale_keys = {quant.scale_key(k) for k in targets}
        plain = {k for tensors in groups for k in tensors} - set(targets) - self._scale_keys
        self._placed = {k: v for k, v in (placed or {}).items() if k in plain}
        # by group, its quantized keys, and all its keys in file order
        self._keys = [[k for k in tensors if k in targets] for tensors in groups]
        self._groups = groups
        self._count = count

    def dequantize_base(self) -> None:
        """The quantized tensors outside the experts (fp8 attention weights), whole."""
        in_groups = {key for keys in self._keys for key in keys}
        start = time.perf_counter()
        for key, target in self.targets.items():
            if key not in in_groups:
                weight, scales = self._stored[key], self._stored[self.quant.scale_key(key)]
                self.quant.dequantize(weight, scales, target.dtype, target)
        self._count(time.perf_counter() - start)

    def dequantize(self, group: int, experts: list[int]) -> None:
        start = time.perf_counter()
        for key in self._keys[group]:
            weight, scales = self._stored[key], self._stored[self.quant.scale_key(key)]
            target = self.targets[key]
            for e in experts:
                self.quant.dequantize(
                    weight[e : e + 1], scales[e : e + 1], target.dtype, target[e : e + 1]
                )
        for key in self._groups[group]:
            if key in self._placed:
                for e in experts:
                    self._placed[key][e].copy_(self._stored[key][e])
        self._count(time.perf_counter() - start)

    def kept(self, group: int, expert: int) -> list[torch.Tensor]:
        """What the expert cache keeps of ``expert`` of ``group``, as flat bytes: its
        dequantized slices and its plain tensors' stored ones (its scales are spent)."""
        views = []
        for key in self._groups[group]:
            if key in self._scale_keys:
                continue
            tensor = self.targets.get(key)
            if tensor is None:
                tensor = self._placed.get(key, self._stored[key])
            views.append(tensor[expert].reshape(-1).view(torch.uint8))
        return views

    def views(self) -> dict[str, torch.Tensor]:
        """The block's tensors: the dequantized ones in place of the stored ones and
        their scales."""
        out = {**self._stored, **self._placed}
        for key, target in self.targets.items():
            del out[self.quant.scale_key(key)]
            out[key] = target
        return out


class ExpertLease(PooledLease):
    """A mixture-of-experts block's buffer: its base read, its experts read on demand or
    ahead of demand (``prefetch``, on a guess of what the router will choose)."""

    def __init__(
        self,
        index: int,
        info: ChunkInfo,
        version: str | None,
        data: torch.Tensor,
        buffer: torch.Tensor,
        reader: ExpertReader,
        parts: ChunkParts,
        pinned: PinnedBase | None = None,
        quantized: QuantizedExperts | None = None,
        home: Home | None = None,
        in_place: bool = False,
    ):
        super().__init__(index, info, version, data, buffer, reader)
        self.parts = parts
        self.pinned = pinned  # its base in memory of its own (else read into the buffer)
        self.quantized = quantized
        self.home = home  # its block's home, which it alone writes into while it holds it
        # ``data`` lies in the home (the buffer is a ticket); else in the buffer, into which
        # kept experts are copied, and from which those the cache keeps are copied home
        self.in_place = in_place
        # in place, a plain block's tensors are its home's, the same views each install:
        # they stay bound between installs (binding them costs more than a block's routing)
        self.kept = in_place and pinned is not None and quantized is None
        self.used: list[Key] = []  # the experts it uses where its home holds them
        # the chunk's homes spoiled so far: one more by the time it has run, and the kept
        # experts it computed with or copied may hold another version's bytes
        self.spoiled = reader.spoiled(info.name)
        self._experts = reader
        # the inference mode it was made in (a request's, or an I/O thread's none): its
        # tensors take writes in that mode alone, so reads on other threads run in it
        self.inference = torch.is_inference_mode_enabled()
        self._lock = threading.Lock()
        self._loaded: list[set[int]] = [set() for _ in parts.groups]
        # experts being read, by group: the future of the read that brings each
        self._pending: list[dict[int, Future[None]]] = [{} for _ in parts.groups]
        self._predicted: list[set[int]] = [set() for _ in parts.groups]
        self._routed: list[set[int]] = [set() for _ in parts.groups]
        self._closing = False
        self.changed = False  # a read found another version of the chunk than its base's
        # binds new tensors of the block in its module (set by the block's hook at install)
        self.rebind: Callable[[dict[str, torch.Tensor]], None] | None = None
        self._routing_seen = False
        self._moved = False  # computing in its home since its first routing (_move_home)

    def _views(self) -> dict[str, torch.Tensor]:
        if self.quantized is not None:  # the experts read, dequantized as they arrived
            return self.quantized.views()
        if self.pinned is None:
            return super()._views()
        if not self.kept:
            return self._pinned_views()
        # in place: its home's views, made once and bound until replaced
        assert self.home is not None
        if self.home.tensors is None:
            # normal tensors, whatever mode this request runs in: a later install may bind
            # them (as Parameters) in another
            with torch.inference_mode(False):
                self.home.tensors = self._pinned_views()
        return self.home.tensors

    def _pinned_views(self, data: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The pinned base's tensors and the experts' views of ``data`` (``_data``)."""
        data = self._data if data is None else data
        assert self.pinned is not None and data is not None
        return {**self.pinned.tensors, **tensors_from_layout(self.pinned.experts, data)}

    def confirm(self) -> None:
        """After the block has run: every request that ran it fails if a read into its
        buffer found the chunk changed, or a read into its home failed meanwhile (its bytes
        may mix two versions)."""
        if self.changed or self._experts.spoiled(self.info.name) != self.spoiled:
            raise ChunkIntegrityError(
                f"chunk {self.info.name} ({self.info.file}) changed while its block ran, so "
                "this request's output cannot be trusted; retry it. Replace chunk files by "
                "rename (as the chunker does), never rewrite them in place"
            )

    def missing(self, group: int, experts: list[int]) -> bool:
        """Whether any of ``experts`` (the router's choice) is not read yet; counted for
        the precision and recall of the guesses."""
        cache = self._experts.cache
        if cache is not None:
            cache.routed(self.info.name, group, experts)
        with self._lock:
            self._routed[group].update(experts)
            loaded = self._loaded[group]
            if not self._routing_seen:
                self._routing_seen = True
                self._move_home(group, experts)
            elif self._moved and any(e not in loaded for e in experts):
                self._move_back()
            return any(e not in loaded for e in experts)

    def _move_home(self, group: int, experts: list[int]) -> None:
        """(Under the lock, at its first routing: no experts module has run on it yet) a
        copying install whose routed experts all lie kept in its home computes there
        instead of copying them into its buffer (a hit copied costs a copy, one where it
        lies nothing)."""
        home, cache = self.home, self._experts.cache
        if self.in_place or home is None or cache is None or self.rebind is None:
            return
        if self.quantized is not None or self.pinned is None:
            return
        if any(self._loaded) or any(self._pending):  # read into the buffer already
            return
        keys = [(self.info.name, group, e) for e in experts]
        if not keys or not all(cache.holds(key, self.version) for key in keys):
            return
        taken = []
        for key in keys:
            if cache.use(key, self.version) is None:  # replaced since: it copies after all
                cache.done(taken)
                return
            taken.append(key)
        try:
            self._bind(home.buffer[: self.info.bytes])
        except BaseException:
            cache.done(taken)
            raise
        self.used.extend(taken)
        self._loaded[group].update(experts)
        self.in_place = self._moved = True
        self._experts.checks.count_cache_hits(len(keys))

    def _move_back(self) -> None:
        """(Under the lock) a request on a moved install routes to an expert it lacks: the
        install goes back to its buffer, the experts it computes with copied there first,
        so whoever computes meanwhile finds the same values wherever its views point; the
        expert is then read into the buffer, not into fresh pages of the home."""
        assert self._data is not None
        buffer = self._buffer[: self.info.bytes]
        for g, loaded in enumerate(self._loaded):
            for e in loaded:
                self._experts._copy(_kept(self, buffer, g, e), _kept(self, self._data, g, e))
        self._bind(buffer)
        self.in_place = self._moved = False

    def _bind(self, data: torch.Tensor) -> None:
        """(Under the lock) the block's module computes on ``data`` (its buffer or its home,
        laid out like the chunk) from now on; a bind that fails leaves the views as they
        were."""
        assert self.rebind is not None
        views = self._pinned_views(data)
        try:
            self.rebind(views)
        except BaseException:
            self.rebind(self.tensors)  # back as they were: every rider sees one layout
            raise
        self._data, self.tensors = data, views

    def _claim(self, group: int, experts: list[int]) -> tuple[list[int], Future[None] | None]:
        """(Under the lock) those of ``experts`` nobody has read or is reading, marked as
        being read by the returned future."""
        loaded, pending = self._loaded[group], self._pending[group]
        mine = [e for e in experts if e not in loaded and e not in pending]
        if not mine:
            return [], None
        future: Future[None] = Future()
        for e in mine:
            pending[e] = future
        return mine, future

    def _read(self, group: int, experts: list[int], future: Future[None]) -> None:
        """Read ``experts`` (claimed by ``future``) and settle the future either way."""
        try:
            if self._data is None or self._closing:
                raise RuntimeError(f"block {self.index}'s lease was released before it ran")
            self._experts.read_experts(self, self._data, group, experts)
        except BaseException as exc:
            self._settle(group, experts, future, exc)
            raise
        self._settle(group, experts, future, None)

    def _settle(
        self, group: int, experts: list[int], future: Future[None], error: BaseException | None
    ) -> None:
        with self._lock:
            pending = self._pending[group]
            for e in experts:
                if pending.get(e) is future:
                    del pending[e]
            if error is None:
                self._loaded[group].update(experts)
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    def ensure(self, group: int, experts: list[int]) -> None:
        """Have ``experts`` (of experts module ``group``) read. Requests sharing the install
        call it at once: each expert is read by one of them (or by a prefetch) and waited
        for by the others. An expert whose read failed for someone else is read again."""
        while True:
            with self._lock:
                if self._data is None:
                    raise RuntimeError(f"block {self.index}'s lease was released before it ran")
                mine, future = self._claim(group, experts)
                pending = self._pending[group]
                others = {pending[e] for e in experts if e in pending and pending[e] is not future}
            if future is not None:
                self._read(group, mine, future)
            wait(others)
            if all(not f.cancelled() and f.exception() is None for f in others):
                return

    def prefetch(self, group: int, experts: list[int]) -> None:
        """Start reading ``experts`` (a guess of the router's choice) on the reader's
        prefetch threads; a failed guess read is left for ``ensure`` to read again."""
        with self._lock:
            if self._data is None or self._closing:
                return
            mine, future = self._claim(group, experts)
            self._predicted[group].update(mine)  # read on the guess: counted for precision
        if future is not None:
            self._experts.submit_prefetch(partial(self._quiet_read, group, mine, future))

    def _quiet_read(self, group: int, experts: list[int], future: Future[None]) -> None:
        try:
            _in_mode(self.inference, partial(self._read, group, experts, future))
        except Exception as exc:  # the block's own ensure reads them again, and raises
            log.debug("prefetch of block %d's experts failed: %s", self.index, exc)

    def _give_back(self) -> None:
        # a prefetch still writing into the buffer must end before the buffer is reused
        with self._lock:
            self._closing = True
            pending = {f for group in self._pending for f in group.values()}
        wait(pending)
        predicted = used = routed = 0
        for guess, chosen in zip(self._predicted, self._routed, strict=True):
            if guess:
                predicted += len(guess)
                used += len(guess & chosen)
                routed += len(chosen)
        if predicted:
            self._experts.checks.count_predictions(predicted, used, routed)
        if self.home is not None:
            self._experts.leave_home(self)
        super()._give_back()


class ExpertReader(PooledReader):
    """A ``PooledReader`` that reads the blocks in ``parts`` as base + routed experts."""

    def __init__(
        self,
        store: ChunkStore,
        checks: ChunkChecks,
        buffers: int,
        buffer_bytes: int,
        parts: dict[str, ChunkParts],
        poison: bool = False,
        threads: int = 4,
        evict: Callable[[str], None] | None = None,
        cache: ExpertCache | None = None,
        dequantized: int = 0,
        placement: Placement | None = None,
        lend: bool = False,
    ):
        super().__init__(store, checks, buffers, buffer_bytes, dequantized)
        self.parts = parts
        self.bases: dict[str, PinnedBase] = {}  # by chunk name
        self.cache = cache
        self.placement = placement or Placement()
        self.poison = poison
        # where the page cache cannot hold the chunks anyway, a local store's parts are read
        # past it (O_DIRECT: no copy, no cache to fill and then reclaim; what lands beside a
        # part is the file's own bytes, stores/local.py); else, with a cache that could hold
        # them, they are copied and their cached pages kept
        self._direct = evict is not None and isinstance(store, MappableStore)
        self._evict = evict
        self._threads = max(threads, 1)
        self._pool = (
            ThreadPoolExecutor(self._threads, thread_name_prefix="layerstream-experts")
            if isinstance(store, (MappableStore, CachingStore)) and self._threads > 1
            else None
        )
        # guessed experts are read here, each guess's reads split over the pool above; its
        # own threads, since a guess waits on the pool's (one pool would deadlock)
        self._prefetch = ThreadPoolExecutor(2, thread_name_prefix="layerstream-prefetch")
        # a copying install's missed experts are read here while its kept ones are copied
        self._misses = ThreadPoolExecutor(
            max(self._threads // 4, 2), thread_name_prefix="layerstream-misses"
        )
        self._homes: dict[str, Home] = {}  # by chunk name, made at a block's first install
        self._spoiled: dict[str, int] = {}  # by chunk name: reads into its home that failed
        self._homes_lock = threading.Lock()
        # the buffers hold nothing while blocks compute in place: the memory of those whose
        # pages are given back is the cache's (``lend``: every streamed block an expert
        # block of a plain store), taken back as a buffer is taken whole
        if lend and cache is not None and cache.slots and not dequantized:
            slot = cache.slot_bytes
            self.pool.on_taken = lambda unwritten: cache.lend(unwritten // slot)
            cache.lend(self.pool.unwritten() // slot)

    def submit_prefetch(self, read: Callable[[], None]) -> None:
        self._prefetch.submit(read)

    def lease(self, j: int, info: ChunkInfo) -> Lease:
        parts = self.parts.get(info.name)
        if parts is None:  # a dense block of a mixture-of-experts model
            return super().lease(j, info)
        pinned = self.bases.get(info.name)
        if self.cache is not None:
            self.cache.tick()
        home = self._enter_home(info) if pinned is not None else None
        in_place = home is not None and self.placement.in_place
        quantized_chunk = self.checks.quantization(info) is not None
        try:
            if not in_place:
                buffer = self.pool.acquire()
            else:
                # the buffer is a ticket: what it held (a block read before the base was
                # pinned, a dense block) goes back, so the home's experts take its place; a
                # quantized chunk's stored bytes are still read into it (they are spent
                # once dequantized: written again and again, its pages stay)
                buffer = self.pool.ticket(self._dequantized_at if quantized_chunk else 0)
        except BaseException:
            self._free_home(home)
            raise
        try:
            if home is not None and in_place:
                at = aligned(info.bytes)
                stored_in = buffer if quantized_chunk else home.buffer
                data, room = stored_in[: info.bytes], home.buffer[at:]
            else:
                data = buffer[: info.bytes]
                room = buffer[self._dequantized_at : self._dequantized_at + info.dequantized_room]
                if self.poison:
                    data.fill_(POISON)
                    room.fill_(POISON)
            # its base in memory already (pinned): only its experts are read
            version = pinned.version if pinned else self._read_base(info, data, parts)
            placed = home.buffer[: info.bytes] if home is not None and in_place else None
            quantized = self._quantized(info, parts, data, version, pinned, room, placed)
        except BaseException:
            self._free_home(home)
            self.pool.release(buffer)
            raise
        return ExpertLease(
            j, info, version, data, buffer, self, parts, pinned, quantized, home, in_place
        )

    def _enter_home(self, info: ChunkInfo) -> Home | None:
        """``info``'s home, made busy for a lease; None without an expert cache, or while
        another lease of the same block (a read-ahead that wrapped around) holds it."""
        if self.cache is None or not self.cache.slots:
            return None
        with self._homes_lock:
            home = self._homes.get(info.name)
            if home is None:
                size = aligned(info.bytes) + info.dequantized_room
                home = self._homes[info.name] = Home(info.name, size, self.poison, self.placement)
            if home.busy:
                return None
            home.busy = True
            return home

    def leave_home(self, lease: ExpertLease) -> None:
        """``lease`` has run: the experts it read and the cache did not keep leave its
        home."""
        assert self.cache is not None and lease.home is not None
        try:
            self.cache.done(lease.used)
        finally:
            self._free_home(lease.home)

    def _free_home(self, home: Home | None) -> None:
        if home is not None:
            with self._homes_lock:
                home.busy = False

    def spoiled(self, chunk: str) -> int:
        return self._spoiled.get(chunk, 0)

    def _spoil(self, chunk: str) -> None:
        """A read past the page cache into ``chunk``'s home failed: such a read writes the
        file's bytes beside its part, on pages kept neighbours lie on, and the file may
        have changed or be damaged there. Its kept experts are forgotten, and every install
        that computed with or copied one meanwhile fails (``confirm``)."""
        assert self.cache is not None
        with self._homes_lock:
            self._spoiled[chunk] = self.spoiled(chunk) + 1
        self.cache.forget(chunk)

    def _quantized(
        self,
        info: ChunkInfo,
        parts: ChunkParts,
        data: torch.Tensor,
        version: str | None,
        pinned: PinnedBase | None,
        room: torch.Tensor,
        placed: torch.Tensor | None = None,
    ) -> QuantizedExperts | None:
        """A quantized chunk's tensors as its lease holds them, its base's dequantized now
        (on this reading thread), its experts' as each is read; None for a plain chunk.
        ``placed``: a home (laid out like ``data``), where its experts' plain tensors are
        computed on."""
        quant = self.checks.quantization(info)
        if quant is None:
            return None
        targets = self.checks.dequantized_targets(info, room)
        if pinned is not None:  # its base's quantized tensors are held dequantized
            stored = {**pinned.tensors, **tensors_from_layout(pinned.experts, data)}
            targets = {k: v for k, v in targets.items() if k not in pinned.dequantized}
        else:
            stored = tensors_from_layout(self.checks.layout(info, data, version), data)
        homed = None if placed is None or pinned is None else pinned.experts
        quantized = QuantizedExperts(
            quant,
            stored,
            targets,
            [group.tensors for group in parts.groups],
            self.checks.count_dequantize,
            None if homed is None else tensors_from_layout(homed, placed),
        )
        quantized.dequantize_base()
        return quantized

    def _read_base(self, info: ChunkInfo, data: torch.Tensor, parts: ChunkParts) -> str | None:
        base = [("its base", parts.base, parts.base_sha256)]
        return self.checks.refetching(info, lambda: self._read(info, data, parts.base, base, 0))

    def pin_base(self, info: ChunkInfo) -> PinnedBase:
        """Read ``info``'s base and keep it in memory of its own, for good: its block's
        leases then read only experts."""
        parts = self.parts[info.name]
        buffer = self.pool.acquire()
        try:
            data = buffer[: info.bytes]
            version = self._read_base(info, data, parts)
            pinned = PinnedBase.copy_of(info, data, version, parts, self.checks)
        finally:
            self.pool.release(buffer)
        self.bases[info.name] = pinned
        return pinned

    def read_experts(
        self, lease: ExpertLease, data: torch.Tensor, group: int, experts: list[int]
    ) -> None:
        """``experts`` of ``group`` into ``data``: those the cache holds are used where they
        lie (in place) or copied from there; the others are read and checked (a quantized
        block's dequantized as read) and offered to the cache."""
        if self.cache is None:
            self._read_missed(lease, data, group, experts)
        elif lease.in_place:
            self._read_in_place(lease, data, group, experts)
        else:
            self._read_copying(lease, data, group, experts)

    def _read_in_place(
        self, lease: ExpertLease, data: torch.Tensor, group: int, experts: list[int]
    ) -> None:
        home, cache = lease.home, self.cache
        assert home is not None and cache is not None
        name, ours = lease.info.name, lease.version
        missed = []
        for e in experts:
            if cache.use((name, group, e), ours) is not None:
                with lease._lock:
                    lease.used.append((name, group, e))
            else:
                missed.append(e)
        self._found(len(experts) - len(missed), len(missed))
        if not missed:
            return
        # every page of the home a read, a dequantization or a copy writes is held first
        # (expert_cache.Home); a quantized chunk's stored bytes go to the buffer
        kept = {e: _kept(lease, data, group, e) for e in missed}
        written = [v for views in kept.values() for v in views]
        cache.reserve(len(missed))  # room made for them in the homes first
        added = 0
        try:
            home.hold(written)
            try:
                version = self._read_missed(lease, data, group, missed)
            except BaseException:
                home.release(written)
                if self._direct:  # it may have written beside its parts
                    self._spoil(lease.info.name)
                raise
            for e in missed:
                key = (name, group, e)
                cache.add(key, version, home, kept[e])
                added += 1
                with lease._lock:
                    lease.used.append(key)
        finally:
            cache.unreserve(len(missed) - added)  # those nothing holds

    def _read_copying(
        self, lease: ExpertLease, data: torch.Tensor, group: int, experts: list[int]
    ) -> None:
        cache = self.cache
        assert cache is not None
        name, ours = lease.info.name, lease.version
        found: dict[int, list[torch.Tensor]] = {}
        missed = []
        for e in experts:
            kept = cache.use((name, group, e), ours)
            if kept is None:
                missed.append(e)
            else:
                found[e] = kept
        self._found(len(found), len(missed))
        # the misses' read starts first, and the kept experts are copied while the store
        # delivers it (a copy takes a fraction of a read: docs/benchmarks.md)
        reading = None
        try:
            if missed and found:
                read = partial(self._read_missed, lease, data, group, missed)
                reading = self._misses.submit(_in_mode, lease.inference, read)
            for e, kept in found.items():
                self._copy(_kept(lease, data, group, e), kept)
        finally:
            cache.done([(name, group, e) for e in found])
            if reading is not None:
                wait([reading])  # it writes into the buffer: it ends before anything else
        if not missed:
            return
        version = (
            reading.result()
            if reading is not None
            else self._read_missed(lease, data, group, missed)
        )
        home = lease.home
        if home is None:  # another lease of the block holds it
            return
        for e in missed:
            views = _kept(lease, data, group, e)
            theirs = self._in_home(home, data, lease.info, views)
            cache.offer((name, group, e), version, home, theirs, partial(self._copy, theirs, views))

    def _found(self, hits: int, misses: int) -> None:
        if hits:
            self.checks.count_cache_hits(hits)
        self.placement.read(hits, misses)

    def _copy(self, targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
        start = time.perf_counter()
        for target, source in zip(targets, sources, strict=True):
            target.copy_(source)
        self.placement.copied(sum(t.numel() for t in targets), time.perf_counter() - start)

    def _in_home(
        self, home: Home, data: torch.Tensor, info: ChunkInfo, views: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Where ``views`` (flat bytes of a buffer holding ``info``'s chunk at ``data``) lie
        in its block's home: the chunk's bytes at the same offsets, the dequantized room
        after them."""
        base, size = data.data_ptr(), info.bytes
        moved = aligned(size) - self._dequantized_at  # the room's offset, home less buffer
        out = []
        for view in views:
            offset = view.data_ptr() - base
            if offset >= size:
                offset += moved
            out.append(home.buffer[offset : offset + view.numel()])
        return out

    def _read_missed(
        self, lease: ExpertLease, data: torch.Tensor, group: int, experts: list[int]
    ) -> str | None:
        """Read ``experts`` and dequantize them where stored quantized."""
        version = self._read_experts(lease, data, group, experts)
        if lease.quantized is not None:
            lease.quantized.dequantize(group, experts)
        return version

    def _read_experts(
        self, lease: ExpertLease, data: torch.Tensor, group: int, experts: list[int]
    ) -> str | None:
        info, parts = lease.info, lease.parts
        module = parts.groups[group]
        checked = [
            (f"expert {e} of {module.module}", parts.experts[group][e], module.sha256[e])
            for e in experts
        ]
        ranges = coalesce([r for _, rs, _ in checked for r in rs])
        version = self.checks.refetching(
            info, lambda: self._read(info, data, ranges, checked, len(experts))
        )
        if lease.version is not None and version != lease.version:
            # the base came from another version of the file (replaced or rewritten since);
            # a read past the page cache also wrote that version's bytes beside its parts,
            # into experts other requests on this install may be computing with: all fail
            lease.changed = True
            if lease.pinned is not None:
                raise ChunkIntegrityError(
                    f"chunk {info.name} ({info.file} in {self.store.uri}) changed after its "
                    "non-expert part was loaded, so its experts no longer match it: reload "
                    "the model. Replace a served model's chunks as a new model version"
                )
            raise ChunkIntegrityError(
                f"chunk {info.name} ({info.file} in {self.store.uri}) changed while its block "
                "ran, so this request's output cannot be trusted; retry it. Replace chunk "
                "files by rename (as the chunker does), never rewrite them in place"
            )
        return version

    def _read(
        self,
        info: ChunkInfo,
        data: torch.Tensor,
        ranges: list[Range],
        checked: list[tuple[str, list[Range], str]],
        experts: int,
    ) -> str | None:
        start = time.perf_counter()
        got = self._fetch(info, memoryview(data.numpy()), ranges, checked)
        if self._evict is not None:  # cheap after a direct read, which cached nothing
            self._evict(info.file)
        self.checks.check_parts(info, data, got.version, start, checked, experts, got.verified)
        return got.version

    def _fetch(
        self,
        info: ChunkInfo,
        view: memoryview,
        ranges: list[Range],
        checked: list[tuple[str, list[Range], str]],
    ) -> ReadResult:
        """The ranges into ``view``: through a disk cache part by part (each kept under its
        digest); from a local file in PIECE-sized reads at once (a disk delivers its
        bandwidth only to several reads in flight); remote stores fetch their parts in
        parallel themselves."""
        store = self.store
        if isinstance(store, CachingStore):
            calls = [
                partial(store.read_part, info.file, view, part, info.bytes, digest)
                for _, part, digest in checked
            ]
        elif isinstance(store, MappableStore):
            read = partial(store.read_ranges, info.file, view, size=info.bytes, direct=self._direct)
            if self._pool is None or span(ranges) <= PIECE:
                return read(ranges)
            pieces = split(ranges, PIECE)
            calls = [
                partial(read, pieces[i :: self._threads])
                for i in range(min(self._threads, len(pieces)))
            ]
        else:
            return store.read_ranges(info.file, view, ranges, info.bytes)
        if self._pool is None or len(calls) == 1:
            results = [call() for call in calls]
        else:
            futures = [self._pool.submit(call) for call in calls]
            wait(futures)  # every read ends before the buffer can be reused, even on failure
            results = [future.result() for future in futures]
        versions = {r.version for r in results}
        version = versions.pop() if len(versions) == 1 else None  # changed meanwhile: hashed
        verified = all(r.verified for r in results)
        return ReadResult(sum(r.size for r in results), version, verified)

    def close(self) -> None:
        self._prefetch.shutdown(wait=True)
        self._misses.shutdown(wait=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._homes.clear()  # each unmapped once no tensor views it
        super().close()


def _in_mode(inference: bool, call: Callable[[], T]) -> T:
    """``call`` on this thread in a lease's inference mode (``ExpertLease.inference``): it
    writes into the lease's tensors, which torch lets only that mode write to in place."""
    with torch.inference_mode(inference):
        return call()


def _kept(lease: ExpertLease, data: torch.Tensor, group: int, expert: int) -> list[torch.Tensor]:
    """What the expert cache keeps of an expert, as flat views of where the lease holds it:
    its byte ranges, or a quantized block's dequantized slices and plain ones."""
    if lease.quantized is not None:
        return lease.quantized.kept(group, expert)
    ranges = lease.parts.experts[group][expert]
    return [data[offset : offset + length] for offset, length in ranges]
