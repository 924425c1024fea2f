"""Which tensors go into which chunk: a block's own, or the rest of the model's ("part").

A part is a block index, or None for everything outside the blocks (the ``rest`` chunk).
Each part's chunk holds every distinct tensor of the part once; keys tied to one tensor
within a part are re-aliased at load. A tensor tied across parts (an embedding shared with
a block) is written into every chunk that uses it, so each chunk stays self-contained.
"""

from __future__ import annotations

import collections
import copy
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedModel

from ..engine.skeleton import block_of, get_tensor, tied_groups
from ..format.quantization import Quantization
from ..format.safetensors import TENSOR_ALIGNMENT
from ..format.writer import ChunkEntry, SourceTensor
from .sinks import ChunkerError

Part = int | None  # a block index, or None for the rest of the model


def chunk_name(part: Part) -> str:
    return "rest" if part is None else f"block_{part:04d}"


class Routed(NamedTuple):
    """A checkpoint tensor on its way into a chunk."""

    key: str  # in the model's key space (renamed from the checkpoint's)
    converter: Any  # the source pattern of transformers' converter that fuses or splits it
    source: SourceTensor


def distinct_tensors(keys: list[str], state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Each distinct tensor among ``keys`` under its first key, with the keys that name it
    (tied keys, in ``keys`` order): the one place the chunker groups ties."""
    names = {key: [key] for key in keys}
    position = {key: i for i, key in enumerate(keys)}
    for group in tied_groups({key: state[key] for key in keys}):
        ordered = sorted(group, key=position.__getitem__)
        names[ordered[0]] = ordered
        for key in ordered[1:]:
            del names[key]
    return names


def direct_entries(
    keys: list[str],
    meta_sd: dict[str, torch.Tensor],
    sources: list[Routed],
    scales: Mapping[str, SourceTensor] | None = None,
    quant: Quantization | None = None,
) -> list[ChunkEntry] | None:
    """The part's chunk as byte ranges of the source files, when every tensor is a plain
    rename of one checkpoint tensor already in its dtype (the skeleton's: from_pretrained's)
    and shape (the common case):
    then no tensor is ever materialised and memory stays at one staging buffer. ``None``
    sends the part through transformers' conversion instead (fused or split weights, a
    dtype change, ties, a missing tensor, which that path reports). A weight in ``scales``
    (a quantized checkpoint's, by key) is stored quantized, its scales beside it."""
    scales = scales or {}
    by_key: dict[str, list[SourceTensor]] = collections.defaultdict(list)
    for routed in sources:
        if routed.converter is not None:
            return None
        by_key[routed.key].append(routed.source)
    entries: list[ChunkEntry] = []
    for key, names in distinct_tensors(keys, meta_sd).items():
        meta = meta_sd[key]
        found = [s for name in names for s in by_key.get(name, ())]
        if len(found) != 1:
            return None
        scale = next((scales[name] for name in names if name in scales), None)
        want = meta.dtype  # from_pretrained's dtype for it (engine/skeleton.py)
        shape = tuple(meta.shape)
        if scale is not None:
            if quant is None or len(names) > 1 or not _on_grid(scale, meta, quant):
                return None
            want, shape = quant.stored_dtype, quant.checkpoint_shape(shape)
        if found[0].dtype != want or found[0].shape != shape:
            return None
        if scale is None:
            entries.append(ChunkEntry.of_source(key, found[0]))
            continue
        assert quant is not None
        for name, source in ((key, found[0]), (quant.scale_key(key), scale)):
            order = quant.stored_order(len(source.shape))
            entries.append(
                ChunkEntry.of_source(name, source)
                if order is None
                else ChunkEntry.of_permuted(name, source, order)
            )
    return entries


def _on_grid(scale: SourceTensor, meta: torch.Tensor, quant: Quantization) -> bool:
    """Whether ``scale`` holds the scales ``quant`` keeps for ``meta``."""
    shape = tuple(meta.shape)
    return (
        quant.tileable(shape)
        and scale.dtype == quant.scale_torch_dtype
        and scale.shape == quant.checkpoint_scale_shape(shape)
    )


def unconverted_residues(
    sources: list[Routed], tensors: Mapping[str, torch.Tensor]
) -> dict[str, int]:
    """For each of ``tensors`` (a converted part's) that transformers only renamed, the
    residue of its source offset: from_pretrained keeps such a tensor as a view of the
    mapped checkpoint, so its chunk copy must sit at the same address modulo the alignment
    (format/writer.py ``_aligned``); every other tensor is a fresh allocation."""
    out: dict[str, int] = {}
    for routed in sources:
        source, tensor = routed.source, tensors.get(routed.key)
        if (
            routed.converter is None
            and tensor is not None
            and source.dtype == tensor.dtype
            and source.shape == tuple(tensor.shape)
        ):
            out[routed.key] = source.offset % TENSOR_ALIGNMENT
    return out


class CrossTies:
    """Tensors tied across parts: the rest chunk is written first, and its copy of each such
    tensor is held until the blocks that share it have been written; a tensor tied among
    blocks only (Zamba's one transformer applied at several layers) is held from the first
    block that has it."""

    def __init__(self, groups: list[list[str]], prefixes: list[str]):
        self.prefixes = prefixes
        self.groups = [g for g in groups if len({block_of(k, prefixes) for k in g}) > 1]
        self.keys = {k for g in self.groups for k in g}
        self._held: dict[tuple[str, ...], torch.Tensor] = {}

    def add_to(self, out: dict[str, torch.Tensor], part: Part) -> None:
        """Hold the shared tensors a part has, or give a block its copy of them."""
        for group in self.groups:
            if part is None:
                for key in group:
                    if key in out:
                        self._held[tuple(group)] = out[key]
                continue
            mine = [k for k in group if block_of(k, self.prefixes) == part]
            have = [k for k in mine if k in out]
            if have:  # a tie among blocks: the first block that holds it lends it to the next
                self._held.setdefault(tuple(group), out[have[0]])
            elif mine:
                value = self._held.get(tuple(group))
                if value is None:
                    raise ChunkerError(f"tied weights {group} span blocks in a way not supported")
                # written into the block's own file; the rest's tensor stays held until the end
                out[mine[0]] = value

    def residues(
        self, known: Mapping[str, int], tensors: Mapping[str, torch.Tensor]
    ) -> dict[str, int]:
        """For each of ``tensors`` tied across parts, the residue of the one tensor
        from_pretrained holds for its group (``known``: by key, for the keys whose tensor was
        copied from the source as is): every copy sits where that tensor does, modulo the
        alignment (format/writer.py ``_aligned``)."""
        out = {}
        for group in self.groups:
            residue = next((known[k] for k in group if k in known), None)
            if residue is not None:
                out.update({k: residue for k in group if k in tensors})
        return out


def made_at_init(model: PreTrainedModel, keys: list[str]) -> dict[str, torch.Tensor]:
    """Those of ``keys`` that the model never saves and computes at init, with the values
    from_pretrained gives them: keys transformers does not expect in a checkpoint
    (``_keys_to_ignore_on_load_missing``) whose module's own init makes the same values
    whatever the random state (Marian's sinusoidal positions). A key whose init is random
    is not among them: from_pretrained itself would give it other values on each load."""
    patterns = [
        re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []
    ]
    made: dict[str, torch.Tensor] = {}
    for key in keys:
        if not any(p.search(key) for p in patterns):
            continue
        owner, _, name = key.rpartition(".")
        values = []
        for seed in (0, 1):
            module = copy.deepcopy(model.get_submodule(owner)).to_empty(device="cpu")
            for sub in module.modules():
                sub.__dict__.pop("_is_hf_initialized", None)
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model._init_weights(module)
            values.append(getattr(module, name).detach())
        if torch.equal(values[0], values[1]):
            made[key] = values[0]
    return made


def collect(
    model: PreTrainedModel,
    keys: list[str],
    groups: list[list[str]],
    cross: CrossTies,
    dtypes: Mapping[str, torch.dtype],
    part: Part,
) -> dict[str, torch.Tensor]:
    """The part's tensors from the model transformers loaded them into, each stored once."""
    current = {key: get_tensor(model, key) for key in keys}
    out: dict[str, torch.Tensor] = {}
    for key in distinct_tensors(keys, current):
        tensor = current[key]
        if tensor.device.type == "meta":
            continue
        value = tensor.detach()
        if value.is_floating_point():
            value = value.to(dtypes[key])  # from_pretrained's dtype for it
        out[key] = value.contiguous()
    cross.add_to(out, part)
    missing = [
        k
        for k in keys
        if k not in out and not any(k in g and any(o in out for o in g) for g in groups)
    ]
    made = made_at_init(model, missing)
    out.update({k: v.to(dtypes[k]) if v.is_floating_point() else v for k, v in made.items()})
    missing = [k for k in missing if k not in made]
    if missing:
        raise ChunkerError(
            f"the checkpoint has no values for {missing[:5]}; refusing to chunk a model with "
            "missing weights (transformers would fill them with random values)"
        )
    return out
