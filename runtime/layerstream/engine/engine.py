"""One model, built from its chunk store, whose blocks are streamed while it runs.

transformers' own classes run unchanged on a meta skeleton: the non-block weights and the
pinned blocks are installed once, the other blocks are installed by a pre-forward hook and
released by a post-forward hook. ``forward`` and ``generate`` (KV cache, sampling, masks,
RoPE) are transformers' own, so any architecture it can build from a config works.

Threading: the model runs on one thread at a time (the scheduler's); store reads run on the
streamer's I/O threads.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import ChunkIntegrityError, ManifestError, RequestCancelled
from ..format.manifest import MANIFEST_NAME, ChunkInfo, Manifest
from ..stores import CachingStore, ChunkStore, LocalStore
from ..units import format_size
from . import tuning
from .hooks import BlockSlots
from .integrity import (
    BackgroundVerifier,
    check_chunk_heads,
    check_config_fits_manifest,
    check_model_fits_manifest,
    chunk_specs,
)
from .plan import ResidencyPlan, plan_residency, resolve_budget
from .sidefiles import load_side_files
from .skeleton import block_of, block_prefixes, build_skeleton, get_tensor, set_tensor
from .streamer import Loaded, StreamStats, WeightStreamer

log = logging.getLogger(__name__)


@dataclass
class EngineOptions:
    memory_budget: str | int = "auto"  # weights held in memory: bytes, '2GiB', '25%', 'auto'
    read_ahead: int | str = "auto"  # see tuning.py for what "auto" means
    io_threads: int | str = "auto"
    verify_checksums: str = "once"  # see streamer.VERIFY_MODES
    verify_in_background: bool = True  # hash streamed local chunks after load (integrity.py)
    reader: str = "auto"  # see streamer.READERS


@dataclass
class RequestContext:
    """Per-request view of the engine's counters (one request runs at a time)."""

    cancelled: Callable[[], bool]
    started: float = field(default_factory=time.perf_counter)
    before: StreamStats | None = None
    stats: StreamStats = field(default_factory=StreamStats)


class Engine:
    def __init__(self, store: ChunkStore, options: EngineOptions):
        started = time.perf_counter()
        self.store = store
        self.options = options
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
        self.model: PreTrainedModel = build_skeleton(
            self.config, self.manifest.architecture, self.manifest.dtype
        )
        self.prefixes = block_prefixes(self.model)
        check_model_fits_manifest(self.manifest, self.model, self.prefixes)
        budget = resolve_budget(options.memory_budget, self.manifest.total_bytes)
        self.plan: ResidencyPlan = plan_residency(
            self.manifest, budget, tuning.read_ahead(options.read_ahead)
        )
        self.io_threads = tuning.io_threads(options.io_threads, self.plan.read_ahead)
        self.evict_after_use = tuning.evict_after_use(self.manifest, self.plan)
        self.blocks = [BlockSlots(p, self.model.get_submodule(p)) for p in self.prefixes]
        specs = chunk_specs(self.model, self.manifest, self.prefixes, self.blocks)
        self.verifier: BackgroundVerifier | None = None
        self.streamer = WeightStreamer(
            store,
            self.manifest,
            self.plan,
            self.io_threads,
            options.verify_checksums,
            options.reader,
            self.evict_after_use,
            specs,
        )
        self._scope: RequestContext | None = None
        self._active: dict[int, Loaded] = {}
        # streamed blocks whose module holds a kept mapping's tensors between runs
        self._installed: dict[int, dict[str, torch.Tensor]] = {}
        streamed = [self.manifest.chunks[self.manifest.blocks[j].chunk] for j in self.plan.streamed]
        try:
            check_chunk_heads(store, streamed, specs, max(self.io_threads, 4))
            self._load_rest()
            for j in sorted(self.plan.resident):
                self.blocks[j].install(self.streamer.load_resident(self.manifest.blocks[j].chunk))
            self._check_materialised()
        except BaseException:
            self.close()
            raise
        self._hooks = [self._register(j) for j in range(len(self.blocks))]
        self.verifier = self._start_verifier(streamed)
        load_s = time.perf_counter() - started
        stats = self.streamer.stats
        log.info(
            "loaded %s (%s, %s) in %.2fs: read %s at %.2f GB/s; %s; %d I/O thread(s), reader %s%s",
            self.manifest.name,
            self.manifest.architecture,
            self.manifest.dtype,
            load_s,
            format_size(stats.bytes_read),
            stats.bytes_read / max(stats.read_s, 1e-9) / 1e9,
            self.plan.describe(self.manifest),
            self.io_threads,
            self.streamer.reader,
            "; streamed chunks leave the page cache after use (it cannot hold them)"
            if self.evict_after_use
            else "",
        )

    # -- loading -----------------------------------------------------------------------------
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

    def _start_verifier(self, streamed: list[ChunkInfo]) -> BackgroundVerifier | None:
        """Remote chunks are hashed on every read; local ones once per version, so a damaged
        one would go unnoticed until a request needs it, unless hashed now."""
        options = self.options
        if not (options.verify_in_background and options.verify_checksums != "off"):
            return None
        if not isinstance(self.store, LocalStore) or not streamed:
            return None
        return BackgroundVerifier(self.store, streamed, self.streamer.health, self.streamer.evict)

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

    # -- hooks -------------------------------------------------------------------------------
    def _register(self, j: int) -> list[torch.utils.hooks.RemovableHandle]:
        module = self.model.get_submodule(self.prefixes[j])
        if j in self.plan.resident:
            return [module.register_forward_pre_hook(self._resident_pre(j))]
        return [
            module.register_forward_pre_hook(self._streamed_pre(j)),
            module.register_forward_hook(self._streamed_post(j), always_call=True),
        ]

    def _check_cancel(self) -> None:
        if self._scope is not None and self._scope.cancelled():
            raise RequestCancelled()

    def _resident_pre(self, j: int) -> Callable[[nn.Module, tuple], None]:
        def pre(module: nn.Module, args: tuple) -> None:
            self._check_cancel()
            self.streamer.hit()

        return pre

    def _streamed_pre(self, j: int) -> Callable[[nn.Module, tuple], None]:
        def pre(module: nn.Module, args: tuple) -> None:
            self._check_cancel()
            loaded = self.streamer.acquire(j)
            self._active[j] = loaded
            if self._installed.get(j) is not loaded.tensors:
                self.blocks[j].install(loaded.tensors)
                if loaded.kept:
                    self._installed[j] = loaded.tensors

        return pre

    def _streamed_post(self, j: int) -> Callable[[nn.Module, tuple, object], None]:
        def post(module: nn.Module, args: tuple, output: object) -> None:
            loaded = self._active.pop(j, None)
            if loaded is None:
                self._uninstall(j)
                return
            try:
                self.streamer.check_unchanged(loaded)
            finally:
                if not loaded.kept:
                    self._uninstall(j)
                self.streamer.release(loaded)

        return post

    def _uninstall(self, j: int) -> None:
        self.blocks[j].release()
        self._installed.pop(j, None)

    # -- requests ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def request(self, cancelled: Callable[[], bool] = lambda: False) -> Iterator[RequestContext]:
        """Run one request's model calls inside this block (on the engine thread)."""
        scope = RequestContext(cancelled=cancelled, before=self.streamer.stats.snapshot())
        self._scope = scope
        try:
            with torch.inference_mode():
                yield scope
        except BaseException:
            # A failed or cancelled forward may leave read-aheads for blocks that will not run.
            self.streamer.drop_read_ahead()
            for j in list(self._active):
                self._uninstall(j)
                self.streamer.release(self._active.pop(j))
            raise
        finally:
            self._scope = None
            scope.stats = self.streamer.stats.since(scope.before)

    @property
    def damage(self) -> ChunkIntegrityError | None:
        """The first damaged chunk found after load (in the background or by a request), until
        a verified version of it replaces it: the model is unusable meanwhile."""
        return self.streamer.health.damage

    def close(self) -> None:
        if self.verifier is not None:
            self.verifier.close()
        for handles in getattr(self, "_hooks", []):
            for handle in handles:
                handle.remove()
        for j in list(getattr(self, "_installed", {})):
            self._uninstall(j)  # the views go first, so close can unmap the mappings
        self.streamer.close()
        self.store.close()
