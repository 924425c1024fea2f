"""Config and tokenizer files pass through a temporary directory that never outlives a
load, not even one killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from layerstream.engine.engine import Engine, EngineOptions
from layerstream.engine.sidefiles import (
    PREFIX,
    STAGING_PREFIX,
    _owned_directory,
    remove_stale_directories,
)
from layerstream.stores import open_store

KILLED_WHILE_LOADING = """
import os, signal, sys
from layerstream.engine.sidefiles import _owned_directory
with _owned_directory() as folder:
    (folder / "config.json").write_text("{}")
    print(folder, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def leftovers(root: Path) -> list[Path]:
    return sorted(root.glob(f"{PREFIX}*"))


def test_a_load_leaves_no_directory_behind(model_factory, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    engine = Engine(open_store(str(model_factory("gpt2").store)), EngineOptions("25%"))
    try:
        assert engine.tokenizer is not None and not leftovers(tmp_path)
    finally:
        engine.close()


def test_directories_of_killed_loads_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_LOADING], env=env, capture_output=True, text=True
    )
    assert done.returncode == -signal.SIGKILL
    killed = Path(done.stdout.strip())
    assert killed.parent == tmp_path and (killed / "config.json").exists()

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with _owned_directory() as live:  # a load in progress in a live process: kept
        assert remove_stale_directories(str(tmp_path)) == 1
        assert leftovers(tmp_path) == [live]
    assert not leftovers(tmp_path)


def test_loads_side_by_side_never_remove_each_others_directories(tmp_path, monkeypatch):
    """MLServer loads a repository's models at once: one load's sweep must not take the
    directory another is still filling (it did, between its creation and its lock)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    barrier = threading.Barrier(4)
    failures: list[BaseException] = []

    def load(rounds: int = 40) -> None:
        try:
            for _ in range(rounds):
                barrier.wait(timeout=60)
                remove_stale_directories(str(tmp_path))
                with _owned_directory() as folder:
                    (folder / "config.json").write_text("{}")
                    remove_stale_directories(str(tmp_path))
                    assert (folder / "config.json").read_text() == "{}"
        except BaseException as exc:
            failures.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not failures, failures[:1]
    assert not leftovers(tmp_path) and not list(tmp_path.iterdir())


def test_a_staging_directory_left_by_a_killed_load_is_removed_once_old(tmp_path):
    young, old = tmp_path / f"{STAGING_PREFIX}young", tmp_path / f"{STAGING_PREFIX}old"
    young.mkdir()
    old.mkdir()
    os.utime(old, (time.time() - 2 * 3600, time.time() - 2 * 3600))
    assert remove_stale_directories(str(tmp_path)) == 1
    assert young.exists() and not old.exists()
