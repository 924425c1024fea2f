"""Which streamed blocks stream as their base plus routed experts (the ``expert_streaming``
setting), and where each part of their chunks lies.

- ``on``: every streamed block whose chunk lists its experts (a store chunked by a
  layerstream that knows them; one that lists none is an error);
- ``off``: every block streams whole;
- ``auto``: ``on`` where the bytes come from a disk or a network, whole blocks where a local
  store's streamed chunks stay in the page cache: mapped whole they cost no copy, while the
  routed experts are copied out (slower there: docs/benchmarks.md).
"""

from __future__ import annotations

import logging

from ..errors import ManifestError, SettingsError
from ..format.manifest import ChunkInfo, Manifest
from ..format.parts import ChunkParts, chunk_parts
from ..format.safetensors import TensorEntry
from .experts import ExpertsModule, with_scales

log = logging.getLogger(__name__)

EXPERT_STREAMING = ("auto", "on", "off")


def expert_parts(
    mode: str,
    manifest: Manifest,
    experts: dict[str, ExpertsModule],
    layouts: dict[str, list[TensorEntry]],
    cache_holds_chunks: bool,
) -> dict[str, ChunkParts]:
    """The parts of each streamed chunk (``layouts``: their parsed headers) that streams
    as base + experts, by chunk name; ``experts``: the model's experts modules by name."""
    if mode not in EXPERT_STREAMING:
        raise SettingsError(
            f"expert_streaming must be one of {', '.join(EXPERT_STREAMING)}, not {mode!r}"
        )
    listed = [name for name in layouts if manifest.chunks[name].experts is not None]
    whole = [name for name in listed if not _experts_hold_quantized(manifest, name)]
    if whole:
        # chunked before an expert's scales were part of it: its experts cannot be read alone
        log.info(
            "%s: %d blocks hold quantized experts without their scales beside each (chunked "
            "by an older layerstream): they stream whole; re-run the chunker to stream experts",
            manifest.name,
            len(whole),
        )
        listed = [name for name in listed if name not in whole]
    if mode == "on" and not listed:
        why = (
            "has no experts modules"
            if not experts
            else "streams no block at this budget: every block is in memory, so there are "
            "no experts to read (set expert_streaming to auto, or lower memory_budget)"
            if not layouts
            else "was chunked before an expert's scales were kept beside it, so its "
            "blocks stream whole: re-run the chunker, or set expert_streaming to auto or off"
            if whole
            else "was chunked without its experts' byte ranges: re-run the chunker"
        )
        raise SettingsError(
            f"expert_streaming=on, but {manifest.name} ({manifest.architecture}) {why}"
        )
    if mode == "auto" and listed and cache_holds_chunks:
        log.info(
            "expert streaming off: the page cache holds %s's streamed chunks, which are "
            "mapped whole without a copy (expert_streaming=on reads only routed experts)",
            manifest.name,
        )
        return {}
    if mode == "off" or not listed:
        if experts and layouts and not manifest.has_experts:
            log.info(
                "%s was chunked without its experts' byte ranges: its blocks stream whole; "
                "re-run the chunker to stream only the routed experts",
                manifest.name,
            )
        return {}
    return {name: _chunk_parts(manifest, name, layouts[name], experts) for name in listed}


def _chunk_parts(
    manifest: Manifest,
    name: str,
    layout: list[TensorEntry],
    experts: dict[str, ExpertsModule],
) -> ChunkParts:
    """A chunk's parts, its experts checked against the model's own experts modules."""
    info = manifest.chunks[name]
    assert info.experts is not None
    quant = manifest.quantization
    for group in info.experts.groups:
        module = experts.get(group.module)
        if module is not None and quant is not None:  # its scales are listed beside it
            module = with_scales(module, info.quantized or (), quant)
        if module is None or (module.count, sorted(module.tensors)) != (
            group.count,
            sorted(group.tensors),
        ):
            raise ManifestError(
                f"chunk {name} lists experts of {group.module} ({group.count} experts in "
                f"{group.tensors}), which the model built from config.json does not have "
                "as such; the chunks do not belong to this config: re-run the chunker"
            )
    return chunk_parts(info, layout)


def _experts_hold_quantized(manifest: Manifest, name: str) -> bool:
    """Whether every quantized expert tensor of chunk ``name`` has its scales in its group,
    so each expert read alone can be dequantized alone (quantized tensors outside the
    experts are dequantized with the base)."""
    info, quant = manifest.chunks[name], manifest.quantization
    if info.quantized is None or quant is None:
        return True
    assert info.experts is not None
    return all(
        quant.scale_key(key) in group.tensors
        for group in info.experts.groups
        for key in group.tensors
        if key in info.quantized
    )


def base_quantized(info: ChunkInfo) -> list[str]:
    """The quantized tensors of a block's base (outside its experts): fp8 attention weights."""
    if info.experts is None:
        return []
    experts = {key for group in info.experts.groups for key in group.tensors}
    return [key for key in info.quantized or () if key not in experts]
