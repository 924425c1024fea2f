"""Split a Hugging Face checkpoint into one safetensors chunk per transformer block.

Checkpoint keys are mapped into the model's module key space with transformers' own
conversion mapping (transformers 5 renames and fuses some checkpoint keys, e.g. MoE
experts). A block whose tensors are plain renames in the target dtype is copied byte range
by byte range (chunkio.py: one staging buffer per writer, whatever the block size); any
other block is loaded and converted by transformers, one block at a time. ``manifest.json``
is written last, after every chunk is on disk: a store without it is incomplete and is
never served.
"""

from __future__ import annotations

import collections
import json
import logging
import shutil
import tempfile
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from tqdm import tqdm
from transformers import AutoConfig
from transformers.utils import logging as hf_logging

from ..engine.skeleton import (
    TORCH_DTYPES,
    block_of,
    block_prefixes,
    build_skeleton,
    get_tensor,
    set_tensor,
    tied_groups,
)
from ..format.manifest import BlockInfo, ChunkInfo, Manifest
from ..format.writer import (
    SAFETENSORS_DTYPES,
    ChunkEntry,
    SourceTensor,
    read_safetensors_index,
    sha256_file,
    write_chunk,
)
from ..stores.ranged import StoreOptions
from .sinks import ChunkerError, Sink, open_sink

log = logging.getLogger(__name__)

# Files copied next to the chunks so the runtime needs nothing else (no pickle among them).
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class _Source:
    files: list[Path]
    directory: Path


def _source_files(directory: Path) -> _Source:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({directory / f for f in weight_map.values()})
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in directory.glob("*.bin")] + [
            p.name for p in directory.glob("*.pt")
        ]
        hint = (
            f" It has {', '.join(pickled)}: layerstream never unpickles weights; convert them "
            "to safetensors first (e.g. `from_pretrained(...).save_pretrained(dir)` in a trusted "
            "environment)."
            if pickled
            else ""
        )
        raise ChunkerError(f"no *.safetensors weights in {directory}.{hint}")
    return _Source(files=files, directory=directory)


def resolve_source(source: str) -> Path:
    """A local checkpoint directory, or a Hub id downloaded (safetensors only) to the HF cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or source.startswith((".", "/")):
        raise ChunkerError(f"{source} is not a checkpoint directory")
    from huggingface_hub import snapshot_download

    log.info("downloading %s from the Hugging Face Hub (safetensors, config, tokenizer)", source)
    try:
        return Path(
            snapshot_download(source, allow_patterns=["*.safetensors", "*.json", *SIDE_FILES])
        )
    except Exception as exc:  # the hub client raises many unrelated types; report them all
        raise ChunkerError(f"cannot download {source!r} from the Hub: {exc}") from exc


class _Writer:
    """Writes chunk files into the sink's staging folder and records them for the manifest.

    Chunks are written by two threads at once: a file's sha256 is sequential and runs at
    about one core's speed (~1 GB/s), so hashing two files at a time is what lets the
    chunker keep up with the disk.
    """

    WORKERS = 2

    def __init__(self, sink: Sink):
        self.sink = sink
        self._pool = ThreadPoolExecutor(self.WORKERS, thread_name_prefix="layerstream-chunk")
        self._pending: dict[str, Future[ChunkInfo]] = {}

    def submit(self, name: str, entries: list[ChunkEntry], scope: str) -> Future[ChunkInfo]:
        """Queue one chunk; returns once at most WORKERS chunks are still being written (so
        progress shows written chunks, and a failure stops the chunker early)."""
        future = self._pool.submit(self._write, name, entries, scope)
        self._pending[name] = future
        running = [f for f in self._pending.values() if not f.done()]
        if len(running) > self.WORKERS:
            running[0].result()
        return future

    def _write(self, name: str, entries: list[ChunkEntry], scope: str) -> ChunkInfo:
        file = f"{name}.safetensors"
        size, sha256 = write_chunk(
            self.sink.staging / file, entries, {"scope": scope, "format": "pt"}
        )
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


def _pick_dtype(config: transformers.PretrainedConfig, requested: str | None) -> str:
    if requested is not None:
        if requested not in TORCH_DTYPES:
            raise ChunkerError(f"--dtype {requested!r}: choose one of {', '.join(TORCH_DTYPES)}")
        return requested
    source = getattr(config, "dtype", None)
    name = str(source).removeprefix("torch.") if source is not None else "float32"
    return name if name in TORCH_DTYPES else "float32"


def chunk_checkpoint(
    source_dir: Path,
    dest: str | Path,
    name: str,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = True,
    store_options: StoreOptions | None = None,
) -> Manifest:
    """Chunk the safetensors checkpoint in ``source_dir`` into ``dest``: a store directory or
    ``s3://bucket/prefix`` (uploaded chunk by chunk; ``store_options`` for the endpoint)."""
    source = _source_files(source_dir)
    config = AutoConfig.from_pretrained(source_dir)
    if not getattr(config, "architectures", None):
        raise ChunkerError(f"{source_dir}/config.json names no 'architectures'; add one")
    architecture = config.architectures[0]
    dtype = _pick_dtype(config, dtype)
    sink = open_sink(dest, force, store_options)
    try:
        return _chunk_into(sink, source_dir, source, config, architecture, dtype, name, progress)
    finally:
        sink.close()


def _chunk_into(
    sink: Sink,
    source_dir: Path,
    source: _Source,
    config: transformers.PretrainedConfig,
    architecture: str,
    dtype: str,
    name: str,
    progress: bool,
) -> Manifest:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        convert_and_load_state_dict_in_model,
        rename_source_key,
    )
    from transformers.modeling_utils import LoadStateDictConfig

    model = build_skeleton(config, architecture, dtype, buffers=False)
    prefixes = block_prefixes(model)
    if not prefixes:
        raise ChunkerError(f"{architecture}: found no repeated transformer blocks to stream")
    meta_sd = model.state_dict(keep_vars=True)
    originals = dict(meta_sd)
    groups = tied_groups(model)

    # backend="pread": real reads; the default mmap backend would keep every touched page of
    # the source mapped, so RSS would grow to the whole checkpoint.
    handles = [safe_open(str(f), framework="pt", backend="pread") for f in source.files]
    indexes = [read_safetensors_index(path) for path in source.files]
    # A checkpoint whose keys are all the model's own (most are) needs no renaming: building
    # transformers' conversion table costs ~0.4 s, a third of chunking a 1 GB model, so it is
    # built only when a key is foreign or a block has to go through the conversion path.
    identity = all(key in meta_sd for index in indexes for key in index)
    mapping: list | None = None

    def conversion_mapping() -> list:
        nonlocal mapping
        if mapping is None:
            mapping = get_model_conversion_mapping(model)
        return mapping

    renamings: list[WeightRenaming] = []
    converters: list[WeightConverter] = []
    if not identity:
        renamings = [w for w in conversion_mapping() if isinstance(w, WeightRenaming)]
        converters = [w for w in conversion_mapping() if isinstance(w, WeightConverter)]
    scoped: dict[int | None, dict] = collections.defaultdict(dict)
    direct: dict[int | None, list[tuple[str, str | None, SourceTensor]]] = collections.defaultdict(
        list
    )
    for handle, index in zip(handles, indexes, strict=True):
        for key in index:
            renamed, converter = (
                (key, None)
                if identity
                else rename_source_key(key, renamings, converters, model.base_model_prefix, meta_sd)
            )
            scope = block_of(renamed, prefixes)
            scoped[scope][key] = handle.get_slice(key)
            direct[scope].append((renamed, converter, index[key]))

    writer = _Writer(sink)
    target = TORCH_DTYPES[dtype]
    held: dict[tuple[str, ...], torch.Tensor] = {}  # rest tensors that blocks share through a tie
    cross = [g for g in groups if len({block_of(k, prefixes) for k in g}) > 1]
    cross_keys = {k for g in cross for k in g}
    scopes: list[int | None] = [None, *range(len(prefixes))]
    bar = tqdm(scopes, desc=f"chunking {name}", unit="chunk", disable=not progress or None)
    # transformers draws its own "Loading weights" bar for every block; ours is enough.
    hf_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        for scope in bar:
            keys = [k for k in meta_sd if block_of(k, prefixes) == scope]
            chunk_name = "rest" if scope is None else f"block_{scope:04d}"
            label = "rest" if scope is None else prefixes[scope]
            entries = None
            converted = False
            if not any(k in cross_keys for k in keys):
                entries = _direct_entries(keys, meta_sd, direct.get(scope, []), target)
            if entries is None:
                convert_and_load_state_dict_in_model(
                    model,
                    scoped.get(scope, {}),
                    LoadStateDictConfig(weight_mapping=conversion_mapping()),
                )
                tensors = _collect(model, keys, groups, cross, held, target, scope, prefixes)
                entries = [ChunkEntry.of_tensor(k, v) for k, v in tensors.items()]
                converted = True
                del tensors
            log.debug("%s: %s", chunk_name, "converted" if converted else "copied from the source")
            written = writer.submit(chunk_name, entries, label)
            if converted:
                written.result()  # its tensors live in the model until written
            if scope is not None:  # back to meta: one block in memory at a time
                for key in keys:
                    set_tensor(model, key, originals[key])
            del entries
        chunks = writer.finish()
    finally:
        writer.close()
        if hf_bars:
            hf_logging.enable_progress_bar()

    side_files = _copy_side_files(source_dir, sink.staging, config, dtype)
    manifest = Manifest(
        name=name,
        architecture=architecture,
        model_type=config.model_type,
        dtype=dtype,
        blocks=[BlockInfo(prefix=p, chunk=f"block_{j:04d}") for j, p in enumerate(prefixes)],
        rest=["rest"],
        chunks=chunks,
        tied=groups,
        files=side_files,
        file_sha256={f: sha256_file(sink.staging / f) for f in side_files},
        transformers_version=transformers.__version__,
    )
    sink.commit([info.file for info in chunks.values()] + side_files, manifest.to_json().encode())
    log.info(
        "chunked %s: %d blocks + rest, %.1f MiB (%s) into %s",
        name,
        len(prefixes),
        manifest.total_bytes / 2**20,
        dtype,
        sink.uri,
    )
    return manifest


def _direct_entries(
    keys: list[str],
    meta_sd: dict[str, torch.Tensor],
    sources: list[tuple[str, str | None, SourceTensor]],
    target: torch.dtype,
) -> list[ChunkEntry] | None:
    """The scope's chunk as byte ranges of the source files, when every tensor is a plain
    rename of one checkpoint tensor already in the right dtype and shape (the common case):
    then no tensor is ever materialised and memory stays at one staging buffer. ``None``
    sends the scope through transformers' conversion instead (fused or split weights, a
    dtype change, ties, a missing tensor, which that path reports)."""
    by_key: dict[str, list[SourceTensor]] = collections.defaultdict(list)
    for renamed, converter, src in sources:
        if converter is not None:
            return None
        by_key[renamed].append(src)
    entries: list[ChunkEntry] = []
    seen: set[int] = set()
    for key in keys:
        meta = meta_sd[key]
        if id(meta) in seen:
            continue
        seen.add(id(meta))
        found = [s for k in keys if meta_sd[k] is meta for s in by_key.get(k, ())]
        if len(found) != 1:
            return None
        want = target if meta.is_floating_point() else meta.dtype
        if found[0].dtype != SAFETENSORS_DTYPES.get(want) or found[0].shape != tuple(meta.shape):
            return None
        entries.append(ChunkEntry.of_source(key, found[0]))
    return entries


def _collect(
    model: torch.nn.Module,
    keys: Iterable[str],
    groups: list[list[str]],
    cross: list[list[str]],
    held: dict[tuple[str, ...], torch.Tensor],
    target: torch.dtype,
    scope: int | None,
    prefixes: list[str],
) -> dict[str, torch.Tensor]:
    """The scope's tensors, each stored once; tied keys in the same scope are re-aliased at load."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key in keys:
        tensor = get_tensor(model, key)
        if tensor.device.type == "meta" or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        value = tensor.detach()
        if value.is_floating_point():
            value = value.to(target)
        out[key] = value.contiguous()
    for group in cross:
        if scope is None:
            for key in group:
                if key in out:
                    held[tuple(group)] = out[key]
            continue
        mine = [k for k in group if block_of(k, prefixes) == scope]
        if mine and not any(k in out for k in mine):
            value = held.get(tuple(group))
            if value is None:
                raise ChunkerError(f"tied weights {group} span blocks in a way not supported")
            # Each chunk stays self-contained: a block gets its own copy of a shared tensor
            # (written into its file; the rest's tensor stays loaded until the end).
            out[mine[0]] = value
    missing = [
        k
        for k in keys
        if k not in out and not any(k in g and any(o in out for o in g) for g in groups)
    ]
    if missing:
        raise ChunkerError(
            f"the checkpoint has no values for {missing[:5]}; refusing to chunk a model with "
            "missing weights (transformers would fill them with random values)"
        )
    return out


def _copy_side_files(
    source_dir: Path, dest: Path, config: transformers.PretrainedConfig, dtype: str
) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        src = source_dir / name
        if not src.is_file():
            continue
        if name == "config.json":
            config.dtype = dtype  # the chunks' dtype, which may differ from the source's
            config.to_json_file(dest / name)
        else:
            shutil.copyfile(src, dest / name)
        copied.append(name)
    return copied


def random_source(spec: str, workdir: str | None = None) -> tempfile.TemporaryDirectory:
    """A temporary directory holding a random-init checkpoint for ``spec``."""
    from .presets import write_random_checkpoint

    tmp = tempfile.TemporaryDirectory(prefix="layerstream-random-", dir=workdir)
    write_random_checkpoint(spec, Path(tmp.name))
    return tmp
