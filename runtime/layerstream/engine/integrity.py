"""Is the chunk store what the model needs? Checked at load and, after it, in the background
(the checks on use, before a block's bytes run, are in checks.py).

- At load, every streamed chunk's size and safetensors header are read (a few KiB each) and
  checked against the manifest and against the tensors the model built from the config
  needs (names, dtypes, shapes): a truncated chunk, or a chunk of another model with a
  consistent sha256, fails the load instead of every request.
- After load, a low-priority thread hashes every streamed chunk of a local store; a mismatch
  takes the model out of readiness (so an orchestrator reschedules it) before a request
  finds it. Remote chunks are hashed on every read instead.
- ``ChunkHealth`` (checks.py) remembers which version of each chunk passed its sha256 check
  and which chunks failed: a local chunk is hashed again only when its version changes.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn
from transformers import PretrainedConfig

from ..errors import ChunkIntegrityError, ManifestError
from ..format import quantization
from ..format.manifest import ChunkInfo, Manifest
from ..format.safetensors import (
    HEADER_PROBE,
    ChunkSpec,
    TensorEntry,
    TensorSpec,
    check_layout,
    header_length,
    parse_header,
)
from ..stores import ChunkStore, MappableStore
from ..units import format_size
from .checks import ChunkHealth, refetch_once
from .hooks import BlockBinding
from .skeleton import block_of, model_class, tied_groups

log = logging.getLogger(__name__)


def check_config_fits_manifest(manifest: Manifest, config: PretrainedConfig) -> None:
    """The manifest's architecture must be a class for the config the store holds: a Mistral
    class built from a Llama config builds, then fails every request."""
    where = f"manifest.json names {manifest.architecture} ({manifest.model_type})"
    if config.model_type != manifest.model_type:
        raise ManifestError(
            f"{where} but config.json is a {config.model_type} config; the manifest or the "
            "config was edited: re-run the chunker"
        )
    wanted = getattr(model_class(manifest.architecture), "config_class", None)
    if isinstance(wanted, type) and not isinstance(config, wanted):
        raise ManifestError(
            f"{where}, which takes a {wanted.__name__}, but config.json holds a "
            f"{type(config).__name__}; re-run the chunker"
        )
    raw = quantization.of_config(config)
    if raw is not None and manifest.quantization is None:
        raise ManifestError(
            f"config.json says {manifest.name} is quantized (quant_method "
            f"{raw.get('quant_method')!r}), but its chunks are listed as plain weights: a "
            "layerstream before quantized stores chunked quantized checkpoints as plain ones, and "
            "such a store answers wrongly. Re-run the chunker (it keeps block-wise fp8 "
            "quantized, and names what to do for other formats)"
        )


def check_model_fits_manifest(manifest: Manifest, model: nn.Module, prefixes: list[str]) -> None:
    """The blocks and the tied weights the manifest lists must be the model's own: the
    manifest's tie groups are applied at load, so an edited group would alias weights the
    model keeps apart (and answer wrongly)."""
    listed = [b.prefix for b in manifest.blocks]
    if prefixes != listed:
        first = next(
            (i for i, (a, b) in enumerate(zip(prefixes, listed, strict=False)) if a != b),
            min(len(prefixes), len(listed)),
        )
        raise ManifestError(
            f"the model built from config.json by this transformers version has "
            f"{len(prefixes)} blocks, the manifest lists {len(listed)}; the first difference "
            f"is at block {first}: {prefixes[first : first + 1]} vs {listed[first : first + 1]}; "
            "re-chunk the model"
        )
    own = sorted(tied_groups(model))
    if sorted(sorted(group) for group in manifest.tied) != own:
        raise ManifestError(
            f"manifest.json ties {manifest.tied} but the model built from config.json ties "
            f"{own}; the manifest was edited: re-run the chunker"
        )


def chunk_specs(
    model: nn.Module, manifest: Manifest, prefixes: list[str], blocks: list[BlockBinding]
) -> dict[str, ChunkSpec]:
    """What each chunk must hold, from the model built on the meta device: a block's chunk
    exactly its block's tensors (one of each group tied within the block), the rest chunks
    any of the other tensors (whether together they cover them is checked once loaded)."""

    def spec(value: torch.Tensor) -> TensorSpec:
        # the skeleton's dtype: from_pretrained's for it (the manifest's, but for the tensors
        # a model keeps in float32 or creates in a dtype of its own; skeleton.py)
        return TensorSpec(value.dtype, tuple(value.shape))

    rest = {
        key: spec(value)
        for key, value in model.state_dict(keep_vars=True).items()
        if block_of(key, prefixes) is None
    }
    specs = {name: _quantized(ChunkSpec(rest), manifest, name) for name in manifest.rest}
    for block, binding in zip(manifest.blocks, blocks, strict=True):
        base = block.prefix + "."
        aliases = binding.aliases
        groups = {frozenset(base + a for a in aliases.get(k, (k,))) for k in binding.places}
        specs[block.chunk] = _quantized(
            ChunkSpec({base + k: spec(v) for k, v in binding.placeholders.items()}, tuple(groups)),
            manifest,
            block.chunk,
        )
    return specs


def _quantized(spec: ChunkSpec, manifest: Manifest, chunk: str) -> ChunkSpec:
    """``spec`` with the tensors its chunk holds quantized as they are stored (fp8, and
    their scales beside them, which the chunk must hold)."""
    keys, quant = manifest.chunks[chunk].quantized, manifest.quantization
    if not keys or quant is None:
        return spec
    tensors = dict(spec.tensors)
    required = list(spec.required)
    decoded: dict[str, TensorSpec] = {}
    for key in keys:
        want = tensors.get(key)
        if want is None or not want.dtype.is_floating_point or not quant.tileable(want.shape):
            raise ManifestError(
                f"manifest.json lists {key} of chunk {chunk} as quantized, but the model built "
                f"from config.json has no floating tensor there that {quant.describe()} can "
                "hold; re-run the chunker"
            )
        decoded[key] = want
        tensors[key] = TensorSpec(quant.stored_dtype, quant.stored_shape(want.shape))
        scales = quant.scale_key(key)
        tensors[scales] = TensorSpec(quant.scale_torch_dtype, quant.scale_shape(want.shape))
        required.append(frozenset({scales}))
    size = sum(math.prod(t.shape) * t.dtype.itemsize for t in decoded.values())
    if size != manifest.chunks[chunk].dequantized_bytes:
        raise ManifestError(
            f"manifest.json says chunk {chunk}'s quantized tensors take "
            f"{manifest.chunks[chunk].dequantized_bytes} bytes dequantized, the model built "
            f"from config.json needs {size}; re-run the chunker"
        )
    return ChunkSpec(tensors, tuple(required), decoded, quant)


def check_chunk_heads(
    store: ChunkStore, infos: Iterable[ChunkInfo], specs: dict[str, ChunkSpec], threads: int
) -> dict[str, list[TensorEntry]]:
    """Read every chunk's size and header (in parallel: remote stores answer one ranged read
    per chunk) and check them; the first problem fails the load. Returns each chunk's
    layout, by chunk name."""
    infos = list(infos)
    if not infos:
        return {}
    started = time.perf_counter()
    with ThreadPoolExecutor(max(threads, 1), thread_name_prefix="layerstream-check") as pool:
        futures = {i.name: pool.submit(_check_head, store, i, specs[i.name]) for i in infos}
        layouts = {name: future.result() for name, future in futures.items()}
    log.info(
        "checked the size and tensors of %d streamed chunks in %.3fs",
        len(infos),
        time.perf_counter() - started,
    )
    return layouts


def _check_head(store: ChunkStore, info: ChunkInfo, spec: ChunkSpec) -> list[TensorEntry]:
    return refetch_once(store, info.file, lambda: _check_head_once(store, info, spec))


def _check_head_once(store: ChunkStore, info: ChunkInfo, spec: ChunkSpec) -> list[TensorEntry]:
    head, size = store.read_head(info.file, HEADER_PROBE)
    if size is not None and size != info.bytes:
        raise ChunkIntegrityError(
            f"chunk {info.name} ({info.file} in {store.uri}) has {size} bytes, the manifest "
            f"says {info.bytes}; the store is truncated or was modified: re-run the chunker"
        )
    size = info.bytes if size is None else size
    length = header_length(info, head[:8], size)
    if len(head) < 8 + length:
        head, _ = store.read_head(info.file, 8 + length)
    layout = parse_header(info, head, size)
    check_layout(info, layout, spec)
    return layout


class BackgroundVerifier:
    """Hashes the streamed chunks of a local store once, on a thread of lowest CPU priority,
    recording each result in ``health``. ``done`` is set when the pass has ended."""

    def __init__(
        self,
        store: MappableStore,
        infos: list[ChunkInfo],
        health: ChunkHealth,
        evict: Callable[[str], None] | None = None,
    ):
        self.store, self.infos, self.health, self._evict = store, infos, health, evict
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="layerstream-verify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            # Linux applies a thread id's nice value to that thread alone: hashing then uses
            # only CPU time nothing else wants.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            log.debug("could not lower the background verifier's priority")
        started, hashed, total = time.perf_counter(), 0, 0
        try:
            for info in self.infos:
                if self._stop.is_set():
                    return
                total += self._verify(info)
                hashed += 1
            log.info(
                "verified %d streamed chunks (%s) in the background in %.1fs",
                hashed,
                format_size(total),
                time.perf_counter() - started,
            )
        except Exception:
            # a failure to read is reported by the requests that need the chunk; the
            # verifier only ever adds evidence of damage, it never withholds a request
            log.exception("background verification stopped")
        finally:
            self.done.set()

    def _verify(self, info: ChunkInfo) -> int:
        if self.health.is_verified(info.name, self.store.version(info.file)):
            return 0
        digest, size, version = self.store.sha256(info.file)
        if self._evict is not None:
            self._evict(info.file)
        if version is None:
            return size  # rewritten while hashed: its next use checks the new version
        if size == info.bytes and digest == info.sha256:
            self.health.passed(info.name, version)
        else:
            self.health.failed(
                info.name,
                ChunkIntegrityError(
                    f"chunk {info.name} ({info.file} in {self.store.uri}) failed its sha256 "
                    f"check in the background ({size} bytes, sha256 {digest[:12]}…; the "
                    f"manifest says {info.bytes} bytes, {info.sha256[:12]}…): the store is "
                    "damaged; re-run the chunker, then reload the model"
                ),
                version,
            )
        return size

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
