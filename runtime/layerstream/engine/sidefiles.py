"""The model's config, generation config and tokenizer, read from the chunk store.

transformers loads tokenizers only from files, so the side files go through a temporary
directory that lives only while they are parsed. A process killed meanwhile would leave it
behind: each directory holds a lock file locked (flock) by its owner for the directory's
lifetime, so any later load removes directories whose lock nobody holds any more, and never
one that a live process (this one or another, or another model loading beside it) is still
using. A directory gets its name only once its lock is held (it is created under a staging
name, locked, then renamed), so the sweep never sees one that is not locked yet.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import posixpath
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PretrainedConfig

from ..errors import ChunkIntegrityError, ManifestError
from ..format.manifest import Manifest
from ..stores import ChunkStore
from .checks import refetch_once
from .skeleton import model_class

log = logging.getLogger(__name__)

PREFIX = "layerstream-model-"
STAGING_PREFIX = ".layerstream-staging-"
LOCK_NAME = ".owner.lock"
# A staging directory lives for two system calls; one this old lost its owner in between.
STALE_STAGING_S = 3600


@dataclass
class SideFiles:
    config: PretrainedConfig
    tokenizer: object | None  # a transformers tokenizer, when the store has one
    generation_config: GenerationConfig | None  # for models that can generate


def read_side_file(store: ChunkStore, manifest: Manifest, name: str) -> bytes:
    """A config or tokenizer file, checked against the manifest's sha256 (when it has one);
    a mismatch is fetched once more from the origin, then fails the load."""
    expected = manifest.file_sha256.get(name)

    def read() -> bytes:
        data = store.read(name)
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise ChunkIntegrityError(
                f"{store.uri}/{name} does not match the manifest's sha256; re-run the chunker "
                "or check the store"
            )
        return data

    try:
        return refetch_once(store, name, read)
    except ChunkIntegrityError as exc:
        raise ChunkIntegrityError(f"{exc.message} (fetched twice)") from exc


def load_side_files(store: ChunkStore, manifest: Manifest) -> SideFiles:
    remove_stale_directories()
    if manifest.files and not manifest.file_sha256:
        log.warning(
            "%s: the manifest predates side-file digests, so config and tokenizer files are "
            "not checked; re-run the chunker to have them checked",
            store.uri,
        )
    with _owned_directory() as folder:
        # by their base names: a store that replaced another on S3 keeps them in a folder
        names = [posixpath.basename(name) for name in manifest.files]
        if len(set(names)) != len(names):
            raise ManifestError(f"{store.uri}: the manifest lists two side files of one name")
        for name, base in zip(manifest.files, names, strict=True):
            (folder / base).write_bytes(read_side_file(store, manifest, name))
        config = AutoConfig.from_pretrained(folder)
        tokenizer = None
        if any(n.startswith("tokenizer") or n == "vocab.json" for n in names):
            tokenizer = AutoTokenizer.from_pretrained(folder)
        generation_config = None
        if model_class(manifest.architecture).can_generate():
            generation_config = (
                GenerationConfig.from_pretrained(folder)
                if "generation_config.json" in names
                else GenerationConfig.from_model_config(config)
            )
    return SideFiles(config, tokenizer, generation_config)


@contextlib.contextmanager
def _owned_directory() -> Iterator[Path]:
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX))
    folder = staging
    lock = os.open(staging / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        folder = staging.with_name(PREFIX + staging.name.removeprefix(STAGING_PREFIX))
        os.rename(staging, folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the lock is held until it is gone
        os.close(lock)


def remove_stale_directories(root: str | None = None) -> int:
    """Remove side-file directories left by processes that died while loading; returns how
    many. A directory is stale when its lock file is not locked: the kernel drops a dead
    process's locks, and a live owner holds its lock until it removes the directory."""
    removed = 0
    base = Path(root or tempfile.gettempdir())
    for folder in base.glob(f"{PREFIX}*"):
        if folder.is_dir() and not folder.is_symlink() and _unowned(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    for folder in base.glob(f"{STAGING_PREFIX}*"):
        if folder.is_dir() and not folder.is_symlink() and _older_than(folder, STALE_STAGING_S):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    if removed:
        log.info("removed %d side-file director(ies) left by killed processes", removed)
    return removed


def _unowned(folder: Path) -> bool:
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:  # no lock file yet (being created) or not ours to judge
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a live process holds it
    finally:
        os.close(fd)  # closing drops the lock we may have taken
    return True


def _older_than(folder: Path, seconds: float) -> bool:
    try:
        return time.time() - folder.stat().st_mtime > seconds
    except OSError:  # removed meanwhile
        return False
