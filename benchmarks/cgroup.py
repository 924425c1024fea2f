"""Run a command in a memory cgroup whose limit also caps its page cache ("a box smaller
than the model"), after dropping the page cache, and report the cgroup's peak usage.

cgroup v1 (``/sys/fs/cgroup/memory``) and v2 (``memory.max``) are supported; both need
root. ``available()`` says why not where the machine does not allow it.
"""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")


def _v2_root() -> Path | None:
    for root in (V2, V2 / "unified"):
        if (root / "cgroup.controllers").exists() and "memory" in (
            root / "cgroup.controllers"
        ).read_text():
            return root
    return None


def available() -> str | None:
    """None when cold runs can be done here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root (memory cgroups and drop_caches)"
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        return "/proc/sys/vm/drop_caches is not writable"
    if (V1 / "memory.limit_in_bytes").exists() or _v2_root() is not None:
        return None
    return "no memory cgroup hierarchy (v1 /sys/fs/cgroup/memory or v2 memory.max)"


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@contextmanager
def memory_cgroup(name: str, limit: int):
    """Yields (procs file, peak reader); the cgroup is removed afterwards."""
    if (V1 / "memory.limit_in_bytes").exists():
        path = V1 / name
        path.mkdir()
        (path / "memory.limit_in_bytes").write_text(str(limit))
        peak_file = "memory.max_usage_in_bytes"
    else:
        root = _v2_root()
        assert root is not None
        path = root / name
        path.mkdir()
        (path / "memory.max").write_text(str(limit))
        if (path / "memory.swap.max").exists():
            (path / "memory.swap.max").write_text("0")
        peak_file = "memory.peak"

    def peak() -> int | None:
        try:
            return int((path / peak_file).read_text())
        except (OSError, ValueError):
            return None

    try:
        yield path / "cgroup.procs", peak
    finally:
        for _ in range(50):  # the cgroup can be removed once its last process has gone
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def run_capped(
    cmd: list[str], limit: int, timeout: float
) -> tuple[subprocess.CompletedProcess, int | None]:
    """Drop the page cache, then run ``cmd`` inside a fresh cgroup limited to ``limit`` bytes."""
    name = f"layerstream-bench-{os.getpid()}-{time.monotonic_ns()}"
    with memory_cgroup(name, limit) as (procs, peak):
        drop_caches()

        def enter() -> None:  # runs in the child before exec: join the cgroup
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=enter
        )
        return result, peak()
