"""Split a Hugging Face checkpoint into one safetensors chunk per transformer block.

Checkpoint keys are mapped into the model's module key space with transformers' own
conversion mapping (transformers 5 renames and fuses some checkpoint keys, e.g. MoE
experts). A block whose tensors are plain renames in the target dtype is copied byte range
by byte range (format/writer.py: one staging buffer per writer, whatever the block size);
any other block is loaded and converted by transformers, one block at a time
(``blocks.py`` decides which). ``manifest.json`` is written last, after every chunk is on
disk: a store without it is incomplete and is never served.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm import tqdm
from transformers import AutoConfig
from transformers.utils import logging as hf_logging

from ..engine.experts import ExpertsModule, find_experts, with_scales
from ..engine.skeleton import (
    TORCH_DTYPES,
    block_of,
    block_prefixes,
    build_skeleton,
    set_tensor,
    tied_groups,
)
from ..engine.writes import (
    BlocksNeverRun,
    DtypeMismatch,
    WritesEveryForward,
    learn_weight_writes,
    served_only_resident,
)
from ..format import quantization
from ..format.manifest import BlockInfo, ChunkInfo, Manifest, WeightWrites
from ..format.quantization import Fp8Blocks, Quantization, UnsupportedQuantization
from ..format.writer import ChunkEntry, SourceTensor, sha256_file
from ..stores.ranged import StoreOptions
from . import blocks, fused
from .blocks import CrossTies, Part, Routed, chunk_name, collect
from .fused import fuses_alike
from .sinks import ChunkerError, Sink, open_sink
from .source import Checkpoint
from .writing import ChunkWriter

__all__ = ["ChunkerError", "chunk_checkpoint"]

log = logging.getLogger(__name__)


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
    checkpoint = Checkpoint.open(source_dir)
    config = AutoConfig.from_pretrained(source_dir)
    if not getattr(config, "architectures", None):
        raise ChunkerError(f"{source_dir}/config.json names no 'architectures'; add one")
    architecture = config.architectures[0]
    dtype = _pick_dtype(config, dtype)
    quant = _quantization(config, checkpoint, source_dir)
    sink = open_sink(dest, force, store_options)
    try:
        return _chunk_into(sink, checkpoint, config, architecture, dtype, name, progress, quant)
    finally:
        sink.close()


def _quantization(
    config: transformers.PretrainedConfig, checkpoint: Checkpoint, source_dir: Path
) -> Quantization | None:
    """The store layout of a quantized checkpoint (None for a plain one); ChunkerError for a
    format layerstream cannot serve exactly (format/quantization.py)."""
    raw = quantization.of_config(config)
    if raw is None:
        return None
    indexes = checkpoint.indexes()

    def scale_dtypes(suffix: str) -> set[torch.dtype]:
        return {t.dtype for index in indexes for key, t in index.items() if key.endswith(suffix)}

    where = f"{source_dir} (config.json quantization_config)"
    try:
        return quantization.supported(raw, scale_dtypes, where)
    except UnsupportedQuantization as exc:
        raise ChunkerError(str(exc)) from None


def _chunk_into(
    sink: Sink,
    checkpoint: Checkpoint,
    config: transformers.PretrainedConfig,
    architecture: str,
    dtype: str,
    name: str,
    progress: bool,
    quant: Quantization | None = None,
) -> Manifest:
    model = build_skeleton(config, architecture, dtype, buffers=False)
    prefixes = block_prefixes(model)
    if not prefixes:
        raise ChunkerError(f"{architecture}: found no repeated transformer blocks to stream")
    writes = _weight_writes(config, architecture, dtype, prefixes)
    conversion = Conversion(model)
    routes = _route(model, prefixes, checkpoint, conversion, quant)
    parts: list[Part] = [None, *range(len(prefixes))]
    bar = tqdm(parts, desc=f"chunking {name}", unit="chunk", disable=not progress or None)
    # transformers draws its own "Loading weights" bar for every block; ours is enough.
    hf_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        chunks = _write_chunks(model, prefixes, routes, conversion, sink, bar, quant)
    finally:
        if hf_bars:
            hf_logging.enable_progress_bar()

    side_files = checkpoint.copy_side_files(sink.staging, config, dtype)
    manifest = Manifest(
        name=name,
        architecture=architecture,
        model_type=config.model_type,
        dtype=dtype,
        blocks=[BlockInfo(prefix=p, chunk=chunk_name(j)) for j, p in enumerate(prefixes)],
        rest=[chunk_name(None)],
        # each file under the name the sink stores it by (S3: a replacing store's folder)
        chunks={
            name: dataclasses.replace(info, file=sink.stored_name(info.file))
            for name, info in chunks.items()
        },
        tied=routes.tied,
        files=[sink.stored_name(f) for f in side_files],
        file_sha256={sink.stored_name(f): sha256_file(sink.staging / f) for f in side_files},
        transformers_version=transformers.__version__,
        quantization=quant,
        weight_writes=writes,
    )
    sink.commit([info.file for info in chunks.values()] + side_files, manifest.to_json().encode())
    log.info(
        "chunked %s: %d blocks + rest, %.1f MiB (%s) into %s",
        name,
        len(prefixes),
        manifest.total_bytes / 2**20,
        manifest.weights_label,
        sink.uri,
    )
    return manifest


def _weight_writes(
    config: transformers.PretrainedConfig, architecture: str, dtype: str, blocks: list[str]
) -> WeightWrites:
    """What the model's forward writes of its weights (engine/writes.py): a model that
    writes on every forward is refused, as is one whose blocks never run as modules; one
    that writes on its first is served only with every block in memory, which the log says
    now. A model that cannot run in ``dtype`` at all is refused too."""
    try:
        writes = learn_weight_writes(config, architecture, dtype, blocks)
    except (WritesEveryForward, BlocksNeverRun, DtypeMismatch) as exc:
        raise ChunkerError(str(exc)) from None
    if writes.first:
        log.warning("%s", served_only_resident(architecture, writes))
    return writes


class Conversion:
    """transformers' key conversion table for the model, built on first use only: most
    checkpoints use the model's own keys and never need it (docs/design-notes-storage.md)."""

    def __init__(self, model: transformers.PreTrainedModel):
        self.model = model
        self._mapping: list | None = None

    @property
    def mapping(self) -> list:
        if self._mapping is None:
            from transformers.conversion_mapping import get_model_conversion_mapping

            self._mapping = get_model_conversion_mapping(self.model)
        return self._mapping

    @functools.cached_property
    def _split(self) -> tuple[list, list]:
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        return (
            [w for w in self.mapping if isinstance(w, WeightRenaming)],
            [w for w in self.mapping if isinstance(w, WeightConverter)],
        )

    def rename(self, key: str, meta: dict[str, torch.Tensor]) -> tuple[str, str | None]:
        """A checkpoint key in the model's key space (``meta``: its state dict), and the
        source pattern of the converter that fuses or splits it (None for a rename)."""
        from transformers.core_model_loading import rename_source_key

        renamings, converters = self._split
        return rename_source_key(key, renamings, converters, self.model.base_model_prefix, meta)

    def converter_of(self, pattern: str | None) -> Any:
        """The converter whose source patterns include ``pattern`` (from ``rename``); None
        for a plain rename, without building the table."""
        if pattern is None:
            return None
        return next((c for c in self._split[1] if pattern in c.source_patterns), None)


@dataclass
class _Routes:
    """The checkpoint's tensors by the part whose chunk they go into."""

    meta: dict[str, torch.Tensor]  # the model's state dict, every tensor on meta
    tied: list[list[str]]
    # checkpoint key -> lazy slice, for transformers' loader (the conversion path)
    slices: dict[Part, dict[str, Any]] = field(
        default_factory=lambda: collections.defaultdict(dict)
    )
    sources: dict[Part, list[Routed]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )  # for the byte-range path
    handles: list[Any] = field(default_factory=list)  # the open files the slices read
    # a quantized checkpoint's scales: by part, the (renamed) weight key -> its scales
    scales: dict[Part, dict[str, SourceTensor]] = field(
        default_factory=lambda: collections.defaultdict(dict)
    )
    # by part, the parameters transformers fuses from fp8 weights (fused.py)
    fused: dict[Part, set[str]] = field(default_factory=lambda: collections.defaultdict(set))


def _route(
    model: transformers.PreTrainedModel,
    prefixes: list[str],
    checkpoint: Checkpoint,
    conversion: Conversion,
    quant: Quantization | None = None,
) -> _Routes:
    """Which part each checkpoint tensor goes into, renamed into the model's key space; a
    quantized weight's scales go with it."""
    meta = model.state_dict(keep_vars=True)
    routes = _Routes(meta, tied_groups(meta))
    indexes = checkpoint.indexes()  # our own reading of every header first: its errors say more
    routes.handles = checkpoint.handles()
    # A checkpoint whose keys are all the model's own (most are) needs no renaming, so the
    # conversion table is not built for it. A quantized weight may carry a suffix of its
    # format's (mxfp4: `<key>_blocks`), its scales always do.
    suffix = quant.scale_suffix if quant is not None else None
    stored = quant.weight_suffix if quant is not None else ""

    def stem(key: str) -> str:
        return key.removesuffix(stored) if stored and key.endswith(stored) else key

    identity = all(
        stem(key) in meta or (suffix is not None and key.endswith(suffix))
        for index in indexes
        for key in index
    )
    scales: list[SourceTensor] = []
    scale_slices: dict[str, Any] = {}
    for handle, index in zip(routes.handles, indexes, strict=True):
        for key in index:
            if suffix is not None and key.endswith(suffix):
                scales.append(index[key])
                scale_slices[key] = handle.get_slice(key)
                continue
            name = stem(key)
            renamed, converter = (name, None) if identity else conversion.rename(name, meta)
            if name == key:  # a quantized weight's shape is its format's (direct_entries)
                _check_shape(index[key], renamed, converter, meta)
            part = block_of(renamed, prefixes)
            routes.slices[part][key] = handle.get_slice(key)
            routes.sources[part].append(Routed(renamed, converter, index[key]))
    if scales or stored:
        assert quant is not None
        _route_scales(routes, scales, scale_slices, prefixes, conversion, quant)
        held = {key for index in indexes for key in index}
        for key in sorted(held):
            if stored and key.endswith(stored) and quant.scale_key(stem(key)) not in held:
                raise ChunkerError(
                    f"{key} has no {quant.scale_key(stem(key))} beside it: a {quant.method} "
                    "checkpoint keeps the scales of each quantized tensor; the checkpoint is "
                    "incomplete: download it again"
                )
    return routes


def _unstorable(
    scales: dict[str, SourceTensor],
    sources: list[Routed],
    meta: dict[str, torch.Tensor],
    quant: Quantization,
) -> str:
    """Which quantized weight of a part is not in its format's layout, and how."""
    found = {r.key: r.source for r in sources}
    for key, scale in sorted(scales.items()):
        shape = tuple(meta[key].shape)
        want = (quant.stored_dtype, quant.checkpoint_shape(shape))
        weight = found.get(key)
        for tensor, (dtype, expected) in (
            (weight, want),
            (scale, (quant.scale_torch_dtype, quant.checkpoint_scale_shape(shape))),
        ):
            if tensor is not None and (tensor.dtype, tensor.shape) != (dtype, expected):
                return (
                    f"{tensor.key} is {tensor.dtype} {list(tensor.shape)}; {quant.describe()} "
                    f"keeps the model's {key} {list(shape)} as {dtype} {list(expected)}"
                )
    return f"{sorted(scales)[:3]}: not plain tensors of the model, in its format's layout"


def _check_shape(
    source: SourceTensor, key: str, converter: Any, meta: dict[str, torch.Tensor]
) -> None:
    """A tensor the model takes as it is must have the model's shape: otherwise transformers
    leaves it out, and the chunker would report it as missing."""
    want = meta.get(key)
    if converter is not None or want is None or tuple(want.shape) == source.shape:
        return
    raise ChunkerError(
        f"{source.path.name}: tensor {source.key} has shape {list(source.shape)}, the model "
        f"its config.json describes wants {list(want.shape)}: the checkpoint and its config "
        "do not match"
    )


def _route_scales(
    routes: _Routes,
    scales: list[SourceTensor],
    slices: dict[str, Any],
    prefixes: list[str],
    conversion: Conversion,
    quant: Quantization,
) -> None:
    """Each scale tensor into its weight's part: beside a weight stored as is, or one that
    transformers fuses by stacking and concatenating (fused.py)."""
    weights = {
        r.source.key: r for sources in routes.sources.values() for r in sources
    }  # checkpoint key -> its route
    for scale in scales:
        wanted = scale.key.removesuffix(quant.scale_suffix) + quant.weight_suffix
        weight = weights.get(wanted)
        if weight is not None and weight.source.dtype != quant.stored_dtype:
            raise ChunkerError(
                f"{weight.source.path.name}: {wanted} is {weight.source.dtype}; "
                f"{quant.describe()} keeps its values as {quant.stored_dtype}: re-quantize it"
            )
        if weight is None:
            raise ChunkerError(
                f"{scale.path.name}: {scale.key} has no {quant.stored_dtype} {wanted} beside "
                f"it to scale; it is not a {quant.method} checkpoint layerstream can serve"
            )
        converter = conversion.converter_of(weight.converter)  # Routed keeps its pattern
        fused = isinstance(quant, Fp8Blocks) and converter is not None and fuses_alike(converter)
        if not fused and (weight.converter is not None or not quant.takes(weight.key)):
            raise ChunkerError(
                f"{weight.source.key}: a {quant.method} weight that transformers converts at "
                "load other than by stacking or concatenating (split, transposed), or that "
                f"{quant.method} does not quantize there; layerstream cannot keep it quantized "
                "yet. Dequantize the checkpoint first (from_pretrained on a CPU dequantizes "
                "it; save_pretrained) and chunk that"
            )
        part = block_of(weight.key, prefixes)
        routes.slices[part][scale.key] = slices[scale.key]  # for transformers' loader
        if fused:
            routes.fused[part].add(weight.key)
        else:
            routes.scales[part][weight.key] = scale


def _write_chunks(
    model: transformers.PreTrainedModel,
    prefixes: list[str],
    routes: _Routes,
    conversion: Conversion,
    sink: Sink,
    parts: Iterable[Part],
    quant: Quantization | None = None,
) -> dict[str, ChunkInfo]:
    """Write every part's chunk: copied as byte ranges when ``blocks.direct_entries`` can,
    else loaded into the model by transformers and written from there, one block at a
    time (each block's tensors go back to meta once written)."""
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    meta = routes.meta
    cross = CrossTies(routes.tied, prefixes)
    by_block: dict[Part, list[ExpertsModule]] = collections.defaultdict(list)
    for module in find_experts(model):
        by_block[block_of(module.tensors[0], prefixes)].append(module)
    by_block.pop(None, None)  # experts outside the blocks are never streamed
    # where each tied tensor from_pretrained holds once sits, for its copies in other chunks
    tied_residues = blocks.unconverted_residues(
        [r for sources in routes.sources.values() for r in sources if r.key in cross.keys],
        {k: meta[k] for k in cross.keys},
    )
    writer = ChunkWriter(sink)
    try:
        for part in parts:
            keys = [k for k in meta if block_of(k, prefixes) == part]
            name = chunk_name(part)
            entries = None
            scales = routes.scales.get(part, {})
            quantized = sorted({*scales, *routes.fused.get(part, ())})
            if cross.keys.isdisjoint(keys) and not routes.fused.get(part):
                entries = blocks.direct_entries(
                    keys, meta, routes.sources.get(part, []), scales, quant
                )
            if entries is None and scales and not routes.fused.get(part):
                assert quant is not None
                why = _unstorable(scales, routes.sources.get(part, []), meta, quant)
                raise ChunkerError(
                    f"{chunk_name(part)}: its {quant.method} weights cannot be stored as they "
                    f"are ({why}); re-quantize it, or dequantize it (from_pretrained on a CPU "
                    "dequantizes it; save_pretrained) and chunk that"
                )
            converted = entries is None
            if entries is None:
                mapping = conversion.mapping
                if quantized:
                    assert quant is not None
                    mapping = mapping + fused.scale_converters(mapping)
                with fused.scale_parameters(model, quantized, meta, quant):
                    convert_and_load_state_dict_in_model(
                        model,
                        routes.slices.get(part, {}),
                        LoadStateDictConfig(weight_mapping=mapping),
                    )
                    dtypes = {k: meta[k].dtype for k in keys}
                    tensors = collect(model, keys, routes.tied, cross, dtypes, part)
                    if quantized:
                        tensors = fused.stored(model, tensors, quantized, quant)
                kept = blocks.unconverted_residues(routes.sources.get(part, []), tensors)
                kept = cross.residues(tied_residues, tensors) | kept
                entries = [ChunkEntry.of_tensor(k, v, kept.get(k, 0)) for k, v in tensors.items()]
                del tensors
            log.debug("%s: %s", name, "converted" if converted else "copied from the source")
            label = "rest" if part is None else prefixes[part]
            dequantized = sum(meta[k].numel() * meta[k].element_size() for k in quantized)
            experts = by_block.get(part)
            if experts and quant is not None:  # an expert's scales are part of it
                experts = [with_scales(m, quantized, quant) for m in experts]
            written = writer.submit(name, entries, label, experts, quantized, dequantized)
            if converted:
                written.result()  # its tensors live in the model until written
            if part is not None:  # back to meta: one block in memory at a time
                for key in keys:
                    set_tensor(model, key, meta[key])
            del entries
        return writer.finish()
    finally:
        writer.close()
