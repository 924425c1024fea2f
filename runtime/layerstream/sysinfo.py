"""How much memory this process may use: the cgroup limit if there is one, else the machine's."""

from __future__ import annotations

from pathlib import Path


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> int:
    """Bytes this process could still allocate: min(MemAvailable, cgroup limit - usage)."""
    meminfo = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        meminfo[key] = int(value.split()[0]) * 1024
    free = meminfo.get("MemAvailable", meminfo.get("MemFree", 0))
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        # cgroup v1 reports "no limit" as a huge number
        if limit is not None and usage is not None and limit < (1 << 60):
            free = min(free, max(limit - usage, 0))
    return free
