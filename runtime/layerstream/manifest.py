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

from .errors import ManifestError

FORMAT = "layerstream.chunks"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DTYPES = ("float32", "float16", "bfloat16")
# Chunk file names stay inside the store: no absolute paths, no "..", no odd characters.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)*$")


@dataclass(frozen=True)
class ChunkInfo:
    """One safetensors file in the store."""

    name: str  # "block_0003" or "rest"
    file: str  # path relative to the store root
    bytes: int  # file size
    sha256: str
    tensors: list[str]  # state-dict keys (module key space) held in the file


@dataclass(frozen=True)
class BlockInfo:
    """One transformer block: a module prefix and the chunk holding its weights."""

    prefix: str  # e.g. "model.layers.3"
    chunk: str


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

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps(data, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str = MANIFEST_NAME) -> Manifest:
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{source} is not valid JSON ({exc}); re-run the chunker") from exc
        return _parse(data, source)


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], source: str) -> Any:
    if key not in data:
        raise ManifestError(f"{source} has no '{key}'; re-run the chunker")
    if not isinstance(data[key], kind):
        raise ManifestError(f"{source}: '{key}' has the wrong type ({type(data[key]).__name__})")
    return data[key]


def check_relative_name(name: str, source: str) -> str:
    """Refuse file names that could escape the store root."""
    if not _SAFE_NAME.match(name) or ".." in name.split("/") or posixpath.isabs(name):
        raise ManifestError(
            f"{source}: refusing unsafe file name {name!r} (must stay inside the store)"
        )
    return name


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
    chunks: dict[str, ChunkInfo] = {}
    for name, raw in _require(data, "chunks", dict, source).items():
        try:
            info = ChunkInfo(**raw)
        except TypeError as exc:
            raise ManifestError(f"{source}: chunk {name!r} is malformed ({exc})") from exc
        if info.name != name or not re.fullmatch(r"[0-9a-f]{64}", info.sha256) or info.bytes < 8:
            raise ManifestError(f"{source}: chunk {name!r} has a bad name, size or sha256")
        check_relative_name(info.file, source)
        chunks[name] = info
    blocks = [BlockInfo(**b) for b in _require(data, "blocks", list, source)]
    rest = _require(data, "rest", list, source)
    for chunk in [b.chunk for b in blocks] + rest:
        if chunk not in chunks:
            raise ManifestError(f"{source} refers to chunk {chunk!r}, which it does not list")
    files = [check_relative_name(f, source) for f in data.get("files", [])]
    file_sha256 = data.get("file_sha256", {})
    if not isinstance(file_sha256, dict) or any(
        name not in files or not isinstance(d, str) or not re.fullmatch(r"[0-9a-f]{64}", d)
        for name, d in file_sha256.items()
    ):
        raise ManifestError(f"{source}: 'file_sha256' must map listed files to sha256 digests")
    return Manifest(
        name=_require(data, "name", str, source),
        architecture=_require(data, "architecture", str, source),
        model_type=_require(data, "model_type", str, source),
        dtype=dtype,
        blocks=blocks,
        rest=rest,
        chunks=chunks,
        tied=[list(g) for g in data.get("tied", [])],
        files=files,
        file_sha256=file_sha256,
        transformers_version=data.get("transformers_version", ""),
        format_version=version,
    )
