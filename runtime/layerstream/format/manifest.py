"""The chunk store's table of contents: which file holds which tensors, and their checksums.

``manifest.json`` is written last by the chunker, so a store without one is incomplete.
Everything the engine needs to rebuild the model (architecture, dtype, block order, tied
weights) lives here; the manifest is validated on load so a hand-edited or truncated store
fails loudly instead of producing a wrong model.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ManifestError
from .quantization import DEQUANTIZED_ALIGNMENT, MXFP4, SCALE_DTYPES, Fp8Blocks, Mxfp4, Quantization

FORMAT = "layerstream.chunks"
# 2: a block's chunk may list its experts (ExpertGroup); 3: a store may keep tensors
# quantized (format/quantization.py); 4: the model writes to its weights on its first
# forward (WeightWrites), which a reader must make happen once, with every block in memory.
# A store is written with the lowest version that holds
# it, so older readers still serve what they can, and refuse what they would serve wrong
FORMAT_VERSION = 4
MANIFEST_NAME = "manifest.json"
DTYPES = ("float32", "float16", "bfloat16")
# Chunk file names stay inside the store: no absolute paths, no "..", no odd characters.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)*$")


@dataclass(frozen=True)
class ExpertGroup:
    """One experts module of a block: expert e of each of its ``tensors`` (all ``[count,
    ...]``) is the tensor's e-th slice along the first dimension, a contiguous byte range of
    the chunk (format/parts.py), so a token's routed experts can be read alone."""

    module: str  # e.g. "model.layers.3.mlp.experts"
    count: int
    tensors: list[str]  # state-dict keys
    sha256: list[str]  # per expert: of its slices of ``tensors``, concatenated in file order


@dataclass(frozen=True)
class ChunkExperts:
    """A block chunk's experts, and the digest of every byte outside them (header included)."""

    base_sha256: str
    groups: list[ExpertGroup]
    # the base's size (stores chunked before it was recorded have none): what `layerstream
    # size` plans with; the engine checks it against the chunk's header
    base_bytes: int | None = None


@dataclass(frozen=True)
class ChunkInfo:
    """One safetensors file in the store."""

    name: str  # "block_0003" or "rest"
    file: str  # path relative to the store root
    bytes: int  # file size
    sha256: str
    tensors: list[str]  # state-dict keys (module key space) held in the file
    experts: ChunkExperts | None = None  # a mixture-of-experts block's expert slices
    # keys of ``tensors`` stored quantized, each with its scales (Quantization.scale_key),
    # and the bytes they take once dequantized, which a block holds beside its chunk's
    # bytes while it runs
    quantized: list[str] | None = None
    dequantized_bytes: int = 0

    @property
    def dequantized_room(self) -> int:
        """Room for the dequantized tensors, each starting on an aligned boundary."""
        return self.dequantized_bytes + DEQUANTIZED_ALIGNMENT * len(self.quantized or ())

    @property
    def memory_bytes(self) -> int:
        """What the chunk takes in a streaming buffer: its bytes, then its tensors
        dequantized (pinned, it holds less: engine/held.py)."""
        return self.bytes + self.dequantized_room


@dataclass(frozen=True)
class BlockInfo:
    """One transformer block: a module prefix and the chunk holding its weights."""

    prefix: str  # e.g. "model.layers.3"
    chunk: str


@dataclass(frozen=True)
class WeightWrites:
    """What the model's own forward writes of its stored tensors, learned by the chunker on
    the meta device (engine/writes.py); a model that writes on every forward is refused."""

    first: tuple[str, ...] = ()  # written on its first forward (RWKV's rescaling)
    unchecked: str | None = None  # why it could not be learned (its forward fails on meta)

    def to_json(self) -> dict[str, Any]:
        if self.unchecked is not None:
            return {"unchecked": self.unchecked}
        return {"first": list(self.first)}


@dataclass
class Manifest:
    name: str
    architecture: str  # transformers class name, e.g. "LlamaForCausalLM"
    model_type: str
    dtype: str
    blocks: list[BlockInfo]
    rest: list[str]  # chunks holding everything outside the blocks
    chunks: dict[str, ChunkInfo]
    tied: list[list[str]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # config, generation config, tokenizer files
    # sha256 of each of ``files`` (stores written before this field have none: not checked)
    file_sha256: dict[str, str] = field(default_factory=dict)
    transformers_version: str = ""
    quantization: Quantization | None = None  # how ``ChunkInfo.quantized`` tensors are stored
    # None: chunked before the chunker learned it (the engine learns it at load)
    weight_writes: WeightWrites | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(c.bytes for c in self.chunks.values())

    @property
    def block_bytes(self) -> list[int]:
        return [self.chunks[b.chunk].bytes for b in self.blocks]

    @property
    def rest_bytes(self) -> int:
        return sum(self.chunks[name].bytes for name in self.rest)

    @property
    def weights_label(self) -> str:
        """The compute dtype and, for a quantized store, how it holds the weights (logs)."""
        if self.quantization is None:
            return self.dtype
        return f"{self.dtype}, stored {self.quantization.describe()}"

    @property
    def has_experts(self) -> bool:
        return any(c.experts is not None for c in self.chunks.values())

    def to_json(self) -> str:
        data = asdict(self)
        for chunk in data["chunks"].values():
            if chunk["experts"] is None:  # dense chunks keep the version 1 shape
                del chunk["experts"]
            elif chunk["experts"]["base_bytes"] is None:  # as it was read
                del chunk["experts"]["base_bytes"]
            if chunk["quantized"] is None:
                del chunk["quantized"], chunk["dequantized_bytes"]
        if self.quantization is None:
            del data["quantization"]
            # readable by layerstream before quantized stores, or before expert streaming
            data["format_version"] = 2 if self.has_experts else 1
        else:
            data["quantization"] = self.quantization.to_json()
        if self.weight_writes is None:
            del data["weight_writes"]
        else:
            data["weight_writes"] = self.weight_writes.to_json()
            if self.weight_writes.first:
                data["format_version"] = 4
        return json.dumps(data, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str = MANIFEST_NAME) -> Manifest:
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise ManifestError(
                f"{source} is not valid JSON ({reason}); re-run the chunker"
            ) from None
        return _parse(data, source)


# A chunk is a safetensors file (at least its 8-byte header length) of at most 1 TiB: no
# transformer block comes near that, and a larger number is a damaged or hand-edited manifest.
MAX_CHUNK_BYTES = 1 << 40
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _kind(value: Any) -> str:
    return "a boolean" if isinstance(value, bool) else f"a {type(value).__name__}"


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], source: str) -> Any:
    if key not in data:
        raise ManifestError(f"{source} has no '{key}'; re-run the chunker")
    return _typed(data[key], kind, f"'{key}'", source)


def _typed(value: Any, kind: type | tuple[type, ...], what: str, source: str) -> Any:
    """``value`` if it has the JSON type ``kind`` (a boolean is not an int), else an error."""
    if isinstance(value, kind) and not (isinstance(value, bool) and kind is int):
        return value
    expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
    raise ManifestError(
        f"{source}: {what} must be {expected}, not {_kind(value)} ({value!r:.60}); "
        "the manifest was edited or damaged: re-run the chunker"
    )


def _strings(value: Any, what: str, source: str) -> list[str]:
    items = _typed(value, list, what, source)
    return [_typed(item, str, f"an entry of {what}", source) for item in items]


def check_relative_name(name: str, source: str) -> str:
    """Refuse file names that could escape the store root."""
    if not _SAFE_NAME.match(name) or ".." in name.split("/") or posixpath.isabs(name):
        raise ManifestError(
            f"{source}: refusing unsafe file name {name!r} (must stay inside the store)"
        )
    return name


def _chunk(name: str, raw: Any, source: str) -> ChunkInfo:
    what = f"chunk {name!r}"
    raw = _typed(raw, dict, what, source)
    fields = {"name", "file", "bytes", "sha256", "tensors"}
    optional = {"experts", "quantized", "dequantized_bytes"}
    if not fields <= set(raw) <= fields | optional or ("quantized" in raw) != (
        "dequantized_bytes" in raw
    ):
        raise ManifestError(
            f"{source}: {what} must have exactly the fields {sorted(fields)} (and optionally "
            f"'experts', and 'quantized' with 'dequantized_bytes'), has {sorted(raw)}"
        )
    info = ChunkInfo(
        name=_typed(raw["name"], str, f"{what} 'name'", source),
        file=check_relative_name(_typed(raw["file"], str, f"{what} 'file'", source), source),
        bytes=_typed(raw["bytes"], int, f"{what} 'bytes'", source),
        sha256=_typed(raw["sha256"], str, f"{what} 'sha256'", source),
        tensors=_strings(raw["tensors"], f"{what} 'tensors'", source),
        experts=_experts(raw["experts"], what, source) if "experts" in raw else None,
        quantized=(
            _strings(raw["quantized"], f"{what} 'quantized'", source)
            if "quantized" in raw
            else None
        ),
        dequantized_bytes=_typed(
            raw.get("dequantized_bytes", 0), int, f"{what} 'dequantized_bytes'", source
        ),
    )
    if info.name != name:
        raise ManifestError(f"{source}: {what} is named {info.name!r} inside")
    if not 8 <= info.bytes <= MAX_CHUNK_BYTES:
        raise ManifestError(
            f"{source}: {what} has an implausible size of {info.bytes} bytes (a chunk holds "
            f"8 bytes to 1 TiB); the manifest was edited or damaged: re-run the chunker"
        )
    if not _SHA256.fullmatch(info.sha256):
        raise ManifestError(f"{source}: {what} 'sha256' is not 64 lowercase hex digits")
    if info.experts is not None:
        unknown = {t for g in info.experts.groups for t in g.tensors} - set(info.tensors)
        if unknown:
            raise ManifestError(
                f"{source}: {what} lists experts in tensors it does not hold: "
                f"{sorted(unknown)[:3]}; the manifest was edited: re-run the chunker"
            )
        base = info.experts.base_bytes
        if base is not None and base >= info.bytes:
            raise ManifestError(
                f"{source}: {what} says {base} of its {info.bytes} bytes lie outside its "
                "experts, leaving none for them; the manifest was edited: re-run the chunker"
            )
    if info.quantized is not None and (
        not info.quantized
        or not set(info.quantized) <= set(info.tensors)
        or not 0 < info.dequantized_bytes <= MAX_CHUNK_BYTES
    ):
        raise ManifestError(
            f"{source}: {what} lists quantized tensors it does not hold, or no size for them "
            "dequantized; the manifest was edited: re-run the chunker"
        )
    return info


def _check_scales(chunks: dict[str, ChunkInfo], quant: Quantization, source: str) -> None:
    """Every quantized tensor's scales are in its chunk."""
    for name, info in chunks.items():
        held = set(info.tensors)
        if any(quant.scale_key(k) not in held for k in info.quantized or ()):
            raise ManifestError(
                f"{source}: chunk {name} lists quantized tensors it does not hold with their "
                "scales; the manifest was edited: re-run the chunker"
            )


def _quantization(raw: Any, source: str) -> Quantization:
    raw = _typed(raw, dict, "'quantization'", source)
    if raw == Mxfp4().to_json():
        return Mxfp4()
    if raw == {"method": MXFP4}:
        raise ManifestError(
            f"{source}: its mxfp4 blocks are in the checkpoint's order, which an earlier "
            "layerstream wrote and this one no longer reads; re-run the chunker"
        )
    block = raw.get("weight_block_size")
    if (
        set(raw) != {"method", "weight_block_size", "scale_dtype"}
        or raw["method"] != "fp8"
        or raw["scale_dtype"] not in SCALE_DTYPES
        or not isinstance(block, list)
        or len(block) != 2
        or not all(type(b) is int and b > 0 for b in block)
    ):
        raise ManifestError(
            f"{source}: 'quantization' {raw!r} is not a quantization this layerstream reads "
            "(method 'fp8', weight_block_size [rows, cols], scale_dtype; or method 'mxfp4', "
            "layout 'transposed'); upgrade layerstream or re-run the chunker"
        )
    return Fp8Blocks((block[0], block[1]), raw["scale_dtype"])


def _digest(value: Any, what: str, source: str) -> str:
    digest = _typed(value, str, what, source)
    if not _SHA256.fullmatch(digest):
        raise ManifestError(f"{source}: {what} is not 64 lowercase hex digits")
    return digest


def _experts(raw: Any, chunk: str, source: str) -> ChunkExperts:
    what = f"{chunk} 'experts'"
    raw = _typed(raw, dict, what, source)
    if not {"base_sha256", "groups"} <= set(raw) <= {"base_sha256", "groups", "base_bytes"}:
        raise ManifestError(
            f"{source}: {what} must have 'base_sha256' and 'groups' (and may have "
            "'base_bytes'), nothing else"
        )
    groups = []
    for item in _typed(raw["groups"], list, f"{what} 'groups'", source):
        item = _typed(item, dict, f"a group of {what}", source)
        if set(item) != {"module", "count", "tensors", "sha256"}:
            raise ManifestError(
                f"{source}: a group of {what} must have exactly 'module', 'count', "
                "'tensors' and 'sha256'"
            )
        count = _typed(item["count"], int, f"a group's 'count' in {what}", source)
        digests = _typed(item["sha256"], list, f"a group's 'sha256' in {what}", source)
        tensors = _strings(item["tensors"], f"a group's 'tensors' in {what}", source)
        if count < 1 or len(digests) != count or not tensors:
            raise ManifestError(
                f"{source}: a group of {what} must list one sha256 per expert ({count}) and "
                "at least one tensor; the manifest was edited: re-run the chunker"
            )
        groups.append(
            ExpertGroup(
                module=_typed(item["module"], str, f"a group's 'module' in {what}", source),
                count=count,
                tensors=tensors,
                sha256=[_digest(d, f"an expert's sha256 in {what}", source) for d in digests],
            )
        )
    modules = [g.module for g in groups]
    if not groups or len(set(modules)) != len(modules):
        raise ManifestError(
            f"{source}: {what} must list each experts module once, and at least one; the "
            "manifest was edited: re-run the chunker"
        )
    base_bytes = raw.get("base_bytes")
    if base_bytes is not None:
        base_bytes = _typed(base_bytes, int, f"{what} 'base_bytes'", source)
        if base_bytes < 8:  # the header's length at least
            raise ManifestError(f"{source}: {what} 'base_bytes' is below 8; re-run the chunker")
    digest = _digest(raw["base_sha256"], f"{what} 'base_sha256'", source)
    return ChunkExperts(digest, groups, base_bytes)


def _block(raw: Any, source: str) -> BlockInfo:
    raw = _typed(raw, dict, "an entry of 'blocks'", source)
    if set(raw) != {"prefix", "chunk"}:
        raise ManifestError(f"{source}: a block must have exactly 'prefix' and 'chunk'")
    return BlockInfo(
        prefix=_typed(raw["prefix"], str, "a block's 'prefix'", source),
        chunk=_typed(raw["chunk"], str, "a block's 'chunk'", source),
    )


def _parse(data: Any, source: str) -> Manifest:
    if not isinstance(data, dict):
        raise ManifestError(f"{source} must hold a JSON object")
    if data.get("format") != FORMAT:
        raise ManifestError(
            f"{source} is not a layerstream manifest (format={data.get('format')!r})"
        )
    version = _require(data, "format_version", int, source)
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"{source} has format_version {version}; this layerstream reads up to "
            f"{FORMAT_VERSION}. Upgrade layerstream or re-chunk the model."
        )
    dtype = _require(data, "dtype", str, source)
    if dtype not in DTYPES:
        raise ManifestError(f"{source}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    chunks = {
        name: _chunk(name, raw, source)
        for name, raw in _require(data, "chunks", dict, source).items()
    }
    blocks = [_block(b, source) for b in _require(data, "blocks", list, source)]
    rest = _strings(_require(data, "rest", list, source), "'rest'", source)
    for chunk in [b.chunk for b in blocks] + rest:
        if chunk not in chunks:
            raise ManifestError(f"{source} refers to chunk {chunk!r}, which it does not list")
    files = [
        check_relative_name(f, source) for f in _strings(data.get("files", []), "'files'", source)
    ]
    file_sha256 = _typed(data.get("file_sha256", {}), dict, "'file_sha256'", source)
    if any(
        name not in files or not isinstance(d, str) or not _SHA256.fullmatch(d)
        for name, d in file_sha256.items()
    ):
        raise ManifestError(f"{source}: 'file_sha256' must map listed files to sha256 digests")
    if file_sha256 and set(file_sha256) != set(files):
        # stores chunked before the field have no digests at all; one with some has them all
        raise ManifestError(
            f"{source}: 'file_sha256' has no digest for {sorted(set(files) - set(file_sha256))}"
            "; the manifest was edited: re-run the chunker"
        )
    if version < 2 and any(c.experts is not None for c in chunks.values()):
        raise ManifestError(
            f"{source} lists experts, which format_version {version} does not have; the "
            "manifest was edited: re-run the chunker"
        )
    quantization = _quantization(data["quantization"], source) if "quantization" in data else None
    quantized = [name for name, c in chunks.items() if c.quantized is not None]
    if quantization is not None:
        _check_scales(chunks, quantization, source)
    if (quantization is None) != (not quantized) or (quantization is not None and version < 3):
        raise ManifestError(
            f"{source}: its 'quantization' and the chunks it lists as quantized "
            f"({quantized[:3]}) do not agree; the manifest was edited: re-run the chunker"
        )
    tied = _typed(data.get("tied", []), list, "'tied'", source)
    writes = _weight_writes(data["weight_writes"], source) if "weight_writes" in data else None
    if writes is not None and writes.first and version < 4:
        raise ManifestError(
            f"{source}: format_version {version} has no weights written by the model's "
            "forward; the manifest was edited: re-run the chunker"
        )
    return Manifest(
        name=_require(data, "name", str, source),
        architecture=_require(data, "architecture", str, source),
        model_type=_require(data, "model_type", str, source),
        dtype=dtype,
        blocks=blocks,
        rest=rest,
        chunks=chunks,
        tied=[_strings(group, "a 'tied' group", source) for group in tied],
        files=files,
        file_sha256=file_sha256,
        transformers_version=_typed(
            data.get("transformers_version", ""), str, "'transformers_version'", source
        ),
        quantization=quantization,
        weight_writes=writes,
        format_version=version,
    )


def _weight_writes(raw: Any, source: str) -> WeightWrites:
    raw = _typed(raw, dict, "'weight_writes'", source)
    if set(raw) == {"first"}:
        return WeightWrites(first=tuple(_strings(raw["first"], "'weight_writes' 'first'", source)))
    if set(raw) == {"unchecked"}:
        return WeightWrites(
            unchecked=_typed(raw["unchecked"], str, "'weight_writes' 'unchecked'", source)
        )
    raise ManifestError(
        f"{source}: 'weight_writes' must have one field, 'first' or 'unchecked', has "
        f"{sorted(raw)}; the manifest was edited: re-run the chunker"
    )
