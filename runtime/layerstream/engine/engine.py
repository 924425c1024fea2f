"""One model, built from its chunk store, whose blocks are streamed while it runs.

transformers' own classes run unchanged on a meta skeleton: the non-block weights and the
pinned blocks are installed once, the other blocks are bound by a pre-forward hook and
unbound by a post-forward hook (hooks.py). The engine is ready once the non-block weights
are in: the pinned blocks arrive in the background meanwhile (fill.py). ``forward`` and
``generate`` (KV cache, sampling, masks, RoPE) are transformers' own, so any architecture
it can build from a config works.

Threading: each request runs on a thread of its own, inside ``request()``; the requests in
flight share every pass over the streamed blocks (sweeps.py). Store reads run on the
streamer's I/O threads.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from ..errors import ChunkIntegrityError, LayerStreamError, ManifestError, SettingsError
from ..format.manifest import MANIFEST_NAME, ChunkInfo, Manifest, WeightWrites
from ..format.parts import ChunkParts
from ..format.safetensors import ChunkSpec
from ..stores import CachingStore, ChunkStore, MappableStore
from ..units import format_size
from . import allocator, tuning
from .checks import ChunkChecks, VerifyMode
from .expert_cache import ExpertCache
from .expert_plan import base_quantized, expert_parts
from .expert_reader import ExpertReader, kept_bytes
from .experts import ExpertsModule, find_experts
from .fill import PinFill
from .guessing import GuessChoice
from .held import HeldSizes, held_bytes
from .hooks import (
    BlockBinding,
    BlockHook,
    PendingBlockHook,
    ResidentBlockHook,
    StreamedBlockHook,
)
from .integrity import (
    BackgroundVerifier,
    check_chunk_heads,
    check_config_fits_manifest,
    check_model_fits_manifest,
    chunk_specs,
)
from .mapped import MappedReader
from .placement import Placement
from .plan import ResidencyPlan, plan_residency, plan_with_bases, resolve_budget
from .prediction import ExpertPredictor
from .readers import BlockReader, PooledReader, ReaderKind, pick_reader
from .sidefiles import load_side_files
from .skeleton import (
    block_of,
    block_prefixes,
    build_skeleton,
    get_tensor,
    set_tensor,
    shared_state,
)
from .stats import StreamStats
from .streamer import WeightStreamer
from .sweeps import ComputeSlots, Rider, SweepGroup
from .writes import (
    DtypeMismatch,
    WritesEveryForward,
    forward_inputs,
    learn_weight_writes,
    served_only_resident,
)

log = logging.getLogger(__name__)


@dataclass
class EngineOptions:
    memory_budget: str | int = "auto"  # weights held in memory: bytes, '2GiB', '25%', 'auto'
    read_ahead: int | str = "auto"  # see tuning.py for what "auto" means
    io_threads: int | str = "auto"
    verify_checksums: str = "once"  # see checks.VerifyMode
    verify_in_background: bool = True  # hash streamed local chunks after load (integrity.py)
    reader: str = "auto"  # see readers.pick_reader
    compute_slots: int | str = "auto"  # requests computing at once; see tuning.compute_slots
    expert_streaming: str = "auto"  # see expert_plan.py
    # guess the next block's experts and read them ahead: always, never, or "auto" (where
    # passes timed both ways find it faster: guessing.py)
    expert_prefetch: bool | str = "auto"
    # blocks compute on the experts the cache keeps where they lie, or copy them into a
    # streaming buffer: always, never, or "auto" (whichever costs measured find cheaper:
    # placement.py)
    expert_cache_in_place: bool | str = "auto"
    # fill expert slices that were not read with NaN (tests: proves an unread one is unused)
    poison_unread_experts: bool = False
    # ready once the non-block weights are in; the pinned blocks are read in the background
    # (fill.py). False: ready once every pinned block is in memory
    pin_in_background: bool = True


@dataclass
class RequestContext:
    """One request on the engine: its rider in the sweeps and, once it has ended, its stats."""

    rider: Rider
    before: StreamStats  # the engine's counters when it started
    started: float = field(default_factory=time.perf_counter)
    stats: StreamStats = field(default_factory=StreamStats)

    def measure(self, now: StreamStats) -> StreamStats:
        """Its own block runs and waits; the store's reads while it was in flight (shared
        with the requests that rode the same sweeps)."""
        stats = now.since(self.before)
        rider = self.rider
        stats.resident_runs = rider.resident_runs
        stats.streamed_runs = rider.streamed_runs
        stats.wait_s = rider.wait_s
        stats.experts_routed = rider.experts_routed
        return stats


class Engine:
    """Built by the steps below in order; a step that fails undoes those before it, and
    ``close`` undoes them all (the ExitStack). The engine owns ``store``: it is closed with
    the engine, or when building it fails."""

    def __init__(self, store: ChunkStore, options: EngineOptions):
        started = time.perf_counter()
        allocator.fix_mmap_threshold()
        self.store = store
        self.options = options
        with contextlib.ExitStack() as stack:
            stack.callback(store.close)
            # a bad value: before the load
            self.guessing = GuessChoice(options.expert_prefetch)
            self.placement = Placement(options.expert_cache_in_place)
            self._read_manifest_and_side_files()
            self._build_skeleton()
            self._plan()
            self._check_streamed_heads()
            self.streamer = self._start_streamer()
            stack.callback(self.streamer.close)
            slots = ComputeSlots(tuning.compute_slots(options.compute_slots))
            self.sweeps = SweepGroup(self.streamer, slots)
            stack.callback(self.sweeps.close)
            self.fill = self._start_fill()
            if self.fill is not None:
                stack.callback(self.fill.close)
            self._load_weights()
            self.hooks = self._install_hooks()
            stack.callback(self._remove_hooks)
            self.verifier = self._start_verifier()
            if self.verifier is not None:
                stack.callback(self.verifier.close)
            self._write_once()
            self._closing = stack.pop_all()
        self._log_loaded(time.perf_counter() - started)

    # -- the steps ---------------------------------------------------------------------------
    def _read_manifest_and_side_files(self) -> None:
        store = self.store
        self.manifest = Manifest.from_json(
            store.read(MANIFEST_NAME), f"{store.uri}/{MANIFEST_NAME}"
        )
        if isinstance(store, CachingStore):  # it finds its entries by the manifest's digests
            store.expect(self.manifest)
        side = load_side_files(store, self.manifest)
        self.config = side.config
        self.tokenizer = side.tokenizer
        self.generation_config = side.generation_config
        check_config_fits_manifest(self.manifest, self.config)

    def _build_skeleton(self) -> None:
        self.model: PreTrainedModel = build_skeleton(
            self.config, self.manifest.architecture, self.manifest.dtype
        )
        self.prefixes = block_prefixes(self.model)
        self.sequential_only = shared_state(self.model)  # why requests must run one by one
        check_model_fits_manifest(self.manifest, self.model, self.prefixes)
        self.bindings = [BlockBinding(p, self.model.get_submodule(p)) for p in self.prefixes]
        self.specs: dict[str, ChunkSpec] = chunk_specs(
            self.model, self.manifest, self.prefixes, self.bindings
        )
        self.experts = {m.name: m for m in find_experts(self.model)}
        self.writes = self._find_weight_writes()

    def _find_weight_writes(self) -> WeightWrites:
        """What the model's forward writes of its weights (writes.py): learned by the
        chunker, or here for a store chunked before it did."""
        manifest = self.manifest
        if manifest.weight_writes is not None:
            if manifest.weight_writes.unchecked is not None:
                log.warning(
                    "%s: whether its forward writes to its weights is not known (%s)",
                    manifest.name,
                    manifest.weight_writes.unchecked,
                )
            return manifest.weight_writes
        try:
            return learn_weight_writes(self.config, manifest.architecture, manifest.dtype)
        except (WritesEveryForward, DtypeMismatch) as exc:
            raise SettingsError(str(exc)) from None

    def _check_writes_fit_plan(self) -> None:
        """A model that writes to its weights on its first forward keeps every block in
        memory (writes.py)."""
        writes, plan = self.writes, self.plan
        if not writes.first or len(plan.resident) == plan.n_blocks:
            return
        raise SettingsError(
            f"{served_only_resident(self.manifest.architecture, writes)}; a memory_budget of "
            f"{format_size(self.budget)} streams {plan.n_blocks - len(plan.resident)} of its "
            f"{plan.n_blocks} blocks. Set memory_budget to 100% "
            f"({format_size(self.held.total)})"
        )

    def _write_once(self) -> None:
        """The first forward's writes, made at load, once, before any request (writes.py)."""
        if not self.writes.first:
            return
        with self.request():
            self.model(**forward_inputs(self.model, "cpu"))
        log.info(
            "%s: its first forward, run at load, wrote to %d of its weights",
            self.manifest.name,
            len(self.writes.first),
        )

    def _plan(self) -> None:
        options = self.options
        shapes = {k: t for spec in self.specs.values() for k, t in spec.quantized.items()}
        self.held = HeldSizes.of(self.manifest, shapes)
        self.budget = resolve_budget(options.memory_budget, self.held.total)
        self.plan: ResidencyPlan = plan_residency(
            self.manifest, self.budget, tuning.read_ahead(options.read_ahead), held=self.held
        )
        self._check_writes_fit_plan()
        self.io_threads = tuning.io_threads(options.io_threads, self.plan.read_ahead)
        self.evict_after_use = tuning.evict_after_use(self.manifest, self.plan)
        # streamed chunks leave the page cache after use (the store's advice; local only)
        self._evict: Callable[[str], None] | None = (
            self.store.evict
            if self.evict_after_use and isinstance(self.store, MappableStore)
            else None
        )

    def _check_streamed_heads(self) -> None:
        """Check every streamed chunk's head; learn where the experts of each lie."""
        layouts = check_chunk_heads(
            self.store, self._streamed_chunks(), self.specs, max(self.io_threads, 4)
        )
        self.parts: dict[str, ChunkParts] = expert_parts(
            self.options.expert_streaming,
            self.manifest,
            self.experts,
            layouts,
            cache_holds_chunks=isinstance(self.store, MappableStore) and not self.evict_after_use,
        )
        if self.parts:
            self._plan_bases(layouts)

    def _plan_bases(self, layouts: dict[str, list]) -> None:
        """Plan again with the bases of the blocks with experts pinned first (plan.py); a
        block the first plan pinned whole may stream now, so every such chunk's head is
        checked."""
        manifest = self.manifest
        unread = [
            manifest.chunks[b.chunk]
            for b in manifest.blocks
            if manifest.chunks[b.chunk].experts is not None and b.chunk not in layouts
        ]
        layouts = layouts | check_chunk_heads(
            self.store, unread, self.specs, max(self.io_threads, 4)
        )
        parts = expert_parts("on", manifest, self.experts, layouts, cache_holds_chunks=False)
        bases = {}
        for j, block in enumerate(manifest.blocks):
            if block.chunk in parts:
                spec, info = self.specs[block.chunk], manifest.chunks[block.chunk]
                base = parts[block.chunk].base_bytes
                bases[j] = held_bytes(base, base_quantized(info), spec.quantized, spec.quantization)
        ahead = tuning.read_ahead_with_bases(self.options.read_ahead, self.options.expert_prefetch)
        self.plan = plan_with_bases(manifest, self.budget, ahead, bases, self.held)
        streamed = {manifest.blocks[j].chunk for j in self.plan.streamed}
        self.parts = {name: p for name, p in parts.items() if name in streamed}

    def _start_streamer(self) -> WeightStreamer:
        checks = ChunkChecks(
            self.store, VerifyMode.parse(self.options.verify_checksums), self.specs
        )
        quantized = self.manifest.quantization is not None
        kind = pick_reader(self.options.reader, self.store, checks.mode, quantized)
        plan = self.plan
        reader: BlockReader
        if self.parts:
            if self.options.reader == ReaderKind.MMAP:
                raise SettingsError(
                    "reader=mmap maps whole chunks, but expert streaming reads the routed "
                    "experts' byte ranges: set reader to auto or read, or expert_streaming=off"
                )
            reader = ExpertReader(
                self.store,
                checks,
                plan.pool_buffers,
                plan.buffer_bytes,
                self.parts,
                self.options.poison_unread_experts,
                # routed experts are read while the block waits, in pieces of a few hundred
                # KiB: many reads in flight (they wait on the disk, not on a core; 16 over 4
                # took qwen3-moe-2b cold from 342 to 281 ms/token, docs/benchmarks.md)
                threads=max(self.io_threads, 16),
                evict=self._evict,
                cache=self._expert_cache(),
                dequantized=plan.dequantized,
                placement=self.placement,
                # every streamed block reads its experts into its home when in place
                lend=set(plan.streamed) <= set(plan.pinned_bases),
            )
        elif kind is ReaderKind.MMAP and isinstance(self.store, MappableStore):
            reader = MappedReader(self.store, checks, plan.pool_buffers, self._evict)
        else:
            reader = PooledReader(
                self.store, checks, plan.pool_buffers, plan.buffer_bytes, plan.dequantized
            )
        streamer = WeightStreamer(reader, self.manifest, plan, self.io_threads)
        if self.parts and self.options.expert_prefetch is not False:
            self._start_predictor(streamer)
        return streamer

    def _start_predictor(self, streamer: WeightStreamer) -> None:
        """Guesses of the next block's experts, read into its lease ahead: a lease that
        exists only read ahead, so none at a budget without a read-ahead."""
        if not self.plan.read_ahead:
            (log.warning if self.options.expert_prefetch is True else log.info)(
                "expert prefetch off: no block is read ahead, so there is no lease to read "
                "guessed experts into (%s)",
                "its buffer holds the expert cache instead: set read_ahead to 1 for guesses"
                if self.plan.cache_over_read_ahead
                else "read_ahead is 0"
                if tuning.read_ahead(self.options.read_ahead) == 0
                else "the budget leaves no room for one: raise memory_budget",
            )
            return
        groups = {j: [m for _, m in self._block_experts(j)] for j in self.plan.streamed}
        predictor = ExpertPredictor(self.model, self.prefixes, groups)
        if not predictor.routers:
            log.info("expert prefetch off: found no router beside the experts modules")
            return
        streamer.predictor = predictor
        streamer.guessing = self.guessing

    def _expert_cache(self) -> ExpertCache | None:
        """The plan's expert cache, in slots of the largest expert as it keeps it (a
        quantized store's dequantized), on the pages it may lie on in its block's home."""
        if not self.plan.expert_cache:
            return None
        largest = max(
            kept_bytes(self.specs[name], group.tensors)
            for name, p in self.parts.items()
            for group in p.groups
        )
        return ExpertCache(self.plan.expert_cache, largest)

    def _streamed_chunks(self) -> list[ChunkInfo]:
        return self._chunks_of(self.plan.streamed)

    def _chunks_of(self, blocks: Iterable[int]) -> list[ChunkInfo]:
        return [self.manifest.chunks[self.manifest.blocks[j].chunk] for j in blocks]

    def _start_fill(self) -> PinFill | None:
        """The pinned blocks' reads, in the background from now on (fill.py); None where they
        are read before the engine is ready: so asked, or a model whose first forward, run
        at load, writes to its weights (it needs them all)."""
        self._pending: list[PendingBlockHook] = []
        plan = self.plan
        wanted = plan.resident or plan.pinned_bases
        if not (self.options.pin_in_background and wanted) or self.writes.first:
            return None
        # what a chunk read whole at load would have refused at once still refuses the load:
        # a chunk missing, of another size or of other tensors (its hash waits for its read)
        pinned = self._chunks_of(plan.resident)
        check_chunk_heads(self.store, pinned, self.specs, max(self.io_threads, 4))
        return PinFill(
            self.manifest,
            {j: plan.held[j] for j in sorted(plan.resident)},
            self._read_pinned,
            self.io_threads,
            plan.pinned_bases,
            self._pin_base_apart,
        )

    def _read_pinned(self, chunk: str) -> dict[str, torch.Tensor]:
        """A pinned block's chunk for the fill: its bytes are counted as
        ``pinned_bytes_read``, not as read for the requests in flight."""
        with self.streamer.counted_apart():
            return self.streamer.load_resident(chunk)

    def _pin_base_apart(self, j: int) -> None:
        with self.streamer.counted_apart():
            self.streamer.pin_base(j)

    @property
    def pinned_bytes(self) -> tuple[int, int]:
        """Bytes of the blocks the plan pins that are in memory, and of all it pins: equal
        once the background fill is complete."""
        plan = self.plan
        target = sum(plan.held[j] for j in plan.resident)
        target += sum(plan.pinned_bases.values())
        if self.fill is None:
            return target, target
        return self.fill.pinned_bytes, self.fill.target_bytes

    def _install_arrived(self, strict: bool = False) -> None:
        """Install every pinned block the fill has read since the last call (a block
        boundary where nobody computes: the sweeps' ``at_boundary``), and have the bases
        whose background read failed read again. A block that cannot be installed stays
        pending, its copy dropped: the request that needs it gets the error, not another
        (``strict``: the caller gets it)."""
        fill = self.fill
        assert fill is not None
        for hook in self._pending:
            if hook.pinned or (lease := fill.arrived(hook.index)) is None:
                continue
            try:
                hook.install(lease)
            except Exception:
                fill.forget(hook.index)
                if strict:
                    raise
                log.exception("installing pinned block %d failed", hook.index)
        self._pending = [h for h in self._pending if not h.pinned]
        fill.retry_bases()

    def wait_pinned(self) -> None:
        """Return once every block the plan pins is in memory and installed: requests run
        at the speed of the complete plan from then on (tests, benchmarks, a script that
        wants it before its first call). Raises the error of a block that cannot be read.
        Not from inside a request: it would wait for its own request to end."""
        fill = self.fill
        if fill is None:
            return
        if self.sweeps.current() is not None:
            raise RuntimeError("wait_pinned() cannot be called inside a request on this engine")
        fill.wait()
        self.sweeps.when_quiet(
            lambda: not self._pending or fill.closed, lambda: self._install_arrived(strict=True)
        )
        if fill.closed:
            raise RuntimeError("the engine was closed while waiting for its pinned blocks")

    def _load_weights(self) -> None:
        """Load the rest and, unless the fill reads them, the pinned blocks."""
        self._load_rest()
        for j in sorted(self.plan.resident if self.fill is None else ()):
            chunk = self.manifest.blocks[j].chunk
            self.bindings[j].bind(self.streamer.load_resident(chunk))
        for j in sorted(self.plan.pinned_bases if self.fill is None else ()):
            self.streamer.pin_base(j)
        self._check_materialised()

    def _load_rest(self) -> None:
        present: dict[str, torch.Tensor] = {}
        for chunk in self.manifest.rest:
            for key, tensor in self.streamer.load_resident(chunk).items():
                if block_of(key, self.prefixes) is not None:
                    raise ManifestError(f"non-block chunk {chunk} holds block tensor {key}")
                set_tensor(self.model, key, tensor)
                present[key] = tensor
        # Tied weights (lm_head = embeddings, T5's 4-way tie): one Parameter for the group.
        for group in self.manifest.tied:
            rest_keys = [k for k in group if block_of(k, self.prefixes) is None]
            source = next((k for k in rest_keys if k in present), None)
            if source is None:
                continue
            shared = get_tensor(self.model, source)
            for key in rest_keys:
                if key != source:
                    set_tensor(self.model, key, shared)

    def _check_materialised(self) -> None:
        missing = [
            key
            for key, value in [*self.model.named_parameters(), *self.model.named_buffers()]
            if value.device.type == "meta" and block_of(key, self.prefixes) is None
        ]
        if missing:
            raise ManifestError(
                f"the chunk store has no values for {missing[:5]}; re-run the chunker"
            )

    def _install_hooks(self) -> list[BlockHook]:
        hooks: list[BlockHook] = []
        for j, binding in enumerate(self.bindings):
            hook: BlockHook
            if j in self.plan.resident and self.fill is not None:
                hook = PendingBlockHook(j, binding, self.sweeps, self.fill)
            elif j in self.plan.resident:
                hook = ResidentBlockHook(j, binding, self.sweeps)
            else:
                hook = StreamedBlockHook(j, binding, self.sweeps, self._block_experts(j))
            hook.attach()
            hooks.append(hook)
        self.sweeps.hooks = [h if isinstance(h, StreamedBlockHook) else None for h in hooks]
        self._pending = [h for h in hooks if isinstance(h, PendingBlockHook)]
        if self.fill is not None:
            self.sweeps.at_boundary = self._install_arrived
            self.fill.on_arrival = self._install_arrived_if_quiet
            self._install_arrived_if_quiet()  # those that arrived before the hooks
        return hooks

    def _install_arrived_if_quiet(self) -> None:
        self.sweeps.if_quiet(self._install_arrived)

    def _block_experts(self, j: int) -> list[tuple[int, ExpertsModule]]:
        parts = self.parts.get(self.manifest.blocks[j].chunk)
        if parts is None:
            return []
        return [(g, self.experts[group.module]) for g, group in enumerate(parts.groups)]

    def _remove_hooks(self) -> None:
        if self.fill is not None:
            self.fill.close()  # no block arrives to be installed past here
        for hook in self.hooks:
            hook.detach()  # the views go first, so the streamer can unmap the mappings

    def _start_verifier(self) -> BackgroundVerifier | None:
        """Remote chunks are hashed on every read; local ones once per version, so a damaged
        one would go unnoticed until a request needs it, unless hashed now."""
        options = self.options
        if not (options.verify_in_background and options.verify_checksums != VerifyMode.OFF):
            return None
        streamed = self._streamed_chunks()
        if not isinstance(self.store, MappableStore) or not streamed:
            return None
        return BackgroundVerifier(self.store, streamed, self.streamer.health, self._evict)

    def _log_loaded(self, load_s: float) -> None:
        stats = self.streamer.stats
        log.info(
            "loaded %s (%s, %s) in %.2fs: read %s at %.2f GB/s; %s; %d I/O thread(s), "
            "reader %s%s%s",
            self.manifest.name,
            self.manifest.architecture,
            self.manifest.weights_label,
            load_s,
            format_size(stats.bytes_read),
            stats.bytes_read / max(stats.read_s, 1e-9) / 1e9,
            self.plan.describe(),
            self.io_threads,
            self.streamer.reader,
            "; streamed chunks leave the page cache after use (it cannot hold them)"
            if self.evict_after_use
            else "",
            "; the pinned blocks are being read in the background" if self.fill else "",
        )
        if self.parts:
            base = sum(p.base_bytes for p in self.parts.values())
            experts = sum(p.info.bytes for p in self.parts.values()) - base
            log.info(
                "expert streaming: %d streamed blocks read their non-expert parts (%s) and "
                "then only their routed experts (of %s)",
                len(self.parts),
                format_size(base),
                format_size(experts),
            )

    # -- requests ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def request(self, cancelled: Callable[[], bool] = lambda: False) -> Iterator[RequestContext]:
        """Run one request's model calls inside this block, on the calling thread; requests
        on other threads share its passes over the streamed blocks (sweeps.py). ``cancelled``
        is asked before every block: True stops the request (RequestCancelled)."""
        before = self.streamer.stats.snapshot()
        context = RequestContext(rider=self.sweeps.join(cancelled), before=before)
        failed = True
        try:
            with torch.inference_mode():
                yield context
            failed = False
        finally:
            # the last request out after a failure drops read-aheads nobody may need
            self.sweeps.leave(context.rider, failed)
            context.stats = context.measure(self.streamer.stats)
            if self.sweeps.members == 0:
                allocator.release_free_memory_soon()  # after a burst, its memory goes back

    @property
    def damage(self) -> ChunkIntegrityError | None:
        """The first damaged chunk found after load (in the background or by a request), until
        a verified version of it replaces it: the model is unusable meanwhile."""
        return self.streamer.health.damage

    def recheck_damage(self) -> ChunkIntegrityError | None:
        """``damage``, after a second look at each damaged chunk of a local store: one the
        store now holds in another version (re-chunked, its file replaced by rename) is
        hashed again, and a version that passes makes the model whole (docs/integrity.md).
        A damaged version that is still there is not read again: a remote store's
        damage lasts until the model is reloaded."""
        health, store = self.streamer.health, self.store
        if not isinstance(store, MappableStore):
            return health.damage
        for name, damaged in health.damaged().items():
            info = self.manifest.chunks[name]
            try:
                if store.version(info.file) == damaged:
                    continue
                digest, size, version = store.sha256(info.file)
            except (OSError, LayerStreamError):  # missing still: the damage stands
                continue
            if version is not None and size == info.bytes and digest == info.sha256:
                log.info("chunk %s was replaced by a version that passed its check", name)
                health.passed(name, version)
        return health.damage

    def close(self) -> None:
        self._closing.close()
