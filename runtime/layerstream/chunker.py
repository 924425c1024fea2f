"""Split a Hugging Face checkpoint into one safetensors chunk per transformer block.

Tensors are pulled lazily from the source shards and converted into the model's module key
space with transformers' own conversion mapping (transformers 5 renames and fuses some
checkpoint keys, e.g. MoE experts), one block at a time, so peak memory is one block plus
the non-block parts, whatever the model size. ``manifest.json`` is written last: a store
without it is incomplete and is never served.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoConfig
from transformers.utils import logging as hf_logging

from .manifest import MANIFEST_NAME, BlockInfo, ChunkInfo, Manifest
from .skeleton import (
    TORCH_DTYPES,
    block_prefixes,
    build_skeleton,
    get_tensor,
    scope_of,
    set_tensor,
    tied_groups,
)

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


class ChunkerError(Exception):
    """The source cannot be chunked as asked; the message says why and what to do."""


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


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


class _Writer:
    """Writes chunk files into ``dest`` and records them for the manifest."""

    def __init__(self, dest: Path):
        self.dest = dest
        self.chunks: dict[str, ChunkInfo] = {}

    def write(self, name: str, tensors: dict[str, torch.Tensor], scope: str) -> ChunkInfo:
        file = f"{name}.safetensors"
        tmp = self.dest / f".{file}.tmp"
        save_file(tensors, str(tmp), metadata={"scope": scope, "format": "pt"})
        os.replace(tmp, self.dest / file)
        info = ChunkInfo(
            name=name,
            file=file,
            bytes=(self.dest / file).stat().st_size,
            sha256=_sha256_file(self.dest / file),
            tensors=sorted(tensors),
        )
        self.chunks[name] = info
        return info


def _prepare_dest(dest: Path, force: bool) -> None:
    if dest.exists() and any(dest.iterdir()):
        if not force:
            raise ChunkerError(f"{dest} is not empty; pass --force to overwrite it")
        shutil.rmtree(dest)
    dest.mkdir(parents=True, exist_ok=True)


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
    dest: Path,
    name: str,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> Manifest:
    """Chunk the safetensors checkpoint in ``source_dir`` into the store directory ``dest``."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        convert_and_load_state_dict_in_model,
        rename_source_key,
    )
    from transformers.modeling_utils import LoadStateDictConfig

    source = _source_files(source_dir)
    config = AutoConfig.from_pretrained(source_dir)
    if not getattr(config, "architectures", None):
        raise ChunkerError(f"{source_dir}/config.json names no 'architectures'; add one")
    architecture = config.architectures[0]
    dtype = _pick_dtype(config, dtype)
    model = build_skeleton(config, architecture, dtype)
    prefixes = block_prefixes(model)
    if not prefixes:
        raise ChunkerError(f"{architecture}: found no repeated transformer blocks to stream")
    meta_sd = model.state_dict(keep_vars=True)
    originals = dict(meta_sd)
    groups = tied_groups(model)
    mapping = get_model_conversion_mapping(model)
    renamings = [w for w in mapping if isinstance(w, WeightRenaming)]
    converters = [w for w in mapping if isinstance(w, WeightConverter)]

    _prepare_dest(dest, force)
    # backend="pread": real reads; the default mmap backend would keep every touched page of
    # the source mapped, so RSS would grow to the whole checkpoint.
    handles = [safe_open(str(f), framework="pt", backend="pread") for f in source.files]
    scoped: dict[int | None, dict] = collections.defaultdict(dict)
    for handle in handles:
        for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            renamed, _ = rename_source_key(
                key, renamings, converters, model.base_model_prefix, meta_sd
            )
            scoped[scope_of(renamed, prefixes)][key] = handle.get_slice(key)

    writer = _Writer(dest)
    target = TORCH_DTYPES[dtype]
    held: dict[tuple[str, ...], torch.Tensor] = {}  # rest tensors that blocks share through a tie
    cross = [g for g in groups if len({scope_of(k, prefixes) for k in g}) > 1]
    scopes: list[int | None] = [None, *range(len(prefixes))]
    bar = tqdm(scopes, desc=f"chunking {name}", unit="chunk", disable=not progress or None)
    # transformers draws its own "Loading weights" bar for every block; ours is enough.
    hf_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        for scope in bar:
            convert_and_load_state_dict_in_model(
                model, scoped.get(scope, {}), LoadStateDictConfig(weight_mapping=mapping)
            )
            keys = [k for k in meta_sd if scope_of(k, prefixes) == scope]
            tensors = _collect(model, keys, groups, cross, held, target, scope, prefixes)
            chunk_name = "rest" if scope is None else f"block_{scope:04d}"
            info = writer.write(chunk_name, tensors, "rest" if scope is None else prefixes[scope])
            bar.set_postfix_str(f"{chunk_name} {info.bytes / 2**20:.1f} MiB")
            if scope is not None:  # back to meta: one block in memory at a time
                for key in keys:
                    set_tensor(model, key, originals[key])
            del tensors
    finally:
        if hf_bars:
            hf_logging.enable_progress_bar()

    side_files = _copy_side_files(source_dir, dest, config, dtype)
    manifest = Manifest(
        name=name,
        architecture=architecture,
        model_type=config.model_type,
        dtype=dtype,
        blocks=[BlockInfo(prefix=p, chunk=f"block_{j:04d}") for j, p in enumerate(prefixes)],
        rest=["rest"],
        chunks=writer.chunks,
        tied=groups,
        files=side_files,
        transformers_version=transformers.__version__,
    )
    tmp = dest / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(manifest.to_json())
    os.replace(tmp, dest / MANIFEST_NAME)
    log.info(
        "chunked %s: %d blocks + rest, %.1f MiB (%s) into %s",
        name,
        len(prefixes),
        manifest.total_bytes / 2**20,
        dtype,
        dest,
    )
    return manifest


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
        out[key] = value.contiguous().clone()
    for group in cross:
        if scope is None:
            for key in group:
                if key in out:
                    held[tuple(group)] = out[key]
            continue
        mine = [k for k in group if scope_of(k, prefixes) == scope]
        if mine and not any(k in out for k in mine):
            value = held.get(tuple(group))
            if value is None:
                raise ChunkerError(f"tied weights {group} span blocks in a way not supported")
            # Each chunk stays self-contained: a block gets its own copy of a shared tensor.
            out[mine[0]] = value.clone()
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
