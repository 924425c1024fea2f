"""The checkpoint the chunker reads: its safetensors files, its side files, or a Hub id."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers

from ..format.header import HeaderError
from ..format.writer import SourceTensor, read_safetensors_index
from .sinks import ChunkerError

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


@dataclass(frozen=True)
class Checkpoint:
    """A local checkpoint directory and its safetensors weight files."""

    directory: Path
    files: list[Path]

    @classmethod
    def open(cls, directory: Path) -> Checkpoint:
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
                f" It has {', '.join(pickled)}: layerstream never unpickles weights; convert "
                "them to safetensors first (e.g. `from_pretrained(...).save_pretrained(dir)` "
                "in a trusted environment)."
                if pickled
                else ""
            )
            raise ChunkerError(f"no *.safetensors weights in {directory}.{hint}")
        return cls(directory, files)

    def indexes(self) -> list[dict[str, SourceTensor]]:
        """Each weight file's tensors by key, from the headers alone."""
        out = []
        for path in self.files:
            try:
                out.append(read_safetensors_index(path))
            except HeaderError as exc:
                raise ChunkerError(
                    f"{path}: {exc}; the checkpoint is damaged or incompletely downloaded: "
                    "download it again"
                ) from exc
        return out

    def handles(self) -> list[Any]:
        """safetensors' own readers of the weight files, a file it cannot read being a
        ChunkerError that names it. backend="pread": real reads; the default mmap backend
        would keep every touched page of the source mapped, so RSS would grow to the whole
        checkpoint."""
        from safetensors import SafetensorError, safe_open

        handles = []
        for path in self.files:
            try:
                handles.append(safe_open(str(path), framework="pt", backend="pread"))
            except (SafetensorError, OSError) as exc:
                raise ChunkerError(
                    f"{path} is not a readable safetensors file ({exc}): the checkpoint is "
                    "damaged or incompletely downloaded; download it again"
                ) from exc
        return handles

    def copy_side_files(
        self, dest: Path, config: transformers.PretrainedConfig, dtype: str
    ) -> list[str]:
        """Copy the side files there are into ``dest``; their names."""
        copied = []
        for name in SIDE_FILES:
            src = self.directory / name
            if not src.is_file():
                continue
            if name == "config.json":
                config.dtype = dtype  # the chunks' dtype, which may differ from the source's
                config.to_json_file(dest / name)
            else:
                shutil.copyfile(src, dest / name)
            copied.append(name)
        return copied


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


def random_source(spec: str, workdir: str | None = None) -> tempfile.TemporaryDirectory:
    """A temporary directory holding a random-init checkpoint for ``spec``."""
    from .presets import write_random_checkpoint

    tmp = tempfile.TemporaryDirectory(prefix="layerstream-random-", dir=workdir)
    write_random_checkpoint(spec, Path(tmp.name))
    return tmp
